"""Snakemake script (rule toxicity_kfac_directions): Eq. 13's direction with K-FAC, solved once per delta."""

from modelmerge.experiments.toxicity import kfac_directions, texts_per_set
from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (set by Snakemake)
summary = kfac_directions(sm.params.models_dir, sm.params.curvature_dir, sm.params.deltas, sm.output.directions,
                          texts_per_set(sm.params.data_dir), threads=sm.threads)
atomic_write_text(sm.log[0], summary + "\n")
