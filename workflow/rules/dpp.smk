# Experiment on the suite: DPP selection of which task vectors to merge (003). Rule dpp_select (default run): the
# kernel, Table 1 with every subset size, random subsets and one-factor selections, exact DPP samples, Fig. 1 and the
# claims with paired-bootstrap intervals; it saves the pool-of-8 kernel. Rule dpp_robustness (target `dpp_full`,
# outside the default run for the 2-hour budget): Table 2 on perturbed test data. Every merge is made and scored once
# per rule. Targets: `snakemake --cores 2 dpp` and `snakemake --cores 2 dpp_full`.
DPP = config["dpp"]
DPP_DIR = f"{RESULTS}/dpp"
DPP_TABLES = ["kernel_quality", "table1_every_k", "table1_generalisation", "table1_baselines", "dpp_samples", "claims"]
DPP_FIGURES = ["kernel", "selection_vs_random", "fig1_embeddings"]
DPP_FULL_TABLES = ["perturbations", "table2_every_k", "table2_robustness", "table2_claims"]
DPP_FULL_FIGURES = ["table2_robustness"]


def dpp_outputs() -> list[str]:
    """The tracked figures and tables of the default run's part of the experiment (Table 1, Fig. 1, claims)."""
    return [*[f for t in DPP_TABLES for f in table_files("dpp", t)],
            *[f for fig in DPP_FIGURES for f in figure_files("dpp", fig)]]


def dpp_full_outputs() -> list[str]:
    """What target dpp_full adds: Table 2 (robustness to perturbed test data) and its claims."""
    return [*[f for t in DPP_FULL_TABLES for f in table_files("dpp", t)],
            *[f for fig in DPP_FULL_FIGURES for f in figure_files("dpp", fig)]]


DPP_COMMON = {"tasks": SUITE_TASKS, "suite_dir": SUITE_DIR, "data_dir": SUITE_DATA, "out_dir": f"{FIGURES}/dpp",
              "kernel_file": f"{DPP_DIR}/kernel_all.json", "max_length": SUITE["max_length"]}


rule dpp_select:
    """003 Table 1 and Fig. 1 on the suite, with random-subset and one-factor baselines and paired-bootstrap claims."""
    input:
        notebook="notebooks/dpp.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_TASKS]],
        heads=suite_heads(),
        library=LIBRARY,
    output:
        dpp_outputs(),
        kernel=f"{DPP_DIR}/kernel_all.json",
    log:
        notebook=f"{RESULTS}/logs/dpp/select.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/dpp/select.tsv"
    resources:
        gpu=1,  # scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            **DPP_COMMON,
            **{k: DPP[k] for k in ("seen", "unseen", "lambdas", "tune_examples", "ties_k", "random_draws", "dpp_samples",
                                   "sampled_subsets_scored", "embedding_models", "quality", "embedding_per_task", "seed",
                                   "bf16")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule dpp_robustness:
    """003 Table 2 on the suite: TIES of the DPP subset over all eight, of all eight, of the four tasks and of random
    subsets, on clean and perturbed test data, with paired-bootstrap claims."""
    input:
        notebook="notebooks/dpp_robustness.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_TASKS]],
        heads=suite_heads(),
        kernel=rules.dpp_select.output.kernel,
        library=LIBRARY,
    output:
        dpp_full_outputs(),
    log:
        notebook=f"{RESULTS}/logs/dpp/robustness.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/dpp/robustness.tsv"
    resources:
        gpu=1,
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            **DPP_COMMON,
            **{k: DPP[k] for k in ("robust_tasks", "corruptions", "corrupted_examples", "lambdas", "tune_examples",
                                   "ties_k", "random_draws", "seed", "bf16")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule dpp:
    """The default run's figures and tables of the DPP-selection experiment (Table 1, Fig. 1, claims)."""
    input:
        dpp_outputs(),


rule dpp_full:
    """The whole of 003's scope on the suite: the default part and Table 2 (about 20 more minutes on 2 cores)."""
    input:
        dpp_outputs(),
        dpp_full_outputs(),
