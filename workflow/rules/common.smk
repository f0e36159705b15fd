# Helpers shared by every rule: paths from the configuration and the papermill command line.
import os
import shlex
import sys
from pathlib import Path

import yaml

RESULTS = config["results_dir"]
# the library is an input of every rule: changing an algorithm reruns what depends on it. Rules depend on one file,
# the digest of the library's sources (rule library_digest), not on its ~50 files each: Snakemake then tracks one
# input per job instead of fifty, which keeps its own bookkeeping per job (and every dry run) small
LIBRARY_FILES = sorted(str(p) for p in Path(workflow.basedir, "src", "modelmerge").rglob("*.py"))
LIBRARY = f"{RESULTS}/library.sha256"
FIGURES = config["figures_dir"]
# threads of the jobs that parallelise inside (scoring many merges); fine-tuning and curvature jobs take one each
WIDE_THREADS = config["wide_threads"]

# nothing in the default and smoke runs may wait on a hub that is not there (DESIGN.md section 4)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# one thread per job: `--cores N` then means N jobs, and numbers do not depend on the thread count
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

# a notebook job whose Jupyter kernel fails to start (two kernels racing for ports when jobs start together) is
# retried; the outputs are deterministic, so a retry cannot change them
NOTEBOOK_RETRIES = 2

# the interpreter running Snakemake also runs the notebooks, so an unactivated venv works too
PAPERMILL = f"{shlex.quote(sys.executable)} -m papermill --kernel python3 --no-progress-bar --log-output"


def notebook_parameters(params: dict) -> str:
    """Papermill's -y argument: the parameters as one quoted YAML mapping."""
    return "-y " + shlex.quote(yaml.safe_dump(params, default_flow_style=True, width=10_000).strip())


#: `snakemake --report report.html`: every tracked figure and table, grouped by experiment, with a caption naming
#: the seed table or figure it reproduces and the configuration it ran (workflow/report/<experiment>/<name>.rst)
REPORT_CATEGORIES = {
    "data": "Data", "linear": "001 linear models", "sentiment": "001 sentiment", "toxicity": "001 toxicity",
    "suite": "The eight-task suite (with 001 Fig. 2 left)", "mats": "002 MaTS", "dpp": "003 DPP selection",
    "supermerge": "004 SuperMerge",
}


def reported(path: str, experiment: str, name: str, kind: str):
    """``path`` flagged for Snakemake's report with its caption file, under its experiment's category."""
    key = "suite" if experiment == config["suite"]["name"] else experiment
    caption = Path(workflow.basedir, "workflow", "report", key, f"{name}.rst")
    return report(path, caption=str(caption), category=REPORT_CATEGORIES[key], subcategory=kind)


def figure_files(experiment: str, name: str) -> list[str]:
    """The tracked files of one figure (the .png is shown in the report)."""
    return [reported(f"{FIGURES}/{experiment}/{name}.png", experiment, name, "figures"),
            f"{FIGURES}/{experiment}/{name}.svg"]


def table_files(experiment: str, name: str) -> list[str]:
    """The tracked files of one table (the .csv is shown in the report)."""
    return [f"{FIGURES}/{experiment}/{name}.md",
            reported(f"{FIGURES}/{experiment}/{name}.csv", experiment, name, "tables")]


rule library_digest:
    """sha256 of every source file of the library: the one input through which library changes rerun the rules."""
    input:
        LIBRARY_FILES,
    output:
        LIBRARY,
    localrule: True
    script:
        "../scripts/library_digest.py"
