"""Seeded train/validation/test splits, written as parquet and read back as `datasets` objects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from modelmerge.files import atomic_path

SPLITS = ("train", "validation", "test")


def split_frame(df: pd.DataFrame, seed: int, validation: float = 0.1, test: float = 0.2) -> dict[str, pd.DataFrame]:
    """Drop duplicate texts, shuffle with ``seed`` and cut into train / validation / test (disjoint texts)."""
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise ValueError(f"bad split fractions validation={validation}, test={test}")
    df = df.drop_duplicates(subset="text").reset_index(drop=True)
    order = np.random.default_rng(seed).permutation(len(df))
    n_val, n_test = round(validation * len(df)), round(test * len(df))
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {k: df.iloc[np.sort(parts[k])].reset_index(drop=True) for k in SPLITS}


def write_splits(splits: dict[str, pd.DataFrame], folder: str | os.PathLike) -> list[Path]:
    """folder/{train,validation,test}.parquet, each written atomically."""
    out = []
    for name, df in splits.items():
        path = Path(folder) / f"{name}.parquet"
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
        out.append(path)
    return out


def read_splits(folder: str | os.PathLike):
    """The splits of a prepared task as a ``datasets.DatasetDict`` (no download, no cache)."""
    from datasets import Dataset, DatasetDict

    folder = Path(folder)
    return DatasetDict({s: Dataset.from_pandas(pd.read_parquet(folder / f"{s}.parquet"), preserve_index=False)
                        for s in SPLITS if (folder / f"{s}.parquet").exists()})


def datasheet_rows(task: str, source: str, splits: dict[str, pd.DataFrame]) -> dict:
    """One row of the datasheet table: sizes per split and the share of positive labels."""
    row = {"task": task, "source": source}
    for s in SPLITS:
        row[s] = len(splits[s])
    labels = pd.concat([splits[s]["label"] for s in SPLITS]) if "label" in splits["train"] else None
    row["positive %"] = round(100 * float(labels.mean()), 1) if labels is not None and len(labels) else float("nan")
    return row
