"""Curvature forms (scalar, identity, diagonal, dense) and how a model-level specification maps to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

from torch import Tensor

from modelmerge.curvature.base import Curvature, Dense, Diagonal, Identity, Scalar, linear_combination
from modelmerge.statedict import MergeInputError

#: A model's curvature: one form for every parameter (e.g. ``Identity()``, ``Scalar(N)``), or a mapping from
#: parameter name to a form; a bare tensor in the mapping means a diagonal (e.g. a diagonal Fisher file).
CurvatureSpec = Union[Curvature, Mapping[str, Union[Curvature, Tensor]]]


def curvature_for(spec: CurvatureSpec, name: str, param: Tensor, label: str = "curvature") -> Curvature:
    """The validated curvature of parameter ``name`` under ``spec``."""
    if isinstance(spec, Curvature):
        if spec.rank > 0:
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


__all__ = [
    "Curvature",
    "CurvatureSpec",
    "Dense",
    "Diagonal",
    "Identity",
    "Scalar",
    "curvature_for",
    "linear_combination",
]
