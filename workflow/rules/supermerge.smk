# Experiment on the suite: learned layer-wise merging (004). Every learned merge is a job of its own
# (`python -m modelmerge.experiments.supermerge learn`), so its time, FLOPs and peak memory are measured in a
# process that does nothing else. Rule supermerge_tables (default run): the baselines tuned, every in-domain merge
# scored, Tables 3 and 5, Fig. 5a, claims. Rule supermerge_out_of_domain (target `supermerge_full`, outside the
# default run for 004's 20-minute budget): Table 6 (merged without `held_out`) and Table 4 (without tanh).
# Targets: `snakemake --cores 2 supermerge` and `snakemake --cores 2 supermerge_full`.
SM = config["supermerge"]
SM_DIR = f"{RESULTS}/supermerge"
_unknown = sorted(set(SM["held_out"]) - set(SUITE_TASKS))
if _unknown:
    raise ValueError(f"supermerge.held_out names task(s) {_unknown} that are not suite tasks {SUITE_TASKS}")
if len(set(SM["held_out"])) > len(SUITE_TASKS) - 2:
    raise ValueError(f"supermerge.held_out {SM['held_out']} leaves fewer than two of the suite's tasks to merge")
# in_domain: all eight tasks merged (Tables 3-5, Fig. 5a); held_out: merged without `held_out` (Tables 4 and 6)
SM_SETTINGS = {"in_domain": SUITE_TASKS, "held_out": [t for t in SUITE_TASKS if t not in SM["held_out"]]}
# adamerging_lr<x>: AdaMerging again at learning rate x (`adamerging_extra_lrs`), a sensitivity check
SM_LEARNED = {"in_domain": ["supermerge", "adamerging", "hierarchical",
                            *[f"adamerging_lr{lr:g}" for lr in SM["adamerging_extra_lrs"]]]}
# what supermerge_full adds: the ablation without tanh in domain, and the merges without `held_out`
SM_LEARNED_FULL = {"in_domain": ["supermerge_no_tanh"], "held_out": ["supermerge", "supermerge_no_tanh", "adamerging"]}
# Table 5 compares flat and hierarchical SuperMerge: only they count FLOPs (the counter slows an epoch by a third)
SM_COUNT_FLOPS = [("in_domain", "supermerge"), ("in_domain", "hierarchical")]
SM_TABLES = ["table3_in_domain", "table5_cost", "claims", "baselines_tuning", "accuracies"]
SM_FIGURES = ["fig5a_merge_weights", "learning_curves"]
SM_FULL_TABLES = ["table6_out_of_domain", "table4_tanh", "claims_out_of_domain", "baselines_tuning_out_of_domain",
                  "accuracies_out_of_domain"]
SM_PYTHON = shlex.quote(sys.executable)


wildcard_constraints:
    sm_setting="in_domain|held_out",
    sm_method="supermerge|supermerge_no_tanh|adamerging|hierarchical|adamerging_lr[0-9.e+-]+",


def supermerge_outputs() -> list[str]:
    """The tracked figures and tables of the default run's part of the experiment (Tables 3 and 5, Fig. 5a)."""
    return [*[f for t in SM_TABLES for f in table_files("supermerge", t)],
            *[f for fig in SM_FIGURES for f in figure_files("supermerge", fig)]]


def supermerge_full_outputs() -> list[str]:
    """What target supermerge_full adds: Table 6 (out of domain), Table 4 (tanh) and their claims."""
    return [f for t in SM_FULL_TABLES for f in table_files("supermerge", t)]


def supermerge_learned(kind: str, learned: dict[str, list[str]] = SM_LEARNED) -> list[str]:
    """Every learned merge's ``model.safetensors`` or ``learned.json`` (``learned``: setting -> methods)."""
    return [f"{SM_DIR}/{s}/{m}/{kind}" for s, methods in learned.items() for m in methods]


rule supermerge_learn:
    """One learned merge of the suite's task models on their validation data, measured alone in its process."""
    input:
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_TASKS]],
        heads=suite_heads(),
        splits=suite_splits(),
        library=LIBRARY,
    output:
        model=f"{SM_DIR}/{{sm_setting}}/{{sm_method}}/model.safetensors",
        record=f"{SM_DIR}/{{sm_setting}}/{{sm_method}}/learned.json",
    log:
        f"{RESULTS}/logs/supermerge/learn_{{sm_setting}}_{{sm_method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/supermerge/learn_{{sm_setting}}_{{sm_method}}.tsv"
    resources:
        gpu=1,  # learning the merge runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        tasks=lambda wc: " ".join(SM_SETTINGS[wc.sm_setting]),
        out_dir=lambda wc, output: str(Path(output.model).parent),
        method=lambda wc: wc.sm_method.split("_lr")[0],
        lr=lambda wc: (float(wc.sm_method.split("_lr")[1]) if "_lr" in wc.sm_method
                       else SM["adamerging_lr"] if wc.sm_method == "adamerging" else SM["lr"]),
        flops=lambda wc: "--count-flops" if (wc.sm_setting, wc.sm_method) in SM_COUNT_FLOPS else "",
    shell:
        "{SM_PYTHON} -m modelmerge.experiments.supermerge learn --method {params.method} --tasks {params.tasks}"
        " --suite-dir {SUITE_DIR} --data-dir {SUITE_DATA} --out-dir {params.out_dir} --epochs {SM[epochs]}"
        " --lr {params.lr} --init {SM[init]} --fan-in {SM[fan_in]} --batch-size {SM[batch_size]}"
        " --max-length {SUITE[max_length]} --seed {SM[seed]} --threads {threads} {params.flops} > {log} 2>&1"


rule supermerge_tables:
    """004 Tables 3 and 5, Fig. 5a: the baselines tuned on the same validation data, every merge of all eight tasks
    scored on test."""
    input:
        notebook="notebooks/supermerge.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_MODELS]],
        heads=suite_heads(),
        learned=supermerge_learned("model.safetensors"),
        records=supermerge_learned("learned.json"),
        library=LIBRARY,
    output:
        supermerge_outputs(),
    log:
        notebook=f"{RESULTS}/logs/supermerge/tables.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/supermerge/tables.tsv"
    resources:
        gpu=1,  # scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            "tasks": SUITE_TASKS, "suite_dir": SUITE_DIR, "data_dir": SUITE_DATA, "learned_dir": SM_DIR,
            "out_dir": f"{FIGURES}/supermerge", "max_length": SUITE["max_length"],
            **{k: SM[k] for k in ("lambdas", "tune_examples", "ties_k", "dare_p", "seed", "bf16", "lr",
                                  "adamerging_lr", "adamerging_extra_lrs")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule supermerge_out_of_domain:
    """004 Table 6 (the task models without `held_out` merged, scored on every task) and Table 4 (without tanh)."""
    input:
        notebook="notebooks/supermerge_out_of_domain.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_MODELS]],
        heads=suite_heads(),
        learned=supermerge_learned("model.safetensors", {**SM_LEARNED_FULL, "in_domain": ["supermerge", "supermerge_no_tanh"]}),
        records=supermerge_learned("learned.json", {**SM_LEARNED_FULL, "in_domain": ["supermerge", "supermerge_no_tanh"]}),
        library=LIBRARY,
    output:
        supermerge_full_outputs(),
    log:
        notebook=f"{RESULTS}/logs/supermerge/out_of_domain.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/supermerge/out_of_domain.tsv"
    resources:
        gpu=1,
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            "tasks": SUITE_TASKS, "suite_dir": SUITE_DIR, "data_dir": SUITE_DATA, "learned_dir": SM_DIR,
            "out_dir": f"{FIGURES}/supermerge", "max_length": SUITE["max_length"],
            **{k: SM[k] for k in ("held_out", "lambdas", "tune_examples", "ties_k", "dare_p", "seed", "bf16")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule supermerge:
    """The default run's figures and tables of the learned-merging experiment (Tables 3 and 5, Fig. 5a, claims)."""
    input:
        supermerge_outputs(),


rule supermerge_full:
    """The whole of 004's scope on the suite: the default part, Table 6 and Table 4 (about 20 more minutes on 2 cores)."""
    input:
        supermerge_outputs(),
        supermerge_full_outputs(),
