"""Fisher averaging (Matena & Raffel 2022; 001 Eq. 2) with additive damping."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from torch import Tensor

from modelmerge.curvature import CurvatureSpec, Scalar, curvature_for, linear_combination
from modelmerge.merge.core import merge_parameters
from modelmerge.solve import ConjugateGradient
from modelmerge.statedict import MergeInputError, StateDict, check_alphas


def fisher_average(
    models: Sequence[StateDict],
    fishers: Sequence[CurvatureSpec],
    alphas: Sequence[float] | float = 1.0,
    delta: float = 0.0,
    out: MutableMapping[str, Tensor] | None = None,
    solver: ConjugateGradient | None = None,
) -> MutableMapping[str, Tensor]:
    """theta_FA = (sum_t alpha_t (F_t + delta I))^-1 sum_t alpha_t (F_t + delta I) theta_t.

    ``delta`` is added to every F_t (001 Sec. 4.3: adding a small delta works better than clipping), so where
    all Fishers vanish the rule falls back to the alpha-weighted average. Diagonal F_t make this elementwise;
    K-FAC F_t (block-diagonal Fisher merging, 002 Sec. 5.2) are solved by conjugate gradients from that average.
    """
    if len(fishers) != len(models):
        raise MergeInputError(None, f"got {len(fishers)} Fishers for {len(models)} models")
    if delta < 0:
        raise MergeInputError(None, f"delta must be >= 0, got {delta}")
    a = check_alphas(alphas, len(models))

    def rule(name: str, ref: Tensor, thetas: list[Tensor]) -> Tensor:
        fs = [curvature_for(f, name, ref, label=f"Fisher {i}") + Scalar(delta) for i, f in enumerate(fishers)]
        fbar = linear_combination(a, fs)
        rhs = sum(at * f.mv(t) for at, f, t in zip(a, fs, thetas))
        x0 = sum(at * t for at, t in zip(a, thetas)) / sum(a)
        return fbar.solve(rhs, name, x0=x0, solver=solver)

    return merge_parameters(models[0], models, rule, out=out, desc="Fisher averaging")
