"""Fine-tuning and metrics on tiny models: the loop learns, the penalty holds theta near theta_0, runs are
reproducible, and the metrics match hand computations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from modelmerge.evaluate import (
    generate,
    gradient_mismatch,
    perplexity,
    task_accuracies,
    toxicity_summary,
    training_gradient,
)
from modelmerge.models import train_tokenizer, tiny_model
from modelmerge.train import TrainConfig, finetune, mean_loss, text_batches

warnings.filterwarnings("ignore", message=".*token_id.*")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "food", "really", "quite"]


def toy_sentiment(n=96, seed=0):
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        positive = bool(rng.integers(2))
        word = rng.choice(WORDS[:3] if positive else WORDS[3:6])
        filler = rng.choice(WORDS[6:], size=3)
        texts.append(" ".join([*filler[:2], str(word), filler[2]]))
        labels.append(int(positive))
    return texts, labels


@pytest.fixture(scope="module")
def toy():
    texts, labels = toy_sentiment()
    return texts, labels, train_tokenizer(texts, vocab_size=64)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_finetuning_lowers_training_loss_and_is_reproducible(toy):
    texts, labels, tok = toy
    cfg = TrainConfig(epochs=8, lr=3e-3, batch_size=16, warmup_steps=2, seed=3)
    batches = text_batches(tok, texts, labels, 32, 16)
    model = tiny_model("bert", tok.vocab_size)
    with torch.no_grad():
        before = float(sum(mean_loss(model.eval(), b, "classification") for b in batches))
    metrics = finetune(model, tok, texts, labels, cfg, device="cpu", progress=False)
    with torch.no_grad():
        after = float(sum(mean_loss(model.eval(), b, "classification") for b in batches))
    assert after < 0.5 * before and metrics["steps"] == 48
    again = tiny_model("bert", tok.vocab_size)
    finetune(again, tok, texts, labels, cfg, device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_quadratic_penalty_keeps_theta_near_theta0(toy):
    texts, labels, tok = toy
    distances = {}
    for penalty in (0.0, 50.0):
        model = tiny_model("bert", tok.vocab_size)
        theta0 = params_of(model)
        cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=16, warmup_steps=0, optimizer="adam_penalty", penalty=penalty)
        finetune(model, tok, texts, labels, cfg, device="cpu", progress=False)
        distances[penalty] = float(torch.sqrt(sum(((p - theta0[k]) ** 2).sum() for k, p in params_of(model).items())))
    assert distances[50.0] < 0.7 * distances[0.0]


def test_causal_lm_finetuning_on_tiny_llama(toy):
    texts, _, tok = toy
    model = tiny_model("llama", tok.vocab_size, task="causal_lm")
    batches = text_batches(tok, texts, None, 32, 16, task="causal_lm")
    before = perplexity(model, batches)
    finetune(model, tok, texts, None, TrainConfig(epochs=5, lr=5e-3, warmup_steps=0), task="causal_lm",
             device="cpu", progress=False)
    assert perplexity(model, batches) < 0.75 * before


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(toy):
    texts, _, tok = toy
    model = tiny_model("llama", tok.vocab_size, task="causal_lm")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # all logits 0: uniform next-token distribution
    assert perplexity(model, text_batches(tok, texts, None, 16, 16, task="causal_lm")) == pytest.approx(tok.vocab_size)


def test_task_accuracies_avg_and_true_avg_by_hand():
    results = {"a": (np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])),  # 3/4
               "b": (np.array([1, 0]), np.array([0, 0]))}  # 1/2
    acc = task_accuracies(results)
    assert acc["a"] == 0.75 and acc["b"] == 0.5
    assert acc["Avg."] == pytest.approx(0.625) and acc["True Avg."] == pytest.approx(4 / 6)


def test_gradient_mismatch_is_the_norm_of_the_gradient_difference(toy):
    texts, labels, tok = toy
    model = tiny_model("bert", tok.vocab_size).double()
    batches = text_batches(tok, texts, labels, 32, 16)
    target = params_of(model)
    merged = {k: v + 0.01 * torch.randn_like(v) for k, v in target.items()}
    assert gradient_mismatch(model, target, target, batches) == 0.0
    # reference: plain autograd on the summed loss with the parameters loaded into the model
    ref = {}
    for name, params in (("t", target), ("m", merged)):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(params[k])
        model.zero_grad()
        sum(mean_loss(model.eval(), b, "classification") * b["labels"].shape[0] for b in batches).backward()
        ref[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    expected = float(torch.sqrt(sum(((ref["t"][k] - ref["m"][k]) ** 2).sum() for k in ref["t"])))
    assert gradient_mismatch(model, target, merged, batches) == pytest.approx(expected, rel=1e-9)
    g = training_gradient(model, target, batches, "classification")
    torch.testing.assert_close(g["classifier.weight"], ref["t"]["classifier.weight"])


def test_toxicity_summary_by_hand():
    s = toxicity_summary(np.array([0.1, 0.5, 0.9, 0.2]), threshold=0.5)
    assert s["100 x avg. toxicity"] == pytest.approx(42.5) and s["% toxic"] == pytest.approx(50.0)
    # std (ddof 1) of the scores = 0.3594..., over sqrt(4); binomial s.e. of 1/2 over 4 = 0.25
    assert s["s.e. 100 x avg. toxicity"] == pytest.approx(100 * np.std([0.1, 0.5, 0.9, 0.2], ddof=1) / 2)
    assert s["s.e. 100 x avg. toxicity"] == pytest.approx(17.97, abs=0.01) and s["s.e. % toxic"] == pytest.approx(25.0)


@pytest.mark.parametrize("arch,task", [("bert", "classification"), ("roberta", "classification"),
                                       ("gpt2", "causal_lm"), ("llama", "causal_lm"), ("t5", "seq2seq")])
def test_tiny_models_are_seeded_and_checkpoints_round_trip(tmp_path, toy, arch, task):
    import json

    import transformers

    from modelmerge.models import save_checkpoint

    _, _, tok = toy
    a, b = tiny_model(arch, tok.vocab_size, task=task, seed=4), tiny_model(arch, tok.vocab_size, task=task, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    folder = save_checkpoint(a, tok, tmp_path / "ckpt", metrics={"loss": [1.0, 0.5]})
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    assert json.loads((folder / "metrics.json").read_text()) == {"loss": [1.0, 0.5]}
    auto = {"classification": transformers.AutoModelForSequenceClassification, "causal_lm": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[task]
    back = auto.from_pretrained(folder)
    sd = back.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in a.state_dict().items() if k in sd)


def test_paired_bootstrap_is_antisymmetric_and_exact_in_degenerate_cases():
    from modelmerge.evaluate import paired_bootstrap

    rng = np.random.default_rng(0)
    a = {t: rng.integers(0, 2, n) for t, n in (("x", 50), ("y", 80))}
    b = {t: rng.integers(0, 2, len(v)) for t, v in a.items()}
    d, lo, hi = paired_bootstrap(a, b, seed=3)
    d2, lo2, hi2 = paired_bootstrap(b, a, seed=3)
    assert d == pytest.approx(np.mean([a[t].mean() - b[t].mean() for t in a])) and lo <= d <= hi
    assert (d2, lo2, hi2) == pytest.approx((-d, -hi, -lo))
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    # a right and b wrong on every example of one task of two: the difference is 1/2 on every resample
    ones = {"x": np.ones(30), "y": np.ones(40)}
    assert paired_bootstrap(ones, {"x": np.zeros(30), "y": np.ones(40)}) == pytest.approx((0.5, 0.5, 0.5))


def test_length_grouped_batches_hold_every_text_once_in_shuffled_order_with_less_padding(toy):
    _, _, tok = toy
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 15)))) for _ in range(203)]

    def rows(batches):
        return sorted(tuple(ids[m.bool()].tolist()) for b in batches for ids, m in zip(b["input_ids"], b["attention_mask"]))

    plain = text_batches(tok, texts, None, 8, 32, True, 5, "causal_lm")
    grouped = text_batches(tok, texts, None, 8, 32, True, 5, "causal_lm", group_by_length=True, group_batches=4)
    assert rows(grouped) == rows(plain) and len(grouped) == len(plain)  # every text once, as many batches
    def padding(batches):
        return sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for b in batches)

    assert padding(grouped) < 0.5 * padding(plain)
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # batch order is shuffled
    again = text_batches(tok, texts, None, 8, 32, True, 5, "causal_lm", group_by_length=True, group_batches=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, again))
    with pytest.raises(ValueError, match="shuffle"):
        text_batches(tok, texts, None, 8, 32, task="causal_lm", group_by_length=True)


def test_generation_grouped_by_length_returns_continuations_in_prompt_order(toy):
    _, _, tok = toy
    model = tiny_model("llama", tok.vocab_size, task="causal_lm", seed=4)
    prompts = ["good", "the movie was really quite awful food", "bad movie", "great", "the food was fine", "poor"]
    # top_p -> 0 keeps only the most likely token: decoding is deterministic, so how prompts are batched cannot matter
    one = [generate(model, tok, [p], prefix="", max_new_tokens=4, top_p=1e-9, batch_size=1)[0] for p in prompts]
    grouped = generate(model, tok, prompts, prefix="", max_new_tokens=4, top_p=1e-9, batch_size=2, by_length=True)
    assert grouped == one and len(set(one)) > 1
