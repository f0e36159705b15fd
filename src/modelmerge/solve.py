"""Conjugate gradients for H x = b with H given only through products (002 Sec. 4, App. B)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> over every entry (one BLAS dot, no temporary)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


@dataclass
class ConjugateGradient:
    """Conjugate gradients on tensors of any shape, with a fixed iteration budget.

    ``tol`` stops early once ||b - H x|| <= tol ||b|| (0 runs the whole budget, as MaTS does).
    ``history[name]`` keeps the relative residuals ||b - H x_k|| / ||b|| for k = 0, 1, ... of every solve and
    ``rhs_norm[name]`` its ||b||. ``keep`` lists iteration counts k whose iterate x_k is stored in
    ``iterates[name][k]``, so one solve of ``max_iter`` iterations yields every shorter budget too (a solve that
    stops early stores its final x for the remaining k: more iterations would not move it). A solve whose step or
    residual stops being finite (p^T H p underflows after the residual reached rounding level) stops there, keeps
    its last finite iterate, and records the iteration in ``breakdown[name]``. With ``keep_best``,
    ``best_iterates[name][k]`` also holds the iterate of smallest residual among x_0..x_k (a safeguarded CG that
    returns its best iterate; the plain iterates are unchanged).
    """

    max_iter: int = 100
    tol: float = 0.0
    keep: tuple[int, ...] = ()
    keep_best: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    rhs_norm: dict[str, float] = field(default_factory=dict)
    iterates: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    breakdown: dict[str, int] = field(default_factory=dict)
    best_iterates: dict[str, dict[int, Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = tuple(sorted(set(int(k) for k in self.keep)))
        if self.keep and (self.keep[0] < 0 or self.keep[-1] > self.max_iter):
            raise ValueError(f"keep must lie in [0, max_iter = {self.max_iter}], got {self.keep}")

    def __call__(self, mv: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, name: str = "?") -> Tensor:
        """argmin_x 1/2 x^T H x - b^T x, i.e. H x = b, from x0 (zeros by default)."""
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - mv(x) if x0 is not None else b.clone()
        b_norm = float(b.norm()) or 1.0
        rs = _dot(r, r)
        hist = [math.sqrt(rs) / b_norm]
        kept: dict[int, Tensor] = {0: x.clone()} if 0 in self.keep else {}
        best_x, best_res, kept_best = x, hist[0], {}
        if 0 in self.keep:
            kept_best[0] = kept[0]
        p = r.clone()
        for it in range(1, self.max_iter + 1):
            if hist[-1] <= self.tol or rs == 0.0:
                break
            hp = mv(p)
            curvature = _dot(p, hp)
            if not curvature > 0:  # p lies in the null space of a semi-definite H: nothing left to fit
                break
            step = rs / curvature
            r_new = torch.add(r, hp, alpha=-step)
            rs_new = _dot(r_new, r_new)
            if not (math.isfinite(step) and math.isfinite(rs_new)):
                # breakdown in finite precision (p^T H p underflowed): keep the last finite iterate
                self.breakdown[name] = it
                break
            x = torch.add(x, p, alpha=step)  # a new tensor: kept and best iterates are never overwritten
            r = r_new
            hist.append(math.sqrt(rs_new) / b_norm)
            p = torch.add(r, p, alpha=rs_new / rs)
            rs = rs_new
            if hist[-1] < best_res:
                best_x, best_res = x, hist[-1]
            if it in self.keep:
                kept[it] = x.clone()
                kept_best[it] = best_x if best_x is not x else kept[it]
        for k in self.keep:
            kept.setdefault(k, x)
            kept_best.setdefault(k, best_x)
        self.history[name] = hist
        self.rhs_norm[name] = float(b.norm())
        if self.keep:
            self.iterates[name] = kept
            if self.keep_best:
                self.best_iterates[name] = kept_best
        return x


def total_relative_residual(solver: ConjugateGradient) -> list[float]:
    """||b - A x_k|| / ||b|| over every parameter solved together, k = 0, 1, ... (002 App. G's system error).

    Parameters are independent blocks of one linear system, so the total residual norm is the root of the sum
    of squared block residuals; a block whose solve stopped early keeps its last residual.
    """
    names = [n for n in solver.history if solver.rhs_norm.get(n, 0.0) > 0]
    if not names:
        return []
    length = max(len(solver.history[n]) for n in names)
    total_b = sum(solver.rhs_norm[n] ** 2 for n in names) ** 0.5
    out = []
    for k in range(length):
        sq = sum((solver.history[n][min(k, len(solver.history[n]) - 1)] * solver.rhs_norm[n]) ** 2 for n in names)
        out.append(sq**0.5 / total_b)
    return out
