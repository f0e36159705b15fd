"""modelmerge: model merging over state dicts (averaging, task arithmetic, Fisher, gradient matching, ...).

The public names below are imported on first use (PEP 562), so ``import modelmerge.assets`` or a Snakefile that
needs one small helper does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["Curvature", "Dense", "Diagonal", "Identity", "Scalar"], "modelmerge.curvature"),
    **dict.fromkeys(["LazySafetensors", "SafetensorsWriter", "load_state_dict", "save_state_dict"], "modelmerge.io"),
    **dict.fromkeys(["average", "fisher_average", "gradient_matching", "task_arithmetic", "task_negation",
                     "task_removal", "weighted_average"], "modelmerge.merge"),
    **dict.fromkeys(["MergeInputError", "task_vector", "task_vectors"], "modelmerge.statedict"),
}
__all__ = sorted(_EXPORTS)


def lazy_attribute(package: str, exports: dict[str, str], name: str):
    """``exports[name]`` imported on first access of ``package.name`` (a module's ``__getattr__``)."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(exports[name]), name)
    setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
    return value


def __getattr__(name: str):
    return lazy_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what static tools see
    from modelmerge.curvature import Curvature, Dense, Diagonal, Identity, Scalar
    from modelmerge.io import LazySafetensors, SafetensorsWriter, load_state_dict, save_state_dict
    from modelmerge.merge import (average, fisher_average, gradient_matching, task_arithmetic, task_negation,
                                  task_removal, weighted_average)
    from modelmerge.statedict import MergeInputError, task_vector, task_vectors
