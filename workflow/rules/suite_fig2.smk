# Experiment on the suite: 001 Fig. 2 left, gradient matching against task arithmetic as alpha varies (Sec. 4.2).
SUITE_GM = SUITE["gradient_matching"]


def suite_fig2_outputs() -> list[str]:
    """The tracked figure and tables of the experiment (the sweep and its claims with intervals)."""
    return [*figure_files(SUITE_NAME, "fig2_left_alpha"), *table_files(SUITE_NAME, "fig2_left_alpha"),
            *table_files(SUITE_NAME, "fig2_left_claims")]


rule suite_fig2:
    """Merge the eight task models with TA and Eq. 12 (H_t = F_avg, H_0 = c I) at every alpha; score them."""
    input:
        notebook="notebooks/suite_fig2.ipynb",
        models=[suite_model_file(m) for m in ["pretrained", *SUITE_MODELS]],
        fishers=[f"{SUITE_DIR}/curvature/{t}/fisher_train.safetensors" for t in SUITE_TASKS],
        library=LIBRARY,
    output:
        suite_fig2_outputs(),
    log:
        notebook=f"{RESULTS}/logs/{SUITE_NAME}/fig2.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/{SUITE_NAME}/fig2.tsv"
    resources:
        gpu=1,  # merging and scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=notebook_parameters({
            "tasks": SUITE_TASKS,
            "suite_dir": SUITE_DIR,
            "data_dir": SUITE_DATA,
            "out_dir": f"{FIGURES}/{SUITE_NAME}",
            **SUITE_GM,
            "max_length": SUITE["max_length"],
        }),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"
