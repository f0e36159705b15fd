"""MaTS (002 Sec. 4): merge by solving sum_m C_m theta = sum_m C_m theta_m with conjugate gradients."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from torch import Tensor

from modelmerge.curvature import Curvature, CurvatureSpec, Identity, WithFallback, curvature_for, linear_combination
from modelmerge.merge.core import merge_parameters
from modelmerge.solve import ConjugateGradient
from modelmerge.statedict import MergeInputError, StateDict


def mats(
    base: StateDict,
    models: Sequence[StateDict],
    curvatures: Sequence[CurvatureSpec],
    init: StateDict | None = None,
    init_alpha: float = 1.0,
    fallback: CurvatureSpec | Sequence[CurvatureSpec] = Identity(),
    solver: ConjugateGradient | None = None,
    out: MutableMapping[str, Tensor] | None = None,
) -> MutableMapping[str, Tensor]:
    """Approximately solve A theta = b, A = sum_m C_m, b = sum_m C_m theta_m, by CG from an initial merge.

    The objective is chosen by the curvature C_m of each model: ``Identity()`` (averaging), diagonal Fishers
    (diagonal Fisher merging), RegMean ``Gram``s, or ``KFAC`` factors (block-diagonal Fisher merging). Only
    products C_m x are formed. Parameters a mapping does not cover use ``fallback`` (identity = averaging by
    default; pass diagonal Fishers for the diagonal Fisher rule). CG starts from ``init`` (any merged state
    dict) or, by default, from task arithmetic theta_0 + init_alpha sum_m tau_m, and runs ``solver.max_iter``
    iterations (100, no early stop, by default: MaTS's only hyperparameter; a parameter whose solve reaches its
    rounding floor stops there). ``ConjugateGradient(preconditioner="kronecker")`` runs preconditioned CG instead
    (beyond 002; a Kronecker-factored approximate inverse of sum_m B_m (x) A_m). ``solver.history`` then holds the
    relative residual ||b - A theta_k|| / ||b|| of every parameter at every iteration.
    """
    if len(curvatures) != len(models):
        raise MergeInputError(None, f"got {len(curvatures)} curvatures for {len(models)} models")
    solver = solver or ConjugateGradient(max_iter=100, tol=0.0)
    fallbacks = list(fallback) if isinstance(fallback, Sequence) else [fallback] * len(models)
    specs = [c if isinstance(c, Curvature) else WithFallback(c, f) for c, f in zip(curvatures, fallbacks)]
    n = len(models)
    inputs = [*models, init] if init is not None else list(models)

    def rule(name: str, theta0: Tensor, tensors: list[Tensor]) -> Tensor:
        thetas = tensors[:n]
        cs = [curvature_for(c, name, theta0, label=f"objective C_{i}") for i, c in enumerate(specs)]
        A = linear_combination([1.0] * n, cs)
        b = sum(c.mv(t) for c, t in zip(cs, thetas))
        x0 = tensors[n] if init is not None else theta0 + init_alpha * sum(t - theta0 for t in thetas)
        return solver.solve(A, b, x0, name)

    return merge_parameters(base, inputs, rule, out=out, desc="MaTS (conjugate gradients)")


def merge_objective(
    merged: StateDict,
    models: Sequence[StateDict],
    curvatures: Sequence[CurvatureSpec],
    fallback: CurvatureSpec | Sequence[CurvatureSpec] = Identity(),
) -> float:
    """sum_m 1/2 (theta - theta_m)^T C_m (theta - theta_m), in float64: the quadratic MaTS minimises (002 Eq. 6).

    Its minimiser is A^-1 b with A = sum_m C_m, b = sum_m C_m theta_m, so of two merges under the same C_m the
    one with the smaller value solves the linear system better (002 Sec. 6.2 compares RegMean's closed form and
    CG this way). ``curvatures`` and ``fallback`` are read as in ``mats``.
    """
    if len(curvatures) != len(models):
        raise MergeInputError(None, f"got {len(curvatures)} curvatures for {len(models)} models")
    fallbacks = list(fallback) if isinstance(fallback, Sequence) else [fallback] * len(models)
    specs = [c if isinstance(c, Curvature) else WithFallback(c, f) for c, f in zip(curvatures, fallbacks)]
    total = 0.0
    for name in merged.keys():
        theta = merged[name]
        if not theta.is_floating_point():
            continue
        theta = theta.double()
        for i, (model, spec) in enumerate(zip(models, specs)):
            c = curvature_for(spec, name, theta, label=f"objective C_{i}")
            d = theta - model[name].double()
            total += 0.5 * float((d * c.mv(d)).sum())
    return total
