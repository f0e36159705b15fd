"""Snakemake script (rule suite_pretrained): the pretrained encoder and one frozen head per task."""

from modelmerge.experiments.suite import fit_heads, suite_pretrained
from modelmerge.files import atomic_write_text
from modelmerge.report import save_table

sm = snakemake  # noqa: F821  (set by Snakemake)
p = sm.params
suite_pretrained(p.source, f"{p.suite_dir}/models/pretrained", p.minilm_dir, p.data_dir, seed=p.seed)
heads = fit_heads(f"{p.suite_dir}/models/pretrained", p.data_dir, f"{p.suite_dir}/heads", p.tasks,
                  max_length=p.max_length, l2=p.probe_l2, threads=sm.threads, clip_source=p.source)
heads["validation accuracy"] *= 100
how = ("the zero-shot head of CLIP (class names x prompt templates through the text tower, Ilharco et al.)"
       if p.modality == "image" else "a multinomial logistic regression (L2 = "
       f"{p.probe_l2:g}) on the pretrained encoder's unit-norm mean-pooled features of each task's training split")
save_table(heads, p.table, floatfmt=".1f", caption=(
    f"Frozen heads: {how}, fixed before any fine-tuning; validation accuracy (%) of pretrained encoder + head."))
atomic_write_text(sm.log[0], heads.to_string() + "\n")
