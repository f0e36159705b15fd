"""modelmerge: model merging over state dicts (averaging, task arithmetic, Fisher, gradient matching, ...)."""

from modelmerge.curvature import Curvature, Dense, Diagonal, Identity, Scalar
from modelmerge.io import LazySafetensors, SafetensorsWriter, load_state_dict, save_state_dict
from modelmerge.merge import (
    average,
    fisher_average,
    gradient_matching,
    task_arithmetic,
    task_negation,
    task_removal,
    weighted_average,
)
from modelmerge.statedict import MergeInputError, task_vector, task_vectors

__version__ = "0.1.0"

__all__ = [
    "Curvature",
    "Dense",
    "Diagonal",
    "Identity",
    "LazySafetensors",
    "MergeInputError",
    "SafetensorsWriter",
    "Scalar",
    "average",
    "fisher_average",
    "gradient_matching",
    "load_state_dict",
    "save_state_dict",
    "task_arithmetic",
    "task_negation",
    "task_removal",
    "task_vector",
    "task_vectors",
    "weighted_average",
]
