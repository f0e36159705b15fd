"""Choosing which fine-tuned models to merge."""

from modelmerge.select.dpp import (
    dpp_kernel,
    exact_map,
    greedy_map,
    log_det,
    quality_scores,
    sample_dpp,
    similarity_matrix,
)

__all__ = ["dpp_kernel", "exact_map", "greedy_map", "log_det", "quality_scores", "sample_dpp", "similarity_matrix"]
