"""Conjugate gradients for H x = b with H given only through products (002 Sec. 4, App. B)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


@dataclass
class ConjugateGradient:
    """Conjugate gradients on tensors of any shape, with a fixed iteration budget.

    ``tol`` stops early once ||b - H x|| <= tol ||b|| (0 runs the whole budget, as MaTS does).
    ``history[name]`` keeps the relative residuals ||b - H x_k|| / ||b|| for k = 0, 1, ... of every solve.
    """

    max_iter: int = 100
    tol: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)

    def __call__(self, mv: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, name: str = "?") -> Tensor:
        """argmin_x 1/2 x^T H x - b^T x, i.e. H x = b, from x0 (zeros by default)."""
        x = torch.zeros_like(b) if x0 is None else x0.clone()
        r = b - mv(x) if x0 is not None else b.clone()
        b_norm = float(b.norm()) or 1.0
        rs = _dot(r, r)
        hist = [float(rs.sqrt()) / b_norm]
        p = r.clone()
        for _ in range(self.max_iter):
            if hist[-1] <= self.tol or float(rs) == 0.0:
                break
            hp = mv(p)
            curvature = _dot(p, hp)
            if float(curvature) <= 0:  # p lies in the null space of a semi-definite H: nothing left to fit
                break
            step = rs / curvature
            x = x + step * p
            r = r - step * hp
            rs_new = _dot(r, r)
            hist.append(float(rs_new.sqrt()) / b_norm)
            p = r + (rs_new / rs) * p
            rs = rs_new
        self.history[name] = hist
        return x
