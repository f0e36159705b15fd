"""Toxicity removal (001 Sec. 4.4): Eq. 13's closed form with diagonal Fishers, its special cases, and the wiring."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from modelmerge.experiments.toxicity import (
    kfac_directions,
    load_tied_state,
    parse_variant,
    resolve_delta,
    text_sample,
    toxicity_removal,
    update_norms,
)
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
    assert parse_variant("eq13kfac_0.5_10mean") == ("eq13kfac", 0.5, "10mean")
    for bad in ("ties_1", "eq13", "eq13_1", "ta_", "ta_x", "eq13_1_", "eq13kfac_1", "kfac_1_1"):
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


def test_kfac_direction_equals_the_dense_damped_solve_and_the_diagonal_elsewhere(tmp_path):
    """d = (N_r B_r (x) A_r + delta I)^-1 (N_r B_r (x) A_r + N_t B_t (x) A_t) tau on the linear weight (dense
    reference), (F_r + F_t) / (F_r + delta) tau on the parameters K-FAC does not cover; update norms from it."""
    import json

    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors
    from modelmerge.io import load_state_dict, save_state_dict

    gen = torch.Generator().manual_seed(0)
    def spd(n):
        m = torch.randn(n, n, generator=gen, dtype=torch.float64)
        return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    base = {"layers.0.proj.weight": torch.randn(3, 4, generator=gen), "embed_tokens.weight": torch.randn(5, 2, generator=gen),
            "norm.weight": torch.randn(4, generator=gen)}
    toxic = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for name, state in (("base", base), ("toxic", toxic)):
        save_state_dict(state, tmp_path / "models" / name / "model.safetensors")
    sizes = {"generic": 20, "toxic": 8}
    factors, fishers = {}, {}
    for lm, n in (("base", 10), ("toxic", 4)):  # subsamples of 10 and 4 texts, rescaled to 20 and 8
        f = {k: torch.rand(v.shape, generator=gen) for k, v in base.items()}
        f["embed_tokens.weight"][0] = 0.0 if lm == "base" else 1.0  # a token the generic sample never contains
        DiagonalFisher(f, n).save(tmp_path / "curv" / f"{lm}.fisher.safetensors")
        A, B = spd(4).float(), spd(3).float()
        LayerFactors("kfac", {"layers.0.proj.weight": A}, {"layers.0.proj.weight": B}, {"layers.0.proj.weight": 1},
                     n).save(tmp_path / "curv" / f"{lm}.kfac.safetensors")
        fishers[lm], factors[lm] = {k: v.double() / n for k, v in f.items()}, (A.double(), B.double())
    paths = [str(tmp_path / "d" / f"kfac_{d}.safetensors") for d in ("1e-10", "mean")]
    kfac_directions(str(tmp_path / "models"), str(tmp_path / "curv"), ["1e-10", "mean"], paths, sizes)
    for path, label in zip(paths, ("1e-10", "mean")):
        d = load_state_dict(path)
        rest = {k: v * sizes["generic"] for k, v in fishers["base"].items()}
        task = {k: v * sizes["toxic"] for k, v in fishers["toxic"].items()}
        delta = resolve_delta(label, rest, list(base))
        assert json.loads(open(path + ".json").read())["delta"] == pytest.approx(delta)
        tau = {k: toxic[k].double() - base[k].double() for k in base}
        (Ar, Br), (At, Bt) = factors["base"], factors["toxic"]
        h_rest = sizes["generic"] * torch.kron(Br, Ar)
        h_task = sizes["toxic"] * torch.kron(Bt, At)
        k = "layers.0.proj.weight"
        dense = torch.linalg.solve(h_rest + delta * torch.eye(12, dtype=torch.float64), (h_rest + h_task) @ tau[k].reshape(-1))
        torch.testing.assert_close(d[k].double().reshape(-1), dense, rtol=1e-5, atol=1e-6)
        for k in ("embed_tokens.weight", "norm.weight"):
            expected = (rest[k] + task[k]) / (rest[k] + delta) * tau[k]
            torch.testing.assert_close(d[k].double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
        norms = json.loads(open(path + ".json").read())["update_norms"]
        merged = {k: base[k] - d[k] for k in base}
        assert norms == pytest.approx(update_norms(base, toxic, merged, 1.0), rel=1e-5)
        if label == "1e-10":  # the unseen token's row is scaled by 1 + H_t / delta: the embeddings blow up
            assert norms["embeddings (tied LM head)"] > 1e6


def test_update_norms_are_one_for_task_arithmetic_and_group_parameters():
    gen = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(6, 2, generator=gen), "model.layers.0.mlp.up_proj.weight":
            torch.randn(3, 2, generator=gen), "model.norm.weight": torch.randn(2, generator=gen)}
    toxic = {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()}
    ta = toxicity_removal(base, toxic, "ta", 0.4)
    assert update_norms(base, toxic, ta, 0.4) == pytest.approx(dict.fromkeys(update_norms(base, toxic, ta, 0.4), 1.0))
    doubled = {k: base[k] - 2 * 0.4 * (toxic[k] - base[k]) if "up_proj" in k else ta[k] for k in base}
    assert update_norms(base, toxic, doubled, 0.4) == pytest.approx(
        {"embeddings (tied LM head)": 1.0, "linear layers": 2.0, "norms": 1.0})


def test_a_model_above_the_perplexity_cap_is_not_generated_from_and_perplexity_ignores_batch_order():
    from modelmerge.evaluate import perplexity
    from modelmerge.experiments.toxicity import generation_report
    from modelmerge.models import train_tokenizer
    from modelmerge.train import text_batches

    texts = [" ".join(f"w{(i * j) % 17}" for j in range(1 + i % 9)) for i in range(30)]
    tok = train_tokenizer(texts, vocab_size=60)
    model = tiny_model("llama", tok.vocab_size, task="causal_lm", seed=1)
    cfg = dict(scorer="profanity-check", threshold=0.5, prefix="", max_new_tokens=3, top_p=0.9, seed=0, max_length=16,
               batch_size=4)
    scored = generation_report(model, tok, texts[:5], texts[5:], **cfg)
    # the report batches the held-out texts by length: exp(mean NLL) cannot depend on how they are batched
    expected = perplexity(model, text_batches(tok, texts[5:], None, 3, 16, task="causal_lm"))
    assert scored["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert scored["scored"] and scored["n_prompts"] == 5 and len(scored["generations"]) == 5
    capped = generation_report(model, tok, texts[:5], texts[5:], **cfg, max_perplexity=0.5 * expected)
    assert not capped["scored"] and capped["generations"] == [] and capped["perplexity"] == scored["perplexity"]
    assert all(capped[k] != capped[k] for k in ("100 x avg. toxicity", "% toxic"))  # NaN: not scored
    # an infinite perplexity is never generated from, even without a cap
    with torch.no_grad():
        model.model.norm.weight.fill_(1e4)
    broken = generation_report(model, tok, texts[:5], texts[5:], **cfg)
    assert broken["perplexity"] == float("inf") and not broken["scored"]
