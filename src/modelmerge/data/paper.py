"""The seeds' datasets from the Hugging Face hub (paper configuration), normalised to text (+ label) frames.

Sentiment tasks of 001 Sec. 4.3 / App. C.2 (IMDB, Yelp polarity, RottenTomatoes, SST-2, Amazon polarity; the
first 20% of Yelp's and 10% of Amazon's training data), and the toxicity data of 001 App. C.3 (Civil Comments
with toxicity >= 0.8, the first 10,000 lines of WikiText-103, RealToxicityPrompts). ``data_files`` points the
same code at local files in the hub's format (tests, mirrors) instead of the hub.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pandas as pd


@dataclass(frozen=True)
class HubTask:
    """Where a dataset lives on the hub and how its columns map to ``text`` / ``label``."""

    path: str
    config: str | None = None
    text: str | Callable[[pd.DataFrame], pd.Series] = "text"
    label: str | Callable[[pd.DataFrame], pd.Series] | None = "label"
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
    train_fraction: float = 1.0  # keep the first fraction of the training split (001 App. C.2)
    keep: Callable[[pd.DataFrame], pd.Series] | None = None  # row filter, e.g. toxicity >= 0.8
    max_rows: int | None = None


def _column(df: pd.DataFrame, spec) -> pd.Series:
    return spec(df) if callable(spec) else df[spec]


PAPER_TASKS: dict[str, HubTask] = {
    "imdb": HubTask("stanfordnlp/imdb"),
    "yelp": HubTask("fancyzhx/yelp_polarity", train_fraction=0.2),
    "rotten_tomatoes": HubTask(
        "cornell-movie-review-data/rotten_tomatoes", splits={"train": "train", "validation": "validation", "test": "test"}
    ),
    # SST-2's test labels are hidden: its validation split serves as the test split
    "sst2": HubTask("stanfordnlp/sst2", text="sentence", splits={"train": "train", "test": "validation"}),
    "amazon": HubTask(
        "fancyzhx/amazon_polarity", text=lambda d: d["title"].fillna("") + ". " + d["content"].fillna(""), train_fraction=0.1
    ),
    "civil_comments": HubTask(
        "google/civil_comments", label=None, splits={"train": "train"}, keep=lambda d: d["toxicity"] >= 0.8
    ),
    "wikitext103": HubTask(
        "Salesforce/wikitext", "wikitext-103-raw-v1", label=None, splits={"train": "train"},
        keep=lambda d: d["text"].str.strip().str.len() > 0, max_rows=10_000,
    ),
    "real_toxicity_prompts": HubTask(
        "allenai/real-toxicity-prompts", text=lambda d: d["prompt"].map(lambda p: p["text"]), label=None,
        splits={"train": "train"},
    ),
}


def load_hub_task(name: str, data_files: Mapping[str, str] | None = None, builder: str = "parquet") -> dict[str, pd.DataFrame]:
    """Our split name -> frame with ``text`` (and ``label``) for one of ``PAPER_TASKS``.

    Without ``data_files`` this downloads from the hub (``datasets.load_dataset(path, config)``); with it, the
    files (keyed by the hub's split names) are read by the ``builder`` ("parquet", "json", "csv") offline.
    """
    import datasets

    if name not in PAPER_TASKS:
        raise KeyError(f"unknown paper task {name!r}; known: {sorted(PAPER_TASKS)}")
    spec = PAPER_TASKS[name]
    if data_files is not None:
        raw = datasets.load_dataset(builder, data_files=dict(data_files))
    else:
        raw = datasets.load_dataset(spec.path, spec.config)
    out = {}
    for ours, theirs in spec.splits.items():
        df = raw[theirs].to_pandas()
        if ours == "train" and spec.train_fraction < 1.0:
            df = df.iloc[: int(len(df) * spec.train_fraction)]
        if spec.keep is not None:
            df = df[spec.keep(df)]
        if spec.max_rows is not None:
            df = df.iloc[: spec.max_rows]
        frame = pd.DataFrame({"text": _column(df, spec.text).astype(str).tolist()})
        if spec.label is not None:
            frame["label"] = _column(df, spec.label).astype(int).tolist()
        out[ours] = frame.reset_index(drop=True)
    return out
