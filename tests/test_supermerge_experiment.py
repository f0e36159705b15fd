"""The learned-merging experiment (004) on the suite: task-routed learned merges on a tiny suite, hierarchical
merging through files, the recorded coefficients reproduce the saved merge, 004's rank tables and Eq. 6, and
hierarchical merging measured leaner than the flat merge in separate processes."""

from __future__ import annotations

import copy
import functools
import json
import multiprocessing

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from modelmerge.cost import peak_memory_eq6
from modelmerge.experiments.suite import eval_frame, load_suite_model, suite_pretrained
from modelmerge.experiments.supermerge import (
    FirstEpochFlops, Prefixed, learn_suite_merge, main, measured_learned_merge, rank_accuracy_table, ranks,
    strip_prefix, tagged_batches, trainable_parameters, tree_names,
)
from modelmerge.heads import LinearHead
from modelmerge.io import LazySafetensors, load_state_dict, save_state_dict
from modelmerge.merge import LayerwiseMerge, task_arithmetic
from modelmerge.merge.learned import forward_merged, merge_objective

TASKS = ["t0", "t1", "t2", "t3"]
WORDS = {0: ["awful", "late", "rude", "broken"], 1: ["okay", "today", "news", "monday"], 2: ["great", "love", "fast", "happy"]}


def toy_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(WORDS[int(y)], 3)) + f" item{seed}x{i}" for i, y in enumerate(labels)]
    return pd.DataFrame({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """A tiny random BERT, four tasks with validation splits and random frozen heads, and four 'task models':
    the encoder plus seeded perturbations of different sizes (what the merge learns from does not need training)."""
    from modelmerge.data import write_splits

    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    for i, t in enumerate(TASKS):
        write_splits({s: toy_frame(n, 10 * i + j) for j, (s, n) in enumerate((("train", 8), ("validation", 12), ("test", 8)))},
                     data / t)
    (data / "classes.json").write_text(json.dumps({t: ["neg", "neu", "pos"] for t in TASKS}))
    suite_pretrained("tiny", str(root / "models/pretrained"), "", str(data), seed=0)
    gen = torch.Generator().manual_seed(0)
    (root / "heads").mkdir()
    for t in TASKS:
        LinearHead(torch.randn(3, 32, generator=gen), torch.randn(3, generator=gen), scale=4.0,
                   classes=["neg", "neu", "pos"]).save(root / "heads" / f"{t}.safetensors")
    base = load_state_dict(root / "models/pretrained/model.safetensors")
    for i, t in enumerate(TASKS):
        scale = 0.05 * (i + 1)
        save_state_dict({k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                         for k, v in base.items()}, root / "models" / t / "model.safetensors")
    return root, data


def load(root, data, batch_size=4):
    model, tokenizer = load_suite_model(str(root / "models/pretrained"), str(root / "heads"), TASKS)
    model = model.double()
    frames = {t: eval_frame(data, t, "validation") for t in TASKS}
    batches = tagged_batches(tokenizer, frames, batch_size, 16, seed=0)
    base = Prefixed({k: v.double() for k, v in load_state_dict(root / "models/pretrained/model.safetensors").items()}, "encoder.")
    models = [Prefixed({k: v.double() for k, v in load_state_dict(root / "models" / t / "model.safetensors").items()}, "encoder.")
              for t in TASKS]
    return model, base, models, [batches[t] for t in TASKS]


def mean_loss(model, state, batches, objective="classification"):
    with torch.no_grad():
        flat = [b for bs in batches for b in bs]
        return float(np.mean([float(merge_objective(objective, forward_merged(model, state, b), b)) for b in flat]))


def test_a_tagged_batch_is_scored_with_its_own_tasks_head(tiny_suite):
    """SuperMerge at c = tanh(w) = lambda is task arithmetic at lambda, and each batch goes through its task's head:
    the routed logits equal the suite model with the task-arithmetic encoder loaded and that task selected."""
    model, base, models, batches = load(*tiny_suite)
    merged = LayerwiseMerge(base, models, init=0.4).merged()
    ta = strip_prefix(task_arithmetic(dict(base.items()), [dict(m.items()) for m in models], 0.4), "encoder.")
    reference = copy.deepcopy(model)
    reference.load_encoder_state(ta)
    for t, bs in zip(TASKS, batches):
        b = bs[0]
        assert b["task"] == t
        routed = forward_merged(model, merged, b)
        inputs = {k: v for k, v in b.items() if k not in ("labels", "task")}
        torch.testing.assert_close(routed, reference.set_task(t)(**inputs).logits, atol=1e-12, rtol=0)
    other = reference.set_task("t1")(**{k: v for k, v in batches[0][0].items() if k not in ("labels", "task")}).logits
    assert not torch.allclose(forward_merged(model, merged, batches[0][0]), other)  # the head does matter


def test_learned_merges_lower_the_loss_they_optimise_and_leave_the_skeleton_alone(tiny_suite):
    model, base, models, batches = load(*tiny_suite)
    start = mean_loss(model, LayerwiseMerge(base, models, init=0.3).merged(), batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sm = learn_suite_merge("supermerge", base, models, model, batches, epochs=15, lr=0.05, progress=False)
    assert mean_loss(model, sm["state"], batches) < start
    assert sm["coefficients"].shape == (len(TASKS), len(sm["names"])) and bool((sm["coefficients"].abs() < 1).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # AdaMerging learns from the same inputs without their labels: lower entropy, coefficients in [0, 1]
    entropy_start = mean_loss(model, LayerwiseMerge(base, models, init=0.3).merged(), batches, "entropy")
    ada = learn_suite_merge("adamerging", base, models, model, batches, epochs=15, lr=0.05, progress=False)
    assert mean_loss(model, ada["state"], batches, "entropy") < entropy_start
    assert bool(((ada["coefficients"] >= 0) & (ada["coefficients"] <= 1)).all())


def test_hierarchical_through_files_equals_in_memory_and_full_fan_in_equals_flat(tiny_suite, tmp_path):
    model, base, models, batches = load(*tiny_suite)
    kw = dict(epochs=2, lr=0.05, progress=False)
    flat = learn_suite_merge("supermerge", base, models, model, batches, **kw)
    full = learn_suite_merge("hierarchical", base, models, model, batches, fan_in=len(TASKS), store_dir=tmp_path, **kw)
    assert full["tree"] == [[[0, 1, 2, 3]]] and full["losses"] == flat["losses"]
    assert all(torch.equal(full["state"][k], flat["state"][k]) for k in flat["state"])
    # fan-in 2: three merges on disk; the same as hierarchical_merge kept in memory
    from modelmerge.merge import hierarchical_merge, supermerge

    pairs = learn_suite_merge("hierarchical", base, models, model, batches, fan_in=2, store_dir=tmp_path, **kw)
    in_memory, tree = hierarchical_merge(base, models, batches, lambda b, g, d: supermerge(b, g, model, d, **kw).state, 2)
    assert pairs["tree"] == tree and len(tree) == 2 and all(len(g) == 2 for level in tree for g in level)
    assert all(torch.equal(pairs["state"][k], in_memory[k]) for k in in_memory)
    assert list(tmp_path.iterdir()) == []  # the intermediate files are gone
    names = tree_names(tree, TASKS)
    assert sorted(t for g in names[0] for t in g) == TASKS and len(names[-1]) == 1 and sorted(names[-1][0]) == TASKS
    assert trainable_parameters("hierarchical", 4, 10, tree) == (3 * 2 * 10, 2 * 10)
    assert trainable_parameters("supermerge", 4, 10) == (40, 40)


@pytest.mark.parametrize("method", ["supermerge", "supermerge_no_tanh", "adamerging"])
def test_the_command_line_merge_is_what_its_recorded_coefficients_say(tiny_suite, tmp_path, method):
    """learned.json's c (tanh(w) for SuperMerge, w for the ablation, w in [0, 1] for AdaMerging) reproduce the saved
    encoder: theta = theta_0 + sum_i c_ij tau_ij for every tensor j."""
    root, data = tiny_suite
    threads = torch.get_num_threads()
    try:
        main(["learn", "--method", method, "--tasks", *TASKS, "--suite-dir", str(root), "--data-dir",
              str(data), "--out-dir", str(tmp_path), "--epochs", "2", "--lr", "0.05", "--batch-size", "4",
              "--max-length", "16", "--count-flops"])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "learned.json").read_text())
    merged = load_state_dict(tmp_path / "model.safetensors")
    base = load_state_dict(root / "models/pretrained/model.safetensors")
    models = [load_state_dict(root / "models" / t / "model.safetensors") for t in TASKS]
    c = torch.tensor(record["coefficients"], dtype=torch.float64)
    assert record["tasks"] == TASKS and c.shape == (len(TASKS), len(record["names"]))
    assert not torch.allclose(c, torch.full_like(c, 0.3))  # it learned something
    assert bool((c.abs() < 1).all()) if method == "supermerge" else True
    assert bool(((c >= 0) & (c <= 1)).all()) if method == "adamerging" else True
    for j, n in enumerate(record["names"]):
        expected = base[n].double() + sum(c[i, j] * (models[i][n].double() - base[n].double()) for i in range(len(TASKS)))
        torch.testing.assert_close(merged[n].double(), expected, atol=1e-6, rtol=1e-5)
    cost = record["cost"]
    assert cost["steps"] == len(record["losses"]) == 2 * 3 * len(TASKS)  # 2 epochs x 3 batches of 4 per task
    assert cost["trainable"] == c.numel() and cost["examples"] == 12 * len(TASKS) and cost["flops_per_epoch"] > 0


def test_counted_flops_of_a_learned_merge_epoch_match_the_count_by_hand():
    """Per step: the merge c @ tau and its gradient tau @ g (2 k n FLOPs each per tensor of n entries), each linear
    layer's forward and weight gradient (2 B d_in d_out each), and the input gradient of every layer but the first."""
    from modelmerge.merge import supermerge

    torch.manual_seed(0)
    a, h, o, batch, k = 5, 7, 3, 4, 3
    skeleton = nn.Sequential(nn.Linear(a, h), nn.Tanh(), nn.Linear(h, o)).double()
    base = {n: v.detach().clone() for n, v in skeleton.state_dict().items()}
    models = [{n: v + 0.1 * torch.randn_like(v) for n, v in base.items()} for _ in range(k)]
    batches = [{"input": torch.randn(batch, a, dtype=torch.float64), "labels": torch.randint(0, o, (batch,))}
               for _ in range(2)]
    counter = FirstEpochFlops()
    supermerge(base, models, skeleton, batches, epochs=2, lr=0.01, progress=False, on_epoch=counter)
    merge = sum(4 * k * v.numel() for v in base.values())
    layers = 2 * batch * a * h * 2 + 2 * batch * h * o * 3
    assert counter.total == len(batches) * (merge + layers) and counter.runs == 1


def test_first_epoch_flops_are_an_epochs_matrix_products():
    """Counted on the first epoch only: one (8 x 5) @ (5 x 3) product forward is 2*8*5*3 FLOPs."""
    counter = FirstEpochFlops()
    a, b = torch.randn(8, 5), torch.randn(5, 3)
    for epoch in range(3):
        counter(epoch)
        a @ b
    counter(3)
    assert counter.total == 2 * 8 * 5 * 3 and counter.runs == 1
    for epoch in range(2):  # a second learning run adds its own first epoch
        counter(epoch)
        a @ b
        a @ b
    counter(2)
    assert counter.total == 3 * 2 * 8 * 5 * 3 and counter.runs == 2


def test_ranks_share_the_best_rank_and_the_table_reads_like_004():
    acc = pd.DataFrame({"a": [0.9, 0.8, 0.9, 0.5], "b": [0.1, 0.3, 0.2, 0.7]}, index=["Individual", "X", "Y", "Z"])
    r = ranks(acc.loc[["X", "Y", "Z"]])
    assert r.loc[:, "a"].tolist() == [2, 1, 3] and r.loc[:, "b"].tolist() == [2, 3, 1]
    tied = ranks(pd.DataFrame({"a": [0.5, 0.5, 0.4]}, index=["p", "q", "r"]))
    assert tied["a"].tolist() == [1, 1, 3]
    table = rank_accuracy_table(acc, ["X", "Y", "Z"], reference=["Individual"]).set_index("method")
    assert table.loc["Individual", "a"] == "90.0" and table.loc["Individual", "Avg."] == "50.0"
    assert table.loc["X", "a"] == "2 (80.0)" and table.loc["Y", "Avg."] == "2.0 (55.0)" and table.loc["Z", "b"] == "1 (70.0)"
    assert list(rank_accuracy_table(acc, ["X", "Z"], reference=["Individual"], unranked=["Y"])["method"]) == ["Individual", "X", "Z", "Y"]
    unranked = rank_accuracy_table(acc, ["X", "Z"], unranked=["Y"]).set_index("method")
    assert unranked.loc["Y", "a"] == "90.0" and unranked.loc["X", "a"] == "1 (80.0)"  # Y does not take X's rank
    grouped = rank_accuracy_table(acc, ["X", "Y", "Z"], groups={"In-domain": ["a"], "Out-of-domain": ["b"]}).set_index("method")
    assert grouped.loc["Z", "In-domain Avg."] == "3.0 (50.0)" and grouped.loc["Z", "Out-of-domain Avg."] == "1.0 (70.0)"


def test_peak_memory_eq6_by_hand():
    """004 App. A.2: 4 bytes per weight, 4 per gradient and 8 for Adam per trainable one, 4 per task-vector entry."""
    assert peak_memory_eq6(1000, 10, 3, 900) == 4 * 1000 + 4 * 10 + 8 * 10 + 4 * 3 * 900
    assert peak_memory_eq6(2_850_000_000, 2_850_000_000, 0, 0) == 16 * 2_850_000_000  # full fine-tuning: no task vectors
    flat, hier = peak_memory_eq6(100, 16, 8, 100), peak_memory_eq6(100, 4, 2, 100)
    assert flat - hier == 4 * 6 * 100 + 12 * 12


def test_prefixed_is_lazy_and_round_trips(tmp_path):
    save_state_dict({"w": torch.arange(6.0).reshape(2, 3), "i": torch.arange(3)}, tmp_path / "m.safetensors")
    lazy = Prefixed(LazySafetensors(tmp_path / "m.safetensors"), "encoder.")
    assert sorted(lazy) == ["encoder.i", "encoder.w"] and lazy.info("encoder.w") == (torch.float32, (2, 3))
    assert torch.equal(strip_prefix(dict(lazy.items()), "encoder.")["w"], torch.arange(6.0).reshape(2, 3))
    with pytest.raises(KeyError):
        lazy["w"]


# --- hierarchical merging measured leaner than the flat merge, each in a fresh process ------------------------------

def _big_models(tmp_path, n: int = 8, width: int = 1536):
    """Eight task models of a 4.7 M-parameter MLP (19 MB each), saved as files."""
    torch.manual_seed(0)
    skeleton = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
    base = {k: v.detach().clone() for k, v in skeleton.state_dict().items()}
    save_state_dict(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(n):
        save_state_dict({k: v + 0.01 * torch.randn(v.shape) for k, v in base.items()}, tmp_path / f"m{i}.safetensors")
        paths.append(str(tmp_path / f"m{i}.safetensors"))
    gen = torch.Generator().manual_seed(1)
    batches = [[{"input": torch.randn(4, width, generator=gen), "labels": torch.randint(0, 3, (4,), generator=gen)}]
               for _ in range(n)]
    return skeleton, batches, str(tmp_path / "base.safetensors"), paths


def test_hierarchical_merge_is_measured_leaner_than_the_flat_merge(tmp_path):
    skeleton, batches, base, paths = _big_models(tmp_path)
    build = functools.partial(copy.deepcopy, (skeleton, batches))  # a fresh copy inside each process
    ctx = multiprocessing.get_context("spawn")
    costs = {}
    for method in ("supermerge", "hierarchical"):
        with ctx.Pool(1) as pool:
            _, costs[method] = pool.apply(measured_learned_merge, (method, base, paths, build),
                                          dict(epochs=1, lr=0.01, fan_in=2, store_dir=str(tmp_path), progress=False))
    flat, hier = costs["supermerge"], costs["hierarchical"]
    tv_mb = flat["task_vector_parameters"] * 4 / 2**20
    # the flat merge holds eight task vectors at once, the hierarchical one two: 6 x 18 MB fewer, at least half shows
    assert flat["peak_host_mb"] - hier["peak_host_mb"] > 3 * tv_mb, (flat, hier)
    assert hier["trainable_at_once"] == 2 * 6 < flat["trainable_at_once"] == 8 * 6
    assert hier["flops_per_epoch"] > flat["flops_per_epoch"]  # every level passes over the data again


def _toy_task_models(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=gen, dtype=torch.float64), "b": torch.randn(5, generator=gen, dtype=torch.float64),
            "step": torch.tensor(3)}
    models = [{k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) if v.is_floating_point() else v
               for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("method", ["Task Arith.", "DARE + Task Arith.", "TIES", "DARE + TIES"])
def test_a_tuned_baseline_is_the_direct_merge_at_the_lambda_its_score_prefers(method):
    from modelmerge.experiments.supermerge import tuned_baseline
    from modelmerge.merge import dare, ties

    base, models = _toy_task_models()
    ms = dare(base, models, 0.5, seed=7) if method.startswith("DARE") else models

    def direct(lam):
        return task_arithmetic(base, ms, lam) if "Task Arith." in method else ties(base, ms, k=0.3, lam=lam)

    target = direct(0.4)  # the score prefers the merge at lambda 0.4: minus its distance to it
    def score(state):
        return -float(sum(((state[k] - target[k]) ** 2).sum() for k in ("w", "b")))

    state, lam, scores = tuned_baseline(method, base, models, score, lambdas=[1.0, 0.2, 0.4, 0.7], ties_k=0.3,
                                        dare_p=0.5, seed=7)
    assert lam == 0.4 and list(scores) == [0.2, 0.4, 0.7, 1.0] and scores[0.4] == pytest.approx(0.0, abs=1e-20)
    for lam_ in (0.2, 0.7, 1.0):  # every baseline is linear in lambda: the grid's merges are the direct merges
        other, _, _ = tuned_baseline(method, base, models, lambda s, l=lam_: -float(((s["w"] - direct(l)["w"]) ** 2).sum()),
                                     lambdas=[0.2, 0.4, 0.7, 1.0], ties_k=0.3, dare_p=0.5, seed=7)
        torch.testing.assert_close(other["w"], direct(lam_)["w"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["b"], target["b"], rtol=1e-12, atol=1e-12)
    assert torch.equal(state["step"], base["step"])


def test_a_tie_in_the_tuning_score_keeps_the_smaller_lambda():
    from modelmerge.experiments.supermerge import tuned_baseline

    base, models = _toy_task_models()
    _, lam, _ = tuned_baseline("Task Arith.", base, models, lambda s: 1.0, lambdas=[0.7, 0.3, 0.5], ties_k=0.2, dare_p=0.5,
                               seed=0)
    assert lam == 0.3
    with pytest.raises(ValueError, match="method must be one of"):
        tuned_baseline("Averaging", base, models, lambda s: 1.0, lambdas=[0.5], ties_k=0.2, dare_p=0.5, seed=0)


def test_tuning_batches_are_a_seeded_subsample_of_validation_in_token_order(tiny_suite):
    from types import SimpleNamespace

    from modelmerge.experiments.suite import length_order, tuning_batches

    root, data = tiny_suite
    _, tokenizer = load_suite_model(str(root / "models/pretrained"), str(root / "heads"), TASKS)
    frames = {t: eval_frame(data, t, "validation") for t in TASKS}
    evaluator = SimpleNamespace(frames={"validation": frames}, tokenizer=tokenizer)
    a = tuning_batches(evaluator, TASKS[:2], 5, seed=3, max_length=16, batch_size=2)
    b = tuning_batches(evaluator, TASKS[:2], 5, seed=3, max_length=16, batch_size=2)
    for t in TASKS[:2]:
        ids = torch.cat([x["input_ids"].flatten() for x in a[t]])
        assert torch.equal(ids, torch.cat([x["input_ids"].flatten() for x in b[t]]))  # seeded
        lengths = [int(m.sum()) for x in a[t] for m in x["attention_mask"]]
        assert len(lengths) == 5 and lengths == sorted(lengths)  # 5 examples, shortest first
        labels = torch.cat([x["labels"] for x in a[t]]).tolist()
        sub = frames[t].sample(n=5, random_state=3).sort_index()
        assert sorted(labels) == sorted(sub["label"].tolist())
        assert labels == sub["label"].to_numpy()[length_order(tokenizer, sub, 16)].tolist()
    whole = tuning_batches(evaluator, TASKS[:1], 100, seed=3, max_length=16)  # more than there are: all of them
    assert sum(len(x["labels"]) for x in whole[TASKS[0]]) == len(frames[TASKS[0]])
