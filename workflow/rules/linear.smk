# Experiment `linear`: 001's closed-form claims on linear models (Theorem 1; Eqs. 6, 10, 12).


def linear_outputs() -> list[str]:
    """Every tracked output of the linear experiment."""
    return [
        *figure_files("linear", "theorem1"),
        *table_files("linear", "theorem1"),
        *figure_files("linear", "gradient_mismatch"),
        *table_files("linear", "gradient_mismatch"),
    ]


rule linear_theorem1:
    """001 Theorem 1: Eq. 13 equals Cook's influence formula and retraining without D_t."""
    input:
        notebook="notebooks/linear_theorem1.ipynb",
        library=LIBRARY,
    output:
        *figure_files("linear", "theorem1"),
        *table_files("linear", "theorem1"),
    log:
        notebook=f"{RESULTS}/logs/linear/theorem1.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/linear/theorem1.tsv"
    params:
        notebook=notebook_parameters({**config["linear"]["theorem1"], "out_dir": f"{FIGURES}/linear"}),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook}"


rule linear_mismatch:
    """001 Eqs. 6, 10, 12: merged-model error against the gradient mismatch, quadratic and logistic losses."""
    input:
        notebook="notebooks/linear_mismatch.ipynb",
        library=LIBRARY,
    output:
        *figure_files("linear", "gradient_mismatch"),
        *table_files("linear", "gradient_mismatch"),
    log:
        notebook=f"{RESULTS}/logs/linear/mismatch.ipynb",
    benchmark:
        f"{RESULTS}/benchmarks/linear/mismatch.tsv"
    params:
        notebook=notebook_parameters({**config["linear"]["mismatch"], "out_dir": f"{FIGURES}/linear"}),
    retries: NOTEBOOK_RETRIES
    shell:
        "{PAPERMILL} {input.notebook} {log.notebook} {params.notebook}"


rule linear:
    """Target: every figure and table of the linear-model identities (001 Theorem 1, Sec. 4.1) (`snakemake --cores 2 linear`)."""
    input:
        linear_outputs(),
