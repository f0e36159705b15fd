"""Task arithmetic (Ilharco et al. 2023; 001 Sec. 2): add or subtract scaled task vectors."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from torch import Tensor

from modelmerge.merge.core import merge_parameters
from modelmerge.statedict import StateDict, check_alphas


def task_arithmetic(
    base: StateDict,
    models: Sequence[StateDict],
    alphas: Sequence[float] | float = 1.0,
    out: MutableMapping[str, Tensor] | None = None,
) -> MutableMapping[str, Tensor]:
    """theta_TA = theta_0 + sum_t alpha_t (theta_t - theta_0); a negative alpha_t removes task t."""
    a = check_alphas(alphas, len(models))

    def rule(name: str, theta0: Tensor, thetas: list[Tensor]) -> Tensor:
        acc = a[0] * (thetas[0] - theta0)  # summed left to right, the order merge.fast keeps (bit for bit)
        for at, t in zip(a[1:], thetas[1:]):
            acc = acc + at * (t - theta0)
        return theta0 + acc

    return merge_parameters(base, models, rule, out=out, desc="task arithmetic")


def task_negation(
    base: StateDict, model: StateDict, alpha: float = 1.0, out: MutableMapping[str, Tensor] | None = None
) -> MutableMapping[str, Tensor]:
    """theta = theta_0 - alpha (theta_t - theta_0)."""
    return task_arithmetic(base, [model], [-alpha], out=out)
