"""Uncertainty-based gradient matching (001): task addition (Eq. 12) and task removal (Eq. 13)."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from torch import Tensor

from modelmerge.curvature import CurvatureSpec, Scalar, curvature_for, linear_combination
from modelmerge.merge.core import merge_parameters
from modelmerge.solve import ConjugateGradient
from modelmerge.statedict import MergeInputError, StateDict, check_alphas


def gradient_matching(
    base: StateDict,
    models: Sequence[StateDict],
    curvatures: Sequence[CurvatureSpec],
    base_curvature: CurvatureSpec,
    alphas: Sequence[float] | float = 1.0,
    delta: float = 0.0,
    out: MutableMapping[str, Tensor] | None = None,
    solver: ConjugateGradient | None = None,
) -> MutableMapping[str, Tensor]:
    """001 Eq. 12: theta = theta_0 + sum_t alpha_t Hbar^-1 (H_0 + H_t)(theta_t - theta_0).

    Hbar = H_0 + sum_t alpha_t H_t, with H_0 <- H_0 + delta I (001 App. B). ``curvatures`` are the H_t of the
    task models (e.g. diagonal Fishers, F_sum or F_avg), ``base_curvature`` is H_0. Special cases (001
    Table 1): H_t = 0 gives task arithmetic (and the mean for alpha_t = 1/T); H_0 = 0 gives Fisher averaging;
    H_0 = 0 with 0/1 masks H_t gives sparse fine-tuning. Where Hbar has exact zeros on a diagonal (every H is
    zero there) the update is zero (Moore-Penrose).

    Scalar/diagonal/dense/Gram curvature is inverted in closed form. Sums without one (K-FAC, or Gram mixed
    with diagonal) are solved by conjugate gradients (``solver``; 100 iterations by default) started from the
    task-arithmetic update sum_t alpha_t tau_t. Wrap a K-FAC/Gram mapping in ``WithFallback`` to say which
    curvature the parameters it does not cover (biases, norms, embeddings) use.
    """
    if len(curvatures) != len(models):
        raise MergeInputError(None, f"got {len(curvatures)} curvatures for {len(models)} models")
    if delta < 0:
        raise MergeInputError(None, f"delta must be >= 0, got {delta}")
    a = check_alphas(alphas, len(models))

    def rule(name: str, theta0: Tensor, thetas: list[Tensor]) -> Tensor:
        h0 = curvature_for(base_curvature, name, theta0, label="base curvature H_0") + Scalar(delta)
        # 001 numbers the task models 1..T (H_0 is the base's): model i of the list has curvature H_{i+1}
        hs = [curvature_for(h, name, theta0, label=f"curvature H_{i + 1} (model {i})") for i, h in enumerate(curvatures)]
        hbar = linear_combination([1.0, *a], [h0, *hs])
        taus = [t - theta0 for t in thetas]
        rhs = sum(at * (h0 + h).mv(tau) for at, h, tau in zip(a, hs, taus))
        x0 = sum(at * tau for at, tau in zip(a, taus))
        return theta0 + hbar.solve(rhs, name, x0=x0, solver=solver)

    return merge_parameters(base, models, rule, out=out, desc="gradient matching")


def task_removal(
    base: StateDict,
    model: StateDict,
    rest_curvature: CurvatureSpec,
    base_curvature: CurvatureSpec,
    curvature: CurvatureSpec,
    alpha: float = 1.0,
    delta: float = 0.0,
    out: MutableMapping[str, Tensor] | None = None,
    solver: ConjugateGradient | None = None,
) -> MutableMapping[str, Tensor]:
    """001 Eq. 13: theta = theta_0 - alpha Hbar_rest^-1 (H_0 + H_t)(theta_t - theta_0).

    Hbar_rest = ``rest_curvature`` + delta I is the curvature of the base model's objective on its data
    without the removed task D_t (delta = the base model's weight decay); H_0 is the fine-tuning penalty and
    H_t the task model's curvature on D_t. For linear regression with alpha = 1 this is exactly the
    influence-function update of Cook (1977), i.e. retraining without D_t (001 Theorem 1). Without a closed
    form the solve runs conjugate gradients from the task-arithmetic direction tau_t.
    """
    if delta < 0:
        raise MergeInputError(None, f"delta must be >= 0, got {delta}")
    (a,) = check_alphas([alpha], 1, name="alpha")

    def rule(name: str, theta0: Tensor, thetas: list[Tensor]) -> Tensor:
        hrest = curvature_for(rest_curvature, name, theta0, label="rest curvature") + Scalar(delta)
        h0 = curvature_for(base_curvature, name, theta0, label="base curvature H_0")
        ht = curvature_for(curvature, name, theta0, label="task curvature H_t")
        tau = thetas[0] - theta0
        return theta0 - a * hrest.solve((h0 + ht).mv(tau), name, x0=tau, solver=solver)

    return merge_parameters(base, [model], rule, out=out, desc="task removal")
