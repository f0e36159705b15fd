# Helpers shared by every rule: paths from the configuration and the papermill command line.
import os
import shlex
import sys
from pathlib import Path

import yaml

RESULTS = config["results_dir"]
# the library is an input of every rule: changing an algorithm reruns what depends on it
LIBRARY = sorted(str(p) for p in Path(workflow.basedir, "src", "modelmerge").rglob("*.py"))
FIGURES = config["figures_dir"]

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


def figure_files(experiment: str, name: str) -> list[str]:
    """The tracked files of one figure."""
    return [f"{FIGURES}/{experiment}/{name}.png", f"{FIGURES}/{experiment}/{name}.svg"]


def table_files(experiment: str, name: str) -> list[str]:
    """The tracked files of one table."""
    return [f"{FIGURES}/{experiment}/{name}.md", f"{FIGURES}/{experiment}/{name}.csv"]
