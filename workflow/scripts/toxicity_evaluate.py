"""Snakemake script (rule toxicity_evaluate): merge one row, generate, score toxicity, measure perplexity."""

from modelmerge.experiments.toxicity import texts_per_set, toxicity_variant
from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (set by Snakemake)
summary = toxicity_variant(sm.wildcards.variant, sm.params.models_dir, sm.params.curvature_dir, sm.params.data_dir,
                           sm.output[0], set_sizes=texts_per_set(sm.params.data_dir), eval_config=sm.params.eval_config,
                           threads=sm.threads, directions_dir=sm.params.directions_dir)
atomic_write_text(sm.log[0], summary + "\n")
