"""RegMean (Jin et al. 2022; 002 Eq. 5): match every linear layer's outputs, in closed form."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

from modelmerge.curvature import CurvatureSpec, Gram, Identity, WithFallback
from modelmerge.merge.fisher import fisher_average
from modelmerge.statedict import MergeInputError, StateDict


class ScaledGrams(Mapping):
    """Grams with their off-diagonal entries scaled by ``lam``: G -> lam G + (1 - lam) diag(G), read lazily."""

    def __init__(self, grams: Mapping[str, Gram], lam: float):
        self.grams, self.lam = grams, lam

    def __getitem__(self, name: str) -> Gram:
        g = self.grams[name]
        if not isinstance(g, Gram):
            raise MergeInputError(name, f"RegMean needs a Gram curvature, got {type(g).__name__}")
        if self.lam == 1.0:
            return g
        return Gram(self.lam * g.G + (1 - self.lam) * torch.diag(g.G.diagonal()), g.in_axis)

    def __iter__(self) -> Iterator[str]:
        return iter(self.grams)

    def __len__(self) -> int:
        return len(self.grams)

    def __contains__(self, name: object) -> bool:
        return name in self.grams


def regmean(
    models: Sequence[StateDict],
    grams: Sequence[Mapping[str, Gram]],
    offdiag_scale: float = 1.0,
    fallback: CurvatureSpec | Sequence[CurvatureSpec] = Identity(),
    out: MutableMapping[str, Tensor] | None = None,
) -> MutableMapping[str, Tensor]:
    """W* = (sum_m G~_m)^-1 sum_m G~_m W_m per linear weight, G~ = lam G + (1 - lam) diag(G) (002 Eq. 5).

    ``grams[m]`` maps each linear weight to its input Gram Z_m^T Z_m / N_m (``Gram``); ``offdiag_scale`` is
    RegMean's lam in [0, 1] (1 = the unscaled objective, 0 = diagonal). The solve uses a Cholesky factor,
    with jitter only if the sum is not numerically positive definite. Parameters without a Gram (biases,
    norms, embeddings) use ``fallback`` (per model, or one for all): the identity, i.e. the plain average, by
    default, as in RegMean; pass diagonal Fishers to Fisher-average them instead.
    """
    if len(grams) != len(models):
        raise MergeInputError(None, f"got {len(grams)} Gram sets for {len(models)} models")
    if not 0.0 <= offdiag_scale <= 1.0:
        raise MergeInputError(None, f"offdiag_scale must be in [0, 1], got {offdiag_scale}")
    fallbacks = list(fallback) if isinstance(fallback, Sequence) else [fallback] * len(models)
    curvatures = [WithFallback(ScaledGrams(g, offdiag_scale), f) for g, f in zip(grams, fallbacks)]
    return fisher_average(models, curvatures, out=out)
