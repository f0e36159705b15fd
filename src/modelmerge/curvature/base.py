"""Curvature of one parameter tensor: scalar (c I), diagonal, or dense over the flattened tensor.

Every form supports ``mv`` (H x), ``solve`` (H^-1 b), scaling by a number and addition. Sums of forms are
promoted to the more general one (scalar < diagonal < dense). Structured forms that cannot be inverted in
closed form (RegMean Gram, K-FAC) plug into the same interface and are solved iteratively.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from modelmerge.statedict import MergeInputError


class Curvature(ABC):
    """A symmetric positive semi-definite operator acting on tensors shaped like one parameter."""

    rank: int  # promotion order for sums: 0 scalar, 1 diagonal, 2 dense

    @abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """H x for x shaped like the parameter."""

    @abstractmethod
    def solve(self, b: Tensor, name: str = "?") -> Tensor:
        """H^-1 b (Moore-Penrose on exact zeros of a scalar/diagonal H, where b must vanish too)."""

    @abstractmethod
    def scale(self, c: float) -> Curvature:
        """c H."""

    @abstractmethod
    def check(self, name: str, param: Tensor) -> None:
        """Raise MergeInputError (naming ``name``) unless H fits ``param`` and is positive semi-definite."""

    @abstractmethod
    def to_dense(self, param: Tensor) -> Tensor:
        """The explicit numel x numel matrix (for tests and small problems)."""

    def __mul__(self, c: float) -> Curvature:
        return self.scale(float(c))

    __rmul__ = __mul__

    def __add__(self, other: Curvature) -> Curvature:
        if not isinstance(other, Curvature):
            return NotImplemented
        hi, lo = (self, other) if self.rank >= other.rank else (other, self)
        return hi._add_lower(lo)

    @abstractmethod
    def _add_lower(self, other: Curvature) -> Curvature:
        """self + other where other.rank <= self.rank."""


class Scalar(Curvature):
    """H = c I (c = 0 gives the zero matrix, c = N gives N I)."""

    rank = 0

    def __init__(self, c: float = 1.0):
        self.c = float(c)

    def __repr__(self) -> str:
        return f"Scalar({self.c:g})"

    def mv(self, x: Tensor) -> Tensor:
        return self.c * x

    def solve(self, b: Tensor, name: str = "?") -> Tensor:
        if self.c > 0:
            return b / self.c
        if self.c == 0 and not bool(b.any()):
            return torch.zeros_like(b)
        raise MergeInputError(name, f"curvature {self.c:g} I is not positive, cannot solve H x = b")

    def scale(self, c: float) -> Scalar:
        return Scalar(self.c * c)

    def check(self, name: str, param: Tensor) -> None:
        if not torch.isfinite(torch.tensor(self.c)) or self.c < 0:
            raise MergeInputError(name, f"curvature {self.c:g} I must be finite and non-negative")

    def to_dense(self, param: Tensor) -> Tensor:
        n = param.numel()
        return self.c * torch.eye(n, dtype=param.dtype, device=param.device)

    def _add_lower(self, other: Curvature) -> Curvature:
        assert isinstance(other, Scalar)
        return Scalar(self.c + other.c)


def Identity() -> Scalar:  # noqa: N802 - reads like the matrix it builds
    """H = I."""
    return Scalar(1.0)


class Diagonal(Curvature):
    """H = diag(d), d shaped like the parameter (e.g. a diagonal Fisher)."""

    rank = 1

    def __init__(self, d: Tensor):
        self.d = d

    def __repr__(self) -> str:
        return f"Diagonal(shape={tuple(self.d.shape)})"

    def _d(self, like: Tensor) -> Tensor:
        return self.d.to(dtype=like.dtype, device=like.device)

    def mv(self, x: Tensor) -> Tensor:
        return self._d(x) * x

    def solve(self, b: Tensor, name: str = "?") -> Tensor:
        d = self._d(b)
        positive = d > 0
        if bool((~positive & (b != 0)).any()):
            n_bad = int((~positive & (b != 0)).sum())
            raise MergeInputError(
                name, f"diagonal curvature is <= 0 at {n_bad} entries where the right-hand side is non-zero"
            )
        return torch.where(positive, b / torch.where(positive, d, torch.ones_like(d)), torch.zeros_like(b))

    def scale(self, c: float) -> Diagonal:
        return Diagonal(self.d * c)

    def check(self, name: str, param: Tensor) -> None:
        if not isinstance(self.d, Tensor):
            raise MergeInputError(name, f"diagonal curvature is a {type(self.d).__name__}, expected a tensor")
        if tuple(self.d.shape) != tuple(param.shape):
            raise MergeInputError(
                name, f"shape mismatch: curvature has {tuple(self.d.shape)}, parameter has {tuple(param.shape)}"
            )
        if not bool(torch.isfinite(self.d).all()):
            raise MergeInputError(name, "curvature has non-finite values (NaN or inf)")
        if bool((self.d < 0).any()):
            n_neg = int((self.d < 0).sum())
            raise MergeInputError(name, f"curvature has {n_neg} negative entries (min {float(self.d.min()):.3g})")

    def to_dense(self, param: Tensor) -> Tensor:
        return torch.diag(self._d(param).reshape(-1))

    def _add_lower(self, other: Curvature) -> Curvature:
        if isinstance(other, Scalar):
            return Diagonal(self.d + other.c)
        assert isinstance(other, Diagonal)
        return Diagonal(self.d + other.d.to(self.d.dtype))


class Dense(Curvature):
    """H = M, an explicit symmetric numel x numel matrix over the flattened parameter."""

    rank = 2

    def __init__(self, m: Tensor):
        self.m = m

    def __repr__(self) -> str:
        return f"Dense({tuple(self.m.shape)})"

    def _m(self, like: Tensor) -> Tensor:
        return self.m.to(dtype=like.dtype, device=like.device)

    def mv(self, x: Tensor) -> Tensor:
        return (self._m(x) @ x.reshape(-1)).reshape(x.shape)

    def solve(self, b: Tensor, name: str = "?") -> Tensor:
        m = self._m(b)
        chol, info = torch.linalg.cholesky_ex(m)
        if int(info) != 0:
            raise MergeInputError(name, "dense curvature is not positive definite, cannot solve H x = b")
        return torch.cholesky_solve(b.reshape(-1, 1), chol).reshape(b.shape)

    def scale(self, c: float) -> Dense:
        return Dense(self.m * c)

    def check(self, name: str, param: Tensor) -> None:
        n = param.numel()
        if tuple(self.m.shape) != (n, n):
            raise MergeInputError(name, f"shape mismatch: dense curvature is {tuple(self.m.shape)}, need ({n}, {n})")
        if not bool(torch.isfinite(self.m).all()):
            raise MergeInputError(name, "curvature has non-finite values (NaN or inf)")
        m = self.m.to(torch.float64)
        scale = float(m.abs().max()) if n else 0.0
        if not torch.allclose(m, m.T, atol=1e-10 * max(scale, 1.0), rtol=0):
            raise MergeInputError(name, "dense curvature is not symmetric")
        if n and float(torch.linalg.eigvalsh(m).min()) < -1e-10 * max(scale, 1.0):
            raise MergeInputError(name, "dense curvature has a negative eigenvalue")

    def to_dense(self, param: Tensor) -> Tensor:
        return self._m(param)

    def _add_lower(self, other: Curvature) -> Curvature:
        n = self.m.shape[0]
        if isinstance(other, Scalar):
            return Dense(self.m + other.c * torch.eye(n, dtype=self.m.dtype, device=self.m.device))
        if isinstance(other, Diagonal):
            return Dense(self.m + torch.diag(other.d.reshape(-1).to(self.m.dtype)))
        assert isinstance(other, Dense)
        return Dense(self.m + other.m.to(self.m.dtype))


def linear_combination(coeffs: list[float], terms: list[Curvature]) -> Curvature:
    """sum_i coeffs_i H_i, in the most general form among the terms."""
    if len(coeffs) != len(terms) or not terms:
        raise ValueError("need one coefficient per curvature term, and at least one term")
    total = terms[0].scale(coeffs[0])
    for c, h in zip(coeffs[1:], terms[1:]):
        total = total + h.scale(c)
    return total
