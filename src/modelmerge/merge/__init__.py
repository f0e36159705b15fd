"""Merge rules over state dicts; each accepts in-memory dicts or lazily loaded safetensors files."""

from modelmerge.merge.average import average, weighted_average
from modelmerge.merge.core import merge_parameters
from modelmerge.merge.fisher import fisher_average
from modelmerge.merge.gradient_matching import gradient_matching, task_removal
from modelmerge.merge.learned import LayerwiseMerge, adamerging, hierarchical_merge, supermerge
from modelmerge.merge.mats import mats
from modelmerge.merge.regmean import regmean
from modelmerge.merge.task_arithmetic import task_arithmetic, task_negation
from modelmerge.merge.ties import dare, ties

__all__ = [
    "LayerwiseMerge",
    "adamerging",
    "hierarchical_merge",
    "supermerge",
    "average",
    "dare",
    "fisher_average",
    "gradient_matching",
    "mats",
    "merge_parameters",
    "regmean",
    "task_arithmetic",
    "task_negation",
    "task_removal",
    "ties",
    "weighted_average",
]
