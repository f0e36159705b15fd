"""Toxicity removal (001 Sec. 4.4): Eq. 13's closed form with diagonal Fishers, its special cases, and the wiring."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from modelmerge.experiments.toxicity import load_tied_state, parse_variant, resolve_delta, text_sample, toxicity_removal
from modelmerge.models import tiny_model


def test_eq13_with_diagonal_fishers_is_task_arithmetic_rescaled_per_parameter(models, fishers):
    base, (toxic, *_) = models
    f_rest, f_task = fishers[0], fishers[1]
    alpha, delta = 0.7, 0.05
    merged = toxicity_removal(base, toxic, "eq13", alpha, f_rest, f_task, delta)
    for k in base:  # H_rest = H_0 = F_rest: theta_0 - alpha (F_rest + F_t) / (F_rest + delta) tau
        tau = toxic[k] - base[k]
        expected = base[k] - alpha * (f_rest[k] + f_task[k]) / (f_rest[k] + delta) * tau
        torch.testing.assert_close(merged[k], expected, rtol=1e-12, atol=1e-12)


def test_eq13_reduces_to_task_arithmetic_without_task_curvature(models, fishers):
    base, (toxic, *_) = models
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    eq13 = toxicity_removal(base, toxic, "eq13", 0.6, fishers[0], zero, delta=0.0)
    ta = toxicity_removal(base, toxic, "ta", 0.6)
    for k in base:
        torch.testing.assert_close(eq13[k], ta[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ta[k], base[k] - 0.6 * (toxic[k] - base[k]))


def test_eq13_removes_more_than_task_arithmetic_where_only_the_toxic_data_has_curvature(models, fishers):
    base, (toxic, *_) = models
    f_rest = {k: torch.ones_like(v) for k, v in base.items()}
    f_task = {k: torch.zeros_like(v) for k, v in base.items()}
    f_task["head.weight"][0, 0] = 9.0  # one parameter the toxic data determines ten times as much
    eq13 = toxicity_removal(base, toxic, "eq13", 1.0, f_rest, f_task)
    tau = toxic["head.weight"] - base["head.weight"]
    step = base["head.weight"] - eq13["head.weight"]
    assert step[0, 0] == pytest.approx(10 * tau[0, 0])
    torch.testing.assert_close(step.flatten()[1:], tau.flatten()[1:])


def test_variants_parse_and_bad_ones_are_refused():
    assert parse_variant("base") == ("base", None, None) and parse_variant("toxic") == ("toxic", None, None)
    assert parse_variant("ta_0.25") == ("ta", 0.25, None)
    assert parse_variant("eq13_2_1e-10") == ("eq13", 2.0, "1e-10") and parse_variant("eq13_1_mean") == ("eq13", 1.0, "mean")
    for bad in ("ties_1", "eq13", "eq13_1", "ta_", "ta_x", "eq13_1_"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    with pytest.raises(ValueError):
        toxicity_removal({}, {}, "ties", 1.0)


def test_text_sample_is_seeded_keeps_set_order_and_takes_all_when_small(tmp_path):
    path = tmp_path / "set.parquet"
    pd.DataFrame({"text": [f"t{i}" for i in range(49)] + ["a\r\n b\t c"]}).to_parquet(path)
    a, b = text_sample(path, 10, seed=3), text_sample(path, 10, seed=3)
    assert a == b and len(set(a)) == 10
    assert a == sorted(a, key=lambda t: int(t[1:]) if t[1:].isdigit() else 99)  # subsample in the set's order
    assert text_sample(path, 10, seed=4) != a
    assert text_sample(path, 500, seed=3) == [f"t{i}" for i in range(49)] + ["a b c"]  # whitespace runs: one space


def test_tied_lm_head_follows_the_embedding_and_other_missing_weights_fail():
    model = tiny_model("llama", 50, task="causal_lm")
    state = {k: v + 1.0 for k, v in model.state_dict().items() if k != "lm_head.weight"}  # as saved: head tied
    load_tied_state(model, state)
    torch.testing.assert_close(model.lm_head.weight, state["model.embed_tokens.weight"])
    del state["model.norm.weight"]
    with pytest.raises(KeyError, match="model.norm.weight"):
        load_tied_state(model, state)


def test_delta_mean_is_the_mean_diagonal_entry_of_the_rest_curvature():
    rest = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[10.0]]), "tied": torch.tensor([100.0])}
    assert resolve_delta("mean", rest, ["a", "b"]) == pytest.approx(16.0 / 4)
    assert resolve_delta("10mean", rest, ["a", "b"]) == pytest.approx(40.0)
    assert resolve_delta("1e-10", rest, ["a", "b"]) == 1e-10
