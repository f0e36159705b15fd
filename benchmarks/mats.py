"""MaTS benchmark: one CG iteration on the K-FAC objective over MiniLM-L6's 36 linear layers with M task models.

What the MaTS experiment (``workflow/rules/mats.smk``) spends most of its time on: each iteration applies
sum_m B_m W A_m to every linear weight. Side by side, in one run:
  (a) the library's product (``linear_combination`` of ``KFAC`` terms, a ``SumCurvature``: M separate products),
  (b) the same product with the M factors stacked and multiplied as one batch (``torch.bmm``), summed after,
with the largest relative difference between them, the ratio (a)/(b), GFLOP/s, and what the experiment's K-FAC
iterations cost at each speed; then (c) one application of the Kronecker-factored preconditioner (four products in
and out of the eigenbases of the summed factors), its setup (two eigendecompositions per layer) and what one
preconditioned iteration costs against a plain one. Factors are random SPD matrices of MiniLM-L6's shapes (speed
does not depend on their values).

    python benchmarks/mats.py [--models 8] [--threads 2] [--repeats 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from modelmerge.curvature import KFAC, linear_combination

HIDDEN, FFN, LAYERS = 384, 1536, 6
#: (out, in) of every nn.Linear of one MiniLM-L6 layer: query, key, value, attention output, FFN in, FFN out
SHAPES = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (HIDDEN, FFN)]


def spd(n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    x = torch.randn(n, n, generator=gen) / n**0.5
    return (x @ x.T + 1e-3 * torch.eye(n)).to(device)


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    M, dev = args.models, args.device
    layers = []
    for out, inp in SHAPES * LAYERS:
        A = torch.stack([spd(inp, gen, dev) for _ in range(M)])
        B = torch.stack([spd(out, gen, dev) for _ in range(M)])
        W = torch.randn(out, inp, generator=gen).to(dev)
        layers.append((A, B, W))
    sums = [linear_combination([1.0] * M, [KFAC(A[m], B[m]) for m in range(M)]) for A, B, _ in layers]

    def library():
        return [s.mv(W) for s, (_, _, W) in zip(sums, layers)]

    def batched():
        return [torch.bmm(torch.bmm(B, W.expand(M, *W.shape)), A).sum(0) for A, B, W in layers]

    diff = max(float(((a - b).abs().max() / a.abs().max())) for a, b in zip(library(), batched()))
    t_lib, t_bat = timed(library, args.repeats, dev), timed(batched, args.repeats, dev)
    flops = sum(2 * M * (k * k * d + k * d * d) for k, d in SHAPES * LAYERS)  # multiply-adds counted as 2
    print(f"K-FAC objective, {M} models, MiniLM-L6's {len(layers)} linear layers, {dev}, {args.threads} threads")
    print(f"  one product A x: {flops / 1e9:.0f} GFLOP")
    print(f"  (a) library SumCurvature: {t_lib:.3f} s ({flops / t_lib / 1e9:.0f} GFLOP/s)")
    print(f"  (b) stacked factors, bmm: {t_bat:.3f} s ({flops / t_bat / 1e9:.0f} GFLOP/s)")
    print(f"  ratio (a)/(b): {t_lib / t_bat:.2f}; largest relative difference {diff:.1e}")
    # default run: Fig. 3's plain solve (100), its preconditioned one (20 at 1.25x), gradient matching with K-FAC (100);
    # mats_full: Fig. 3 to 1,000 (+ 100 preconditioned), Fig. 2's K-FAC column (400), Table 4 (200), round 2 (100)
    print(f"  the default run's ~225 K-FAC iterations: {225 * t_lib / 60:.1f} min (a), {225 * t_bat / 60:.1f} min (b); "
          f"mats_full's ~1,825: {1825 * t_lib / 60:.1f} min (a)")

    start = time.perf_counter()
    preconditioners = [s.preconditioner() for s in sums]
    setup = time.perf_counter() - start

    def precondition():
        return [p(W) for p, (_, _, W) in zip(preconditioners, layers)]

    t_pre = timed(precondition, args.repeats, dev)
    print(f"  (c) Kronecker preconditioner: setup {setup:.2f} s once (float64 eigendecompositions), {t_pre:.3f} s per "
          f"application; a preconditioned iteration costs {(t_lib + t_pre) / t_lib:.2f}x a plain one "
          f"(FLOPs: {(M + 2) / M:.2f}x)")


if __name__ == "__main__":
    main()
