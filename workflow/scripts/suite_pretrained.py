"""Snakemake script (rule suite_pretrained): the pretrained encoder and one frozen head per task."""

from modelmerge.experiments.suite import fit_heads, suite_pretrained
from modelmerge.files import atomic_write_text
from modelmerge.report import save_table

sm = snakemake  # noqa: F821  (set by Snakemake)
p = sm.params
suite_pretrained(p.source, f"{p.suite_dir}/models/pretrained", p.minilm_dir, p.data_dir, seed=p.seed)
heads = fit_heads(f"{p.suite_dir}/models/pretrained", p.data_dir, f"{p.suite_dir}/heads", p.tasks,
                  max_length=p.max_length, l2=p.probe_l2, threads=sm.threads, clip_source=p.source, heads=p.heads,
                  other_dir=p.other_dir)
for col in [c for c in heads.columns if c.startswith("validation accuracy")]:
    heads[col] *= 100
if p.modality == "image":
    how = "the zero-shot head of CLIP (class names x prompt templates through the text tower, Ilharco et al.)"
else:
    how = ("zero-shot heads (CLIP's construction in text: each class row is the normalised mean of the pretrained "
           "encoder's unit-norm embeddings of the class name in the task's templates, logit scale 100) and linear "
           f"probes (multinomial logistic regression, L2 = {p.probe_l2:g}, on the pretrained encoder's unit-norm "
           f"mean-pooled features of each task's training split); the suite uses the {p.heads.replace('_', '-')} heads")
save_table(heads, p.table, floatfmt=".1f", caption=(
    f"Frozen heads: {how}, fixed before any fine-tuning; validation accuracy (%) of pretrained encoder + head."))
atomic_write_text(sm.log[0], heads.to_string() + "\n")
