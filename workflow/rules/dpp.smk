# Experiment on the suite: DPP selection of which task vectors to merge (003). One rule: the kernel, Table 1 with
# every subset size, random subsets and one-factor selections, exact DPP samples, Table 2 on perturbed test data,
# Fig. 1. Every merge is made and scored once and reused. Target: `snakemake --cores 2 dpp`.
DPP = config["dpp"]
DPP_TABLES = ["kernel_quality", "table1_every_k", "table1_generalisation", "table1_baselines", "dpp_samples",
              "perturbations", "table2_every_k", "table2_robustness"]
DPP_FIGURES = ["kernel", "selection_vs_random", "table2_robustness", "fig1_embeddings"]


def dpp_outputs() -> list[str]:
    """The tracked figures and tables of the experiment."""
    return [*[f for t in DPP_TABLES for f in table_files("dpp", t)],
            *[f for fig in DPP_FIGURES for f in figure_files("dpp", fig)]]


rule dpp_select:
    """003 Tables 1-2 and Fig. 1 on the suite, with random-subset and one-factor baselines."""
    input:
        notebook="notebooks/dpp.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_TASKS]],
        heads=suite_heads(),
        library=LIBRARY,
    output:
        dpp_outputs(),
    log:
        notebook=f"{RESULTS}/logs/dpp/select.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/dpp/select.tsv"
    resources:
        gpu=1,  # scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            "tasks": SUITE_TASKS, "suite_dir": SUITE_DIR, "data_dir": SUITE_DATA, "out_dir": f"{FIGURES}/dpp",
            "max_length": SUITE["max_length"],
            **{k: DPP[k] for k in ("seen", "unseen", "robust_tasks", "corruptions", "corrupted_examples", "lambdas", "tune_examples",
                                   "ties_k", "random_draws", "dpp_samples", "sampled_subsets_scored",
                                   "embedding_models", "quality", "embedding_per_task", "seed",
                                   "bf16")},
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule dpp:
    """Every figure and table of the DPP-selection experiment."""
    input:
        dpp_outputs(),
