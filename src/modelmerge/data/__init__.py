"""Task data: offline sentiment domains and toxicity sets from packaged corpora; the seeds' datasets from the hub."""

from modelmerge.data.drugs import read_drug_reviews
from modelmerge.data.paper import PAPER_TASKS, load_hub_task
from modelmerge.data.splits import SPLITS, datasheet_rows, read_splits, split_frame, write_splits
from modelmerge.data.toxicity import profanity_scores, toxicity_sets
from modelmerge.data.tweets import SOURCE_RULES, polarity_task, read_tweets, source_counts, source_of

__all__ = [
    "PAPER_TASKS",
    "SOURCE_RULES",
    "SPLITS",
    "datasheet_rows",
    "load_hub_task",
    "polarity_task",
    "profanity_scores",
    "read_drug_reviews",
    "read_splits",
    "read_tweets",
    "source_counts",
    "source_of",
    "split_frame",
    "toxicity_sets",
    "write_splits",
]
