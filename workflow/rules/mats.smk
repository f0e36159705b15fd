# Experiment on the suite: MaTS, merging in task parameter subspaces (002 Sec. 6). Three rules in the default run
# (target `mats`, 25 minutes on 2 cores): the initialisations (tuned on validation data and saved), the CG solves of
# Fig. 3 to 100 iterations (Fig. 2's task-arithmetic cells) with the preconditioned solve, and Tables 1, 3, 4
# (diagonal rows), 5. Target `mats_full` adds the rest of 002's scope: Fig. 2's whole grid, Fig. 3 to 1,000
# iterations, Table 4's K-FAC rows, the second round.
MATS = config["mats"]
MATS_DIR = f"{RESULTS}/mats"
MATS_INITS = ["average", "task_arithmetic", "ties", "diagonal_fisher_merging", "regmean"]


def mats_outputs() -> list[str]:
    """The tracked figures and tables of the experiment."""
    return [
        *figure_files("mats", "fig3_cg_iterations"), *table_files("mats", "fig3_cg_iterations"),
        *[f for t in ("fig3_preconditioned", "table1_multitask", "table3_flops", "table4_fisher", "table5_cost",
                      "regmean_objective") for f in table_files("mats", t)],
    ]


def mats_full_outputs() -> list[str]:
    """What target mats_full adds: Fig. 2's grid, Fig. 3 to 1,000 iterations, Table 4 with every K-FAC row, round 2."""
    return [
        *figure_files("mats", "fig2_init_objective"), *table_files("mats", "fig2_init_objective"),
        *figure_files("mats", "fig3_cg_iterations_full"), *table_files("mats", "fig3_cg_iterations_full"),
        *[f for t in ("fig3_preconditioned_full", "table4_fisher_full", "second_round", "claims_full")
          for f in table_files("mats", t)],
    ]


def mats_parameters(**extra) -> str:
    return notebook_parameters({
        "tasks": SUITE_TASKS, "suite_dir": SUITE_DIR, "data_dir": SUITE_DATA, "work_dir": MATS_DIR,
        "fisher": MATS["fisher"], "fisher_floor_relative": MATS["fisher_floor"], "bf16": MATS["bf16"],
        "max_length": SUITE["max_length"], **extra,
    })


MATS_SUITE_INPUTS = {
    "models": [suite_model_file(m) for m in ["pretrained", *SUITE_MODELS]],
    "curvature": [f for t in SUITE_TASKS for f in suite_curvature_files(t)],
    "heads": suite_heads(),
}


rule mats_inits:
    """Averaging, task arithmetic, TIES, diagonal Fisher merging and RegMean, tuned on validation data and saved."""
    input:
        notebook="notebooks/mats_inits.ipynb",
        **MATS_SUITE_INPUTS,
        library=LIBRARY,
    output:
        inits=[f"{MATS_DIR}/inits/{name}.safetensors" for name in MATS_INITS],
        baselines=f"{MATS_DIR}/baselines.csv",
        test_logits=f"{MATS_DIR}/test_logits.safetensors",
        tuning=f"{MATS_DIR}/tuning.csv",
        precision=f"{MATS_DIR}/precision.json",
    log:
        notebook=f"{RESULTS}/logs/mats/inits.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/mats/inits.tsv"
    resources:
        gpu=1,  # merging and scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=mats_parameters(lambdas=MATS["lambdas"], ties_k=MATS["ties_k"], regmean_scales=MATS["regmean_scales"]),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule mats_iterations:
    """Fig. 3: CG solves from task arithmetic on the K-FAC and RegMean objectives and the preconditioned K-FAC solve."""
    input:
        notebook="notebooks/mats_iterations.ipynb",
        **MATS_SUITE_INPUTS,
        inits=rules.mats_inits.output.inits,
        baselines=rules.mats_inits.output.baselines,
        library=LIBRARY,
    output:
        figure_files("mats", "fig3_cg_iterations"),
        table_files("mats", "fig3_cg_iterations"),
        pcg=table_files("mats", "fig3_preconditioned"),
        curve=f"{MATS_DIR}/iterations.csv",
        curves=f"{MATS_DIR}/curves.csv",
        states=[f"{MATS_DIR}/from_task_arithmetic_{o}.safetensors" for o in ("regmean", "block_diagonal_fisher")],
    log:
        notebook=f"{RESULTS}/logs/mats/iterations.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/mats/iterations.tsv"
    resources:
        gpu=1,  # CG solves and scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=mats_parameters(out_dir=f"{FIGURES}/mats", long_iterations=MATS["long_iterations"],
                                 pcg_iterations=MATS["pcg_iterations"], iterations=MATS["iterations"]),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule mats_iterations_full:
    """mats_full: Fig. 3 to 1,000 plain-CG iterations (002's) beside the preconditioned solve, into files of its own."""
    input:
        notebook="notebooks/mats_iterations.ipynb",
        **MATS_SUITE_INPUTS,
        inits=rules.mats_inits.output.inits,
        baselines=rules.mats_inits.output.baselines,
        library=LIBRARY,
    output:
        figure_files("mats", "fig3_cg_iterations_full"),
        table_files("mats", "fig3_cg_iterations_full"),
        table_files("mats", "fig3_preconditioned_full"),
        curve=f"{MATS_DIR}/iterations_full.csv",
        curves=f"{MATS_DIR}/curves_full.csv",
    log:
        notebook=f"{RESULTS}/logs/mats/iterations_full.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/mats/iterations_full.tsv"
    resources:
        gpu=1,
    threads: WIDE_THREADS
    params:
        notebook=mats_parameters(out_dir=f"{FIGURES}/mats", long_iterations=MATS["full_long_iterations"],
                                 pcg_iterations=MATS["full_pcg_iterations"], iterations=MATS["iterations"],
                                 suffix="_full"),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule mats_merge:
    """Table 1, Table 4's diagonal rows, RegMean's objective, Tables 3 and 5."""
    input:
        notebook="notebooks/mats.ipynb",
        **MATS_SUITE_INPUTS,
        inits=rules.mats_inits.output,
        curve=rules.mats_iterations.output.curve,
        pcg=rules.mats_iterations.output.pcg,
        states=rules.mats_iterations.output.states,
        library=LIBRARY,
    output:
        [f for f in mats_outputs() if "fig3_" not in f],
    log:
        notebook=f"{RESULTS}/logs/mats/merge.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/mats/merge.tsv"
    resources:
        gpu=1,  # CG solves and scoring runs on the GPU when there is one (workflow/profiles/gpu, slurm)
    threads: WIDE_THREADS
    params:
        notebook=mats_parameters(out_dir=f"{FIGURES}/mats", iterations=MATS["iterations"], gm_alphas=MATS["gm_alphas"],
                                 multitask_epochs=SUITE["multitask_train"]["epochs"]),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule mats:
    """Every figure and table of the MaTS experiment."""
    input:
        mats_outputs(),


rule mats_extra:
    """mats_full: Fig. 2's grid, Table 4's block-diagonal rows for every Fisher, 002 Sec. 6.7's second round, the claims."""
    input:
        notebook="notebooks/mats_full.ipynb",
        **MATS_SUITE_INPUTS,
        inits=rules.mats_inits.output.inits,
        baselines=rules.mats_inits.output.baselines,
        test_logits=rules.mats_inits.output.test_logits,
        curve=rules.mats_iterations.output.curve,
        table4=table_files("mats", "table4_fisher"),
        state=f"{MATS_DIR}/from_task_arithmetic_regmean.safetensors",
        curvature_extra=[f for t in SUITE_TASKS for f in suite_curvature_files(t, SUITE_CURVATURE_EXTRA)],
        library=LIBRARY,
    output:
        figure_files("mats", "fig2_init_objective"),
        [f for t in ("fig2_init_objective", "table4_fisher_full", "second_round", "claims_full") for f in table_files("mats", t)],
    log:
        notebook=f"{RESULTS}/logs/mats/full.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/mats/full.tsv"
    resources:
        gpu=1,
    threads: WIDE_THREADS
    params:
        notebook=mats_parameters(out_dir=f"{FIGURES}/mats", iterations=MATS["iterations"]),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook} -p threads {threads}"


rule mats_full:
    """The whole of 002's scope on the suite: the default figures and Fig. 3 to 1,000 iterations, Table 4, round 2."""
    input:
        mats_outputs(),
        mats_full_outputs(),
