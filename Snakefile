# Entry point. `snakemake --cores 2` regenerates every tracked figure and table under figures/ with the
# default (offline, CPU) configuration; `--configfile workflow/config/paper.yaml` runs the seeds' scale.
from snakemake.utils import min_version, validate

min_version("8.20")


configfile: "workflow/config/default.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/linear.smk"
include: "workflow/rules/sentiment.smk"
include: "workflow/rules/toxicity.smk"
include: "workflow/rules/suite.smk"
include: "workflow/rules/suite_fig2.smk"
include: "workflow/rules/mats.smk"
include: "workflow/rules/dpp.smk"
include: "workflow/rules/supermerge.smk"


rule all:
    input:
        data_outputs(),
        linear_outputs(),
        sentiment_outputs(),
        toxicity_outputs(),
        suite_outputs(),
        suite_fig2_outputs(),
        mats_outputs(),
        dpp_outputs(),
        supermerge_outputs(),
    default_target: True
