"""Curvature forms (scalar, identity, diagonal, dense) and how a model-level specification maps to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from torch import Tensor

from modelmerge.curvature.base import (
    KFAC,
    Curvature,
    Dense,
    Diagonal,
    Gram,
    Identity,
    Scalar,
    SumCurvature,
    linear_combination,
)
from modelmerge.statedict import MergeInputError

#: A model's curvature: one form for every parameter (e.g. ``Identity()``, ``Scalar(N)``), or a mapping from
#: parameter name to a form; a bare tensor in the mapping means a diagonal (e.g. a diagonal Fisher file).
CurvatureSpec = Union[Curvature, Mapping[str, Union[Curvature, Tensor]]]


def curvature_for(spec: CurvatureSpec, name: str, param: Tensor, label: str = "curvature") -> Curvature:
    """The validated curvature of parameter ``name`` under ``spec``."""
    if isinstance(spec, Curvature):
        if not isinstance(spec, Scalar):
            raise MergeInputError(name, f"{label}: a {type(spec).__name__} curvature must be given per parameter")
        h = spec
    elif isinstance(spec, Mapping):
        if name not in spec:
            raise MergeInputError(name, f"{label} has no entry for this parameter")
        h = spec[name]
        if isinstance(h, Tensor):
            h = Diagonal(h)
        elif not isinstance(h, Curvature):
            raise MergeInputError(name, f"{label} entry is a {type(h).__name__}, expected a tensor or Curvature")
    else:
        raise MergeInputError(None, f"{label} must be a Curvature or a mapping name -> tensor/Curvature")
    try:
        h.check(name, param)
    except MergeInputError as err:
        raise MergeInputError(name, f"{label}: {err.problem}") from None
    return h


class WithFallback(Mapping):
    """A curvature specification that takes ``primary[name]`` where it exists and ``fallback`` elsewhere.

    E.g. ``WithFallback(kfac_factors, diagonal_fisher)`` covers linear weights with K-FAC and every other
    parameter (biases, norms, embeddings) with the diagonal Fisher; ``WithFallback(grams, Identity())`` is
    RegMean's convention of averaging what the Grams do not cover.
    """

    def __init__(self, primary: Mapping[str, Curvature | Tensor], fallback: CurvatureSpec):
        self.primary, self.fallback = primary, fallback

    def __getitem__(self, name: str) -> Curvature | Tensor:
        if name in self.primary:
            return self.primary[name]
        if isinstance(self.fallback, Curvature):
            return self.fallback
        return self.fallback[name]

    def __contains__(self, name: object) -> bool:
        return name in self.primary or isinstance(self.fallback, Curvature) or name in self.fallback

    def __iter__(self):
        keys = dict.fromkeys(self.primary)
        if not isinstance(self.fallback, Curvature):
            keys.update(dict.fromkeys(self.fallback))
        return iter(keys)

    def __len__(self) -> int:
        return sum(1 for _ in self)


__all__ = [
    "KFAC",
    "Curvature",
    "CurvatureSpec",
    "Dense",
    "Diagonal",
    "Gram",
    "Identity",
    "Scalar",
    "SumCurvature",
    "WithFallback",
    "curvature_for",
    "scaled_identity",
    "linear_combination",
]


def scaled_identity(n: float = 1.0) -> Scalar:
    """H = n I: the identity (n = 1) or N I for N training examples (001 Table 5's "N*I")."""
    return Scalar(float(n))
