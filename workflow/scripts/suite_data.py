"""Snakemake script (rule suite_data): deduplicated, count-split train / validation / test of the suite's tasks and
their datasheet."""

from modelmerge.experiments.suite import prepare_suite_data, suite_datasheet_table
from modelmerge.files import atomic_write_text

sm = snakemake  # noqa: F821  (set by Snakemake)
p = sm.params
splits, classes = prepare_suite_data(p.tasks, p.raw_dir, p.data_dir, seed=p.seed, validation=p.validation,
                                     caps=p.caps, min_condition=p.min_condition)
summary = suite_datasheet_table(splits, classes, p.assets, p.table)
atomic_write_text(sm.log[0], summary + "\n")
