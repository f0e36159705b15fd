"""Parameter averaging (001 Eq. 1): the arithmetic mean and its weighted version."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

from torch import Tensor

from modelmerge.merge.core import merge_parameters
from modelmerge.statedict import MergeInputError, StateDict, check_alphas


def weighted_average(
    models: Sequence[StateDict], weights: Sequence[float], out: MutableMapping[str, Tensor] | None = None
) -> MutableMapping[str, Tensor]:
    """theta = sum_t w_t theta_t / sum_t w_t (include the base model in ``models`` to give it a weight)."""
    w = check_alphas(weights, len(models), name="weights")
    total = sum(w)
    if total == 0:
        raise MergeInputError(None, "weights sum to zero")

    def rule(name: str, ref: Tensor, thetas: list[Tensor]) -> Tensor:
        acc = w[0] * thetas[0]  # summed left to right, the order merge.fast keeps (bit for bit)
        for wt, t in zip(w[1:], thetas[1:]):
            acc = acc + wt * t
        return acc / total

    return merge_parameters(models[0], models, rule, out=out, desc="weighted average")


def average(models: Sequence[StateDict], out: MutableMapping[str, Tensor] | None = None) -> MutableMapping[str, Tensor]:
    """theta_AM = (1/T) sum_t theta_t."""
    return weighted_average(models, [1.0] * len(models), out=out)
