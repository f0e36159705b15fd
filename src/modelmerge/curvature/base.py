"""Curvature of one parameter tensor H, as an operator on tensors shaped like the parameter.

Forms: ``Scalar`` (c I), ``Diagonal``, ``Dense`` (explicit matrix over the flattened tensor), ``Gram``
(RegMean: I (x) G for a linear layer's weight, i.e. W -> W G) and ``KFAC`` (B (x) A, i.e. W -> B W A for an
``nn.Linear`` weight of shape out x in). Every form has ``mv`` (H x), ``solve`` (H^-1 b), scaling and addition.
Sums with a closed form stay in that form (scalar + diagonal = diagonal, Gram + Gram = Gram, ...); any other
sum (e.g. two K-FACs) is a ``SumCurvature`` whose ``solve`` runs conjugate gradients on products only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from modelmerge.solve import ConjugateGradient
from modelmerge.statedict import MergeInputError

#: solver used when a sum has no closed form and the caller did not pass one
DEFAULT_SOLVER = ConjugateGradient(max_iter=100, tol=1e-10)
#: a Kronecker-factored preconditioner inverts only the eigenvalue products its factors resolve: products below this
#: fraction of the largest (float32's machine epsilon, the precision curvature factors are estimated and stored in)
#: are taken as zero, a pseudo-inverse, so PCG takes no step along them and they keep the start's values. The sum of
#: float32 K-FACs is indefinite at that level (eigenvalues of both signs ~1e-7 of the largest): a preconditioner that
#: inverts those directions (the previous one floored them at 1e-8) walks PCG along them, where the merge objective
#: is flat or unbounded below. Measured on the suite's K-FAC objective from task arithmetic (objective, distance from
#: the start, validation Avg. after 100 PCG iterations): floored at 1e-8: -1.53e-2 (negative), 2.7e4, 38.1;
#: pseudo-inverse at 1.19e-7: 5.46e-3, 7.6, 77.1; at 1e-6: 5.51e-3, 5.7, 77.0 (plain CG: 6.86e-3 at 100 and
#: 5.49e-3 at 1,000 iterations).
PRECONDITIONER_CUTOFF = float(torch.finfo(torch.float32).eps)

Preconditioner = Callable[[Tensor], Tensor]


class Curvature(ABC):
    """A symmetric positive semi-definite operator acting on tensors shaped like one parameter."""

    @abstractmethod
    def mv(self, x: Tensor) -> Tensor:
        """H x for x shaped like the parameter."""

    def solve(
        self, b: Tensor, name: str = "?", x0: Tensor | None = None, solver: ConjugateGradient | None = None
    ) -> Tensor:
        """H^-1 b. Closed forms ignore ``x0``/``solver``; forms without one run conjugate gradients."""
        return (solver or DEFAULT_SOLVER).solve(self, b, x0, name)

    def preconditioner(self) -> Preconditioner | None:
        """r -> M^-1 r with M ~ H, for preconditioned CG: H's (pseudo-)inverse where it has a closed form."""
        return None

    @abstractmethod
    def scale(self, c: float) -> Curvature:
        """c H."""

    @abstractmethod
    def check(self, name: str, param: Tensor) -> None:
        """Raise MergeInputError (naming ``name``) unless H fits ``param`` and is positive semi-definite."""

    @abstractmethod
    def to_dense(self, param: Tensor) -> Tensor:
        """The explicit numel x numel matrix acting on the row-major flattened parameter (tests, small sizes)."""

    def _add(self, other: Curvature) -> Curvature | None:
        """self + other in closed form, or None when there is none."""
        return None

    def __mul__(self, c: float) -> Curvature:
        return self.scale(float(c))

    __rmul__ = __mul__

    def __add__(self, other: Curvature) -> Curvature:
        if not isinstance(other, Curvature):
            return NotImplemented
        total = self._add(other)
        if total is None:
            total = other._add(self)
        if total is None:
            left = self.terms if isinstance(self, SumCurvature) else [self]
            right = other.terms if isinstance(other, SumCurvature) else [other]
            total = SumCurvature(left + right)
        return total


class Scalar(Curvature):
    """H = c I (c = 0 gives the zero matrix, c = N gives N I)."""

    def __init__(self, c: float = 1.0):
        self.c = float(c)

    def __repr__(self) -> str:
        return f"Scalar({self.c:g})"

    def mv(self, x: Tensor) -> Tensor:
        return self.c * x

    def solve(self, b, name="?", x0=None, solver=None) -> Tensor:
        if self.c > 0:
            return b / self.c
        if self.c == 0 and not bool(b.any()):
            return torch.zeros_like(b)
        raise MergeInputError(name, f"curvature {self.c:g} I is not positive, cannot solve H x = b")

    def preconditioner(self) -> Preconditioner | None:
        return (lambda r: r / self.c) if self.c > 0 else None

    def scale(self, c: float) -> Scalar:
        return Scalar(self.c * c)

    def check(self, name: str, param: Tensor) -> None:
        if not torch.isfinite(torch.tensor(self.c)) or self.c < 0:
            raise MergeInputError(name, f"curvature {self.c:g} I must be finite and non-negative")

    def to_dense(self, param: Tensor) -> Tensor:
        return self.c * torch.eye(param.numel(), dtype=param.dtype, device=param.device)

    def _add(self, other: Curvature) -> Curvature | None:
        return Scalar(self.c + other.c) if isinstance(other, Scalar) else None


def Identity() -> Scalar:  # noqa: N802 - reads like the matrix it builds
    """H = I."""
    return Scalar(1.0)


def _check_finite(name: str, t: Tensor, what: str) -> None:
    if not isinstance(t, Tensor):
        raise MergeInputError(name, f"{what} is a {type(t).__name__}, expected a tensor")
    if not bool(torch.isfinite(t).all()):
        raise MergeInputError(name, f"{what} has non-finite values (NaN or inf)")


class Diagonal(Curvature):
    """H = diag(d), d shaped like the parameter (e.g. a diagonal Fisher)."""

    def __init__(self, d: Tensor):
        self.d = d

    def __repr__(self) -> str:
        return f"Diagonal(shape={tuple(self.d.shape)})"

    def _d(self, like: Tensor) -> Tensor:
        return self.d.to(dtype=like.dtype, device=like.device)

    def mv(self, x: Tensor) -> Tensor:
        return self._d(x) * x

    def solve(self, b, name="?", x0=None, solver=None) -> Tensor:
        d = self._d(b)
        positive = d > 0
        bad = ~positive & (b != 0)
        if bool(bad.any()):
            raise MergeInputError(
                name, f"diagonal curvature is <= 0 at {int(bad.sum())} entries where the right-hand side is non-zero"
            )
        return torch.where(positive, b / torch.where(positive, d, torch.ones_like(d)), torch.zeros_like(b))

    def preconditioner(self) -> Preconditioner:
        """r / d where d > 0, 0 where d = 0 (the pseudo-inverse)."""
        inv = torch.where(self.d > 0, 1.0 / torch.where(self.d > 0, self.d, torch.ones_like(self.d)), 0.0)
        return lambda r: r * inv.to(dtype=r.dtype, device=r.device)

    def scale(self, c: float) -> Diagonal:
        return Diagonal(self.d * c)

    def check(self, name: str, param: Tensor) -> None:
        _check_finite(name, self.d, "diagonal curvature")
        if tuple(self.d.shape) != tuple(param.shape):
            raise MergeInputError(
                name, f"shape mismatch: curvature has {tuple(self.d.shape)}, parameter has {tuple(param.shape)}"
            )
        if bool((self.d < 0).any()):
            n_neg = int((self.d < 0).sum())
            raise MergeInputError(name, f"curvature has {n_neg} negative entries (min {float(self.d.min()):.3g})")

    def to_dense(self, param: Tensor) -> Tensor:
        return torch.diag(self._d(param).reshape(-1))

    def _add(self, other: Curvature) -> Curvature | None:
        if isinstance(other, Scalar):
            return Diagonal(self.d + other.c)
        if isinstance(other, Diagonal):
            return Diagonal(self.d + other.d.to(self.d.dtype))
        return None


class Dense(Curvature):
    """H = M, an explicit symmetric numel x numel matrix over the row-major flattened parameter."""

    def __init__(self, m: Tensor):
        self.m = m

    def __repr__(self) -> str:
        return f"Dense({tuple(self.m.shape)})"

    def _m(self, like: Tensor) -> Tensor:
        return self.m.to(dtype=like.dtype, device=like.device)

    def mv(self, x: Tensor) -> Tensor:
        return (self._m(x) @ x.reshape(-1)).reshape(x.shape)

    def solve(self, b, name="?", x0=None, solver=None) -> Tensor:
        chol = _cholesky(self._m(b), name, "dense curvature", jitter=False)
        return torch.cholesky_solve(b.reshape(-1, 1), chol).reshape(b.shape)

    def preconditioner(self) -> Preconditioner:
        return self.solve

    def scale(self, c: float) -> Dense:
        return Dense(self.m * c)

    def check(self, name: str, param: Tensor) -> None:
        n = param.numel()
        if tuple(self.m.shape) != (n, n):
            raise MergeInputError(name, f"shape mismatch: dense curvature is {tuple(self.m.shape)}, need ({n}, {n})")
        _check_psd(name, self.m, "dense curvature", full=True)

    def to_dense(self, param: Tensor) -> Tensor:
        return self._m(param)

    def _add(self, other: Curvature) -> Curvature | None:
        n = self.m.shape[0]
        if isinstance(other, Scalar):
            return Dense(self.m + other.c * torch.eye(n, dtype=self.m.dtype, device=self.m.device))
        if isinstance(other, Diagonal):
            return Dense(self.m + torch.diag(other.d.reshape(-1).to(self.m.dtype)))
        if isinstance(other, Dense):
            return Dense(self.m + other.m.to(self.m.dtype))
        return None


#: matrices that passed ``_check_psd``: tensor -> (its in-place version counter, whether the full check ran). A
#: factor read by every merge-objective evaluation is checked once, not on every read (an in-place change of the
#: tensor or of a view of it bumps its version and brings the check back; writes through ``.data`` or shared numpy
#: memory do not, as autograd's own version checks do not see them).
_PSD_CHECKED = WeakIdKeyDictionary()


def _check_psd(name: str, m: Tensor, what: str, full: bool) -> None:
    """Symmetric, finite, and (``full``) no negative eigenvalue or (cheap) no negative diagonal entry."""
    if m.is_inference():  # no version counter: checked on every read
        _check_psd_now(name, m, what, full)
        return
    seen = _PSD_CHECKED.get(m)
    if seen is not None and seen[0] == m._version and (seen[1] or not full):
        return
    _check_psd_now(name, m, what, full)
    _PSD_CHECKED[m] = (m._version, full)


def _check_psd_now(name: str, m: Tensor, what: str, full: bool) -> None:
    _check_finite(name, m, what)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MergeInputError(name, f"{what} must be a square matrix, got {tuple(m.shape)}")
    m64 = m.to(torch.float64)
    scale = max(float(m64.abs().max()) if m.numel() else 0.0, 1e-300)
    if not torch.allclose(m64, m64.T, atol=1e-6 * scale, rtol=0):
        raise MergeInputError(name, f"{what} is not symmetric")
    if bool((m64.diagonal() < 0).any()):
        raise MergeInputError(name, f"{what} has a negative diagonal entry")
    if full and m.numel() and float(torch.linalg.eigvalsh(m64).min()) < -1e-10 * scale:
        raise MergeInputError(name, f"{what} has a negative eigenvalue")


def _cholesky(m: Tensor, name: str, what: str, jitter: bool = True) -> Tensor:
    """Lower Cholesky factor; with ``jitter``, add 1e-10, 1e-9, ... times the mean diagonal until it exists."""
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return chol
    if jitter:
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        base = float(m.diagonal().mean().abs()) or 1.0
        for k in range(-10, 0):
            chol, info = torch.linalg.cholesky_ex(m + (base * 10.0**k) * eye)
            if int(info) == 0:
                return chol
    raise MergeInputError(name, f"{what} is not positive definite, cannot solve H x = b (add damping delta)")


def _weight_axes(param_shape: tuple[int, ...], in_axis: int) -> tuple[int, int]:
    if len(param_shape) != 2 or in_axis not in (0, 1):
        raise ValueError("Gram and K-FAC curvature act on 2-D weights with the input on axis 0 or 1")
    return param_shape[in_axis], param_shape[1 - in_axis]


class Gram(Curvature):
    """RegMean's curvature of a linear layer: H = I_out (x) G with G the input Gram matrix (002 Eq. 5).

    ``in_axis`` says which axis of the weight meets the input: 1 for ``nn.Linear`` (out x in; H W = W G),
    0 for GPT-2's ``Conv1D`` (in x out; H W = G W).
    """

    def __init__(self, G: Tensor, in_axis: int = 1):
        self.G, self.in_axis = G, in_axis

    def __repr__(self) -> str:
        return f"Gram({tuple(self.G.shape)}, in_axis={self.in_axis})"

    def mv(self, x: Tensor) -> Tensor:
        G = self.G.to(dtype=x.dtype, device=x.device)
        return x @ G if self.in_axis == 1 else G @ x

    def solve(self, b, name="?", x0=None, solver=None) -> Tensor:
        chol = _cholesky(self.G.to(dtype=b.dtype, device=b.device), name, "Gram matrix")
        if self.in_axis == 1:  # W G = R  <=>  G W^T = R^T
            return torch.cholesky_solve(b.T, chol).T
        return torch.cholesky_solve(b, chol)

    def preconditioner(self) -> Preconditioner:
        return self.solve

    def scale(self, c: float) -> Gram:
        return Gram(self.G * c, self.in_axis)

    def check(self, name: str, param: Tensor) -> None:
        d_in, _ = _weight_axes(tuple(param.shape), self.in_axis)
        if tuple(self.G.shape) != (d_in, d_in):
            raise MergeInputError(name, f"shape mismatch: Gram is {tuple(self.G.shape)}, weight input size is {d_in}")
        _check_psd(name, self.G, "Gram matrix", full=False)

    def to_dense(self, param: Tensor) -> Tensor:
        _, d_out = _weight_axes(tuple(param.shape), self.in_axis)
        G = self.G.to(dtype=param.dtype, device=param.device)
        eye = torch.eye(d_out, dtype=param.dtype, device=param.device)
        return torch.kron(eye, G) if self.in_axis == 1 else torch.kron(G, eye)

    def _add(self, other: Curvature) -> Curvature | None:
        if isinstance(other, Scalar):
            return Gram(self.G + other.c * torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device), self.in_axis)
        if isinstance(other, Gram) and other.in_axis == self.in_axis:
            return Gram(self.G + other.G.to(self.G.dtype), self.in_axis)
        return None


class KFAC(Curvature):
    """K-FAC curvature of a linear layer: H = c B (x) A + delta I, A the input Gram, B the output-gradient Gram
    (002 Eq. 11), delta >= 0 a damping (``KFAC + Scalar`` gives it).

    For ``nn.Linear`` (``in_axis=1``, weight out x in) H W = c B W A + delta W; for ``Conv1D`` (``in_axis=0``)
    H W = c A W B + delta W. Undamped, ``solve`` is B^-1 R A^-1 by Cholesky; damped, it is exact in the factors'
    eigenbases, A = U diag(a) U^T and B = V diag(b) V^T: W = V [(V^T R U) / (c b a^T + delta)] U^T (eigenbases
    computed once per factor pair in float64 and shared by every damping).
    """

    def __init__(self, A: Tensor, B: Tensor, in_axis: int = 1, c: float = 1.0, damping: float = 0.0,
                 _eig: dict | None = None):
        self.A, self.B, self.in_axis, self.c, self.damping = A, B, in_axis, float(c), float(damping)
        self._eig = {} if _eig is None else _eig  # device -> float64 eigendecompositions, shared with copies

    def __repr__(self) -> str:
        damped = f", damping={self.damping:g}" if self.damping else ""
        return f"KFAC(A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, in_axis={self.in_axis}{damped})"

    def _factors(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return self.A.to(dtype=like.dtype, device=like.device), self.B.to(dtype=like.dtype, device=like.device)

    def mv(self, x: Tensor) -> Tensor:
        A, B = self._factors(x)
        out = B @ x @ A if self.in_axis == 1 else A @ x @ B
        if self.c != 1.0:
            out.mul_(self.c)
        return out.add_(x, alpha=self.damping) if self.damping else out

    def _eigh(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Eigendecompositions of A and B in float64 (a tiny damping resolves the small eigenvalues, which float32
        round-off would swamp), cached per device."""
        if device not in self._eig:
            a, U = torch.linalg.eigh(self.A.to(device=device, dtype=torch.float64))
            b, V = torch.linalg.eigh(self.B.to(device=device, dtype=torch.float64))
            self._eig[device] = (a.clamp_min(0), U, b.clamp_min(0), V)  # PSD factors: round-off negatives are 0
        return self._eig[device]

    def solve(self, b, name="?", x0=None, solver=None) -> Tensor:
        if self.c < 0 or (self.c == 0 and self.damping <= 0):
            raise MergeInputError(name, "K-FAC curvature with a non-positive scale and no damping cannot be inverted")
        if self.damping > 0:
            a, U, bb, V = self._eigh(b.device)
            r = b.to(torch.float64)
            if self.in_axis == 1:  # rows meet B, columns meet A
                x = V @ ((V.T @ r @ U) / (self.c * bb[:, None] * a[None, :] + self.damping)) @ U.T
            else:
                x = U @ ((U.T @ r @ V) / (self.c * a[:, None] * bb[None, :] + self.damping)) @ V.T
            return x.to(b.dtype)
        A, B = self._factors(b)
        ca = _cholesky(A, name, "K-FAC input factor A", jitter=False)
        cb = _cholesky(B, name, "K-FAC output-gradient factor B", jitter=False)
        if self.in_axis == 1:  # B W A = R  ->  W = B^-1 R A^-1
            return torch.cholesky_solve(torch.cholesky_solve(b, cb).T, ca).T / self.c
        return torch.cholesky_solve(torch.cholesky_solve(b, ca).T, cb).T / self.c

    def preconditioner(self) -> Preconditioner | None:
        """The exact inverse in the factors' eigenbases (products below the cutoff taken as zero, as in a sum's)."""
        a, U, b, V = self._eigh(self.A.device)
        return _kronecker_inverse(self.c * a, U, b, V, self.damping, self.in_axis)

    def scale(self, c: float) -> KFAC:
        return KFAC(self.A, self.B, self.in_axis, self.c * c, self.damping * c, self._eig)

    def _add(self, other: Curvature) -> Curvature | None:
        if isinstance(other, Scalar) and other.c >= 0:
            return KFAC(self.A, self.B, self.in_axis, self.c, self.damping + other.c, self._eig)
        return None

    def check(self, name: str, param: Tensor) -> None:
        d_in, d_out = _weight_axes(tuple(param.shape), self.in_axis)
        if tuple(self.A.shape) != (d_in, d_in) or tuple(self.B.shape) != (d_out, d_out):
            raise MergeInputError(
                name,
                f"shape mismatch: K-FAC factors are A {tuple(self.A.shape)}, B {tuple(self.B.shape)}; "
                f"the weight needs A ({d_in}, {d_in}) and B ({d_out}, {d_out})",
            )
        _check_psd(name, self.A, "K-FAC factor A", full=False)
        _check_psd(name, self.B, "K-FAC factor B", full=False)
        if self.c < 0 or self.damping < 0:
            raise MergeInputError(name, f"K-FAC curvature has a negative scale {self.c:g} or damping {self.damping:g}")

    def to_dense(self, param: Tensor) -> Tensor:
        A, B = self._factors(param)
        dense = self.c * (torch.kron(B, A) if self.in_axis == 1 else torch.kron(A, B))
        return dense + self.damping * torch.eye(param.numel(), dtype=param.dtype, device=param.device)


class SumCurvature(Curvature):
    """H = sum_i H_i with no closed-form inverse; ``solve`` runs conjugate gradients (002 Eqs. 13-14)."""

    def __init__(self, terms: list[Curvature]):
        self.terms = terms

    def __repr__(self) -> str:
        return "SumCurvature(" + " + ".join(map(repr, self.terms)) + ")"

    def mv(self, x: Tensor) -> Tensor:
        out = self.terms[0].mv(x)
        out = out.clone() if out is x else out
        for h in self.terms[1:]:
            out.add_(h.mv(x))  # accumulated in place: one buffer, not one per term
        return out

    def preconditioner(self) -> Preconditioner | None:
        """For sum_m c_m B_m (x) A_m + delta I (plus scalar or diagonal terms, taken at their mean as damping):
        M = (sum_m c_m B_m) (x) (sum_m c_m A_m) / sum_m c_m + delta I, inverted in its factors' eigenbases (a
        pseudo-inverse: eigenvalue products below PRECONDITIONER_CUTOFF x the largest count as zero).

        Exact when every model shares one factor pair (then M = H); costs two eigendecompositions once and four
        matrix products per application (the price of two K-FAC products). Other sums get none (plain CG).
        """
        kfacs = [h for h in self.terms if isinstance(h, KFAC)]
        rest = [h for h in self.terms if not isinstance(h, KFAC)]
        if not kfacs or any(not isinstance(h, Scalar | Diagonal) for h in rest):
            return None
        in_axis = kfacs[0].in_axis
        if any(h.in_axis != in_axis for h in kfacs):
            return None
        total = sum(h.c for h in kfacs)
        if total <= 0:
            return None
        A = sum(h.c * h.A.double() for h in kfacs)
        B = sum(h.c * h.B.double() for h in kfacs) / total
        damping = sum(h.damping for h in kfacs)
        damping += sum(h.c if isinstance(h, Scalar) else float(h.d.double().mean()) for h in rest)
        a, U = torch.linalg.eigh(A)
        b, V = torch.linalg.eigh(B)
        return _kronecker_inverse(a.clamp_min(0), U, b.clamp_min(0), V, damping, in_axis)

    def scale(self, c: float) -> SumCurvature:
        return SumCurvature([h.scale(c) for h in self.terms])

    def check(self, name: str, param: Tensor) -> None:
        for h in self.terms:
            h.check(name, param)

    def to_dense(self, param: Tensor) -> Tensor:
        return sum(h.to_dense(param) for h in self.terms)


def _kronecker_inverse(a: Tensor, U: Tensor, b: Tensor, V: Tensor, damping: float, in_axis: int) -> Preconditioner:
    """R -> (B (x) A + damping I)^-1 R with A = U diag(a) U^T, B = V diag(b) V^T (``in_axis`` 1: R is out x in,
    W -> B W A; 0: R is in x out, W -> A W B), inverting only the eigenvalue products of at least
    PRECONDITIONER_CUTOFF x the largest (a pseudo-inverse: a singular or rounding-level indefinite sum gets no step
    along its null space). The inverse products are applied in the residual's dtype, so in float32 the curvature's
    eigenvalue products must stay within about 1e-30 to 1e30 (the tests check factors scaled by 1e-10 and 1e10)."""
    d = b[:, None] * a[None, :] + damping if in_axis == 1 else a[:, None] * b[None, :] + damping
    top = float(d.max()) if d.numel() else 0.0
    if not top > 0:
        return lambda r: r
    resolved = d >= PRECONDITIONER_CUTOFF * top
    inv64 = torch.where(resolved, 1.0 / torch.where(resolved, d, top), 0.0)
    left, right = (V, U) if in_axis == 1 else (U, V)
    cache: dict = {}

    def apply(r: Tensor) -> Tensor:
        key = (r.dtype, r.device)
        if key not in cache:
            cache[key] = tuple(t.to(dtype=r.dtype, device=r.device) for t in (left, inv64, right))
        L, inv, R = cache[key]
        return L @ ((L.T @ r @ R) * inv) @ R.T

    return apply


def linear_combination(coeffs: list[float], terms: list[Curvature]) -> Curvature:
    """sum_i coeffs_i H_i, in closed form where one exists."""
    if len(coeffs) != len(terms) or not terms:
        raise ValueError("need one coefficient per curvature term, and at least one term")
    total = terms[0].scale(coeffs[0])
    for c, h in zip(coeffs[1:], terms[1:]):
        total = total + h.scale(c)
    return total
