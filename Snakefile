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


# The default target: the suite and every experiment built on it (001 Fig. 2 left, 002, 003 Table 1, 004) and 001's
# linear theory, within 2 hours on 2 CPU cores. What does not fit runs by name (`snakemake --cores 2 <target>`):
# sentiment and toxicity (001 Secs. 4.3-4.4, about 29 minutes each), mats_full (002's whole scope), dpp_full
# (003 Table 2), supermerge_full (004 Tables 4 and 6); `full` is everything.
rule all:
    input:
        data_outputs(),
        linear_outputs(),
        suite_outputs(),
        suite_fig2_outputs(),
        mats_outputs(),
        dpp_outputs(),
        supermerge_outputs(),
    default_target: True


rule full:
    """Every tracked figure and table: the default run and the named targets outside it."""
    input:
        rules.all.input,
        sentiment_outputs(),
        toxicity_outputs(),
        mats_full_outputs(),
        dpp_full_outputs(),
        supermerge_full_outputs(),
