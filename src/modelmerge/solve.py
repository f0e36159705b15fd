"""Conjugate gradients for H x = b with H given only through products (002 Sec. 4, App. B), made robust to the
scale and the rounding of small float32 systems, with an optional preconditioner (beyond 002).

Numerics (why each step is there):

* **Scale.** Each solve divides H and b by alpha = 2^round(log2 ||H v|| / ||v||), a power of two (exact in
  floating point), so that a Fisher whose entries are 1e-5 or 1e-25 runs the same arithmetic: the iterates do not
  depend on the overall scale of the system, and products of tiny vectors with tiny curvature do not underflow.
* **Scalars in float64.** The step, the recurrence's ratio and the stopping test are Python floats (float64); the
  inner products are BLAS reductions in the vectors' dtype (a float64 copy of every vector would cost more than
  the products), which the rescaling keeps far from float32's underflow.
* **A stop at the rounding floor.** Once ||r_k|| <= eps (||b|| + ||H|| ||x_k||) (eps: the vectors' machine epsilon,
  ||H|| the largest Rayleigh quotient seen) the iterate solves the system as well as its precision can represent:
  further iterations only fit rounding noise, whose steps p^T H p underflow and whose directions are no longer
  conjugate, so the plain recurrence can blow up (002 Fig. 3 at 200 iterations did). The solve stops there and
  keeps x_k for every larger budget: the iteration budget stays the one hyperparameter, and once a solve has
  stopped more iterations cannot change its iterate (before that, CG's objective falls with every iteration in exact
  arithmetic; in float32 the tests check it over 1,000 iterations of a singular, ill-conditioned K-FAC system).
* **Non-finite values** (an overflowing product, a NaN in the curvature) stop the solve at its last finite iterate
  and are recorded in ``breakdown``, never counted as convergence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor

#: preconditioners the solver knows: none (002's plain CG) or the curvature's own approximate inverse, which for a
#: sum of K-FACs is Kronecker-factored (see ``modelmerge.curvature.base.SumCurvature.preconditioner``)
PRECONDITIONERS = ("none", "kronecker")


class Operator(Protocol):
    """What the solver needs of a curvature: products, and (preconditioned) an approximate inverse."""

    def mv(self, x: Tensor) -> Tensor: ...

    def preconditioner(self) -> Callable[[Tensor], Tensor] | None: ...


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> over every entry: one BLAS reduction in the vectors' dtype, returned as a Python (float64) scalar."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _norm64(a: Tensor) -> float:
    """||a|| in float64 (the unscaled vectors' norms, which a float32 reduction could overflow or underflow)."""
    return float(torch.linalg.vector_norm(a.reshape(-1), dtype=torch.float64))


def _power_of_two(x: float) -> float:
    """2^round(log2 x) for finite x > 0, else 1: a rescaling that floating point applies exactly."""
    return 2.0 ** round(math.log2(x)) if x > 0 and math.isfinite(x) else 1.0


@dataclass
class ConjugateGradient:
    """(Preconditioned) conjugate gradients on tensors of any shape, with a fixed iteration budget.

    ``tol`` stops early once ||b - H x|| <= tol ||b|| (0 runs the whole budget, as MaTS does); a solve also stops
    once its residual reaches the rounding floor of its dtype (``converged[name]`` records the iteration), where
    more iterations could only fit noise. ``preconditioner="kronecker"`` runs PCG with the curvature's
    approximate inverse (``Curvature.preconditioner``: exact for closed forms, Kronecker-factored for sums of
    K-FACs, a pseudo-inverse where the factors do not resolve the curvature, whose directions then keep x0's values)
    when the solve is given the curvature (``solve``), not just its product.
    ``history[name]`` keeps the relative residuals ||b - H x_k|| / ||b|| for k = 0, 1, ... of every solve (the
    recurrence's residual) and ``rhs_norm[name]`` its ||b||. ``keep`` lists iteration counts k whose iterate x_k
    is stored in ``iterates[name][k]``, so one solve of ``max_iter`` iterations yields every shorter budget too (a
    solve that stops early stores its final x for the remaining k). ``breakdown[name]`` records a solve that met a
    non-finite step and stopped at its last finite iterate (the tests assert it does not happen). With
    ``track_objective``, ``objective[name][k]`` is f(x_k) - f(x_0), f(x) = 1/2 x^T H x - b^T x, summed from each
    step's exact change -step p^T r_k + step^2 p^T H p / 2 (one more inner product per iteration, no product with H,
    and no cancellation against f's large constant part), so an objective curve needs no kept iterates.
    """

    max_iter: int = 100
    tol: float = 0.0
    keep: tuple[int, ...] = ()
    preconditioner: Literal["none", "kronecker"] = "none"
    track_objective: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    objective: dict[str, list[float]] = field(default_factory=dict)
    rhs_norm: dict[str, float] = field(default_factory=dict)
    iterates: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    converged: dict[str, int] = field(default_factory=dict)
    breakdown: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keep = tuple(sorted(set(int(k) for k in self.keep)))
        if self.keep and (self.keep[0] < 0 or self.keep[-1] > self.max_iter):
            raise ValueError(f"keep must lie in [0, max_iter = {self.max_iter}], got {self.keep}")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {self.preconditioner!r}")

    def solve(self, h: Operator, b: Tensor, x0: Tensor | None = None, name: str = "?") -> Tensor:
        """H^-1 b from x0 for a curvature H: plain CG, or PCG with ``h.preconditioner()`` when configured."""
        precondition = h.preconditioner() if self.preconditioner != "none" else None
        return self(h.mv, b, x0, name, precondition)

    def __call__(self, mv: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, name: str = "?",
                 precondition: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """argmin_x 1/2 x^T H x - b^T x, i.e. H x = b, from x0 (zeros by default); ``precondition(r)`` ~ H^-1 r."""
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        self.converged.pop(name, None)  # a solver reused for the same name reports this solve's stop only
        self.breakdown.pop(name, None)
        b_norm = _norm64(b)
        start = x0 is not None and bool(x.any())
        probe = x if start else b
        h_probe = mv(probe)
        probe_norm = _norm64(probe)
        rayleigh = _norm64(h_probe) / probe_norm if probe_norm > 0 else 0.0
        # alpha ~ ||H||, a power of two: the solve runs on H / alpha and b / alpha (the same x, rescaled exactly)
        alpha = _power_of_two(rayleigh)
        h_norm = rayleigh / alpha  # ||H / alpha||, raised to the largest Rayleigh quotient p^T H p / p^T p seen
        r = (b - h_probe) / alpha if start else b / alpha
        del h_probe
        eps = torch.finfo(b.dtype).eps
        b_hat = b_norm / alpha
        rs = _dot(r, r)
        hist = [math.sqrt(rs) / (b_hat or 1.0)]
        kept: dict[int, Tensor] = {0: x.clone()} if 0 in self.keep else {}
        change = [0.0] if self.track_objective else None
        z = r if precondition is None else alpha * precondition(r)
        rz = rs if precondition is None else _dot(r, z)
        p = z.clone()
        for it in range(1, self.max_iter + 1):
            if hist[-1] <= self.tol or rs == 0.0:
                break
            if math.sqrt(rs) <= eps * (b_hat + h_norm * math.sqrt(_dot(x, x))):
                self.converged[name] = it - 1  # at the rounding floor: more steps would only fit noise
                break
            hp = mv(p)
            hp = hp / alpha if hp is p else hp.div_(alpha)
            pp, curvature = _dot(p, p), _dot(p, hp)
            if not (math.isfinite(curvature) and math.isfinite(pp)):  # an overflow or a NaN in H p
                self.breakdown[name] = it
                break
            if curvature <= 0:  # p lies in the null space of a semi-definite H: nothing left to fit
                self.converged[name] = it - 1
                break
            h_norm = max(h_norm, curvature / pp)
            step = rz / curvature
            if not math.isfinite(step):
                self.breakdown[name] = it
                break
            if change is not None:  # f(x + step p) - f(x) in the unscaled system (alpha x the scaled one's)
                change.append(change[-1] + alpha * step * (0.5 * step * curvature - _dot(p, r)))
            x.add_(p, alpha=step)
            r.add_(hp, alpha=-step)
            del hp
            rs = _dot(r, r)
            if not math.isfinite(rs):  # x took a finite step; its residual overflowed
                self.breakdown[name] = it
                break
            hist.append(math.sqrt(rs) / (b_hat or 1.0))
            if precondition is None:
                z, rz_new = r, rs
            else:
                z = alpha * precondition(r)
                rz_new = _dot(r, z)
            p.mul_(rz_new / rz).add_(z)
            rz = rz_new
            if it in self.keep:
                kept[it] = x.clone()
        for k in self.keep:
            kept.setdefault(k, x)
        self.history[name] = hist
        self.rhs_norm[name] = b_norm
        if change is not None:
            self.objective[name] = change
        if self.keep:
            self.iterates[name] = kept
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
