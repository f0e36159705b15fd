"""Task data: offline sentiment domains and toxicity sets from packaged corpora; the seeds' datasets from the hub.

The names below are imported on first use (see ``modelmerge.lazy_attribute``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelmerge import lazy_attribute

_EXPORTS = {
    "read_drug_reviews": "modelmerge.data.drugs",
    **dict.fromkeys(["PAPER_TASKS", "load_hub_task"], "modelmerge.data.paper"),
    **dict.fromkeys(["SPLITS", "datasheet_rows", "read_splits", "split_frame", "write_splits"], "modelmerge.data.splits"),
    **dict.fromkeys(["profanity_scores", "toxicity_sets"], "modelmerge.data.toxicity"),
    **dict.fromkeys(["SOURCE_RULES", "polarity_task", "read_tweets", "source_counts", "source_of"],
                    "modelmerge.data.tweets"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    return lazy_attribute(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from modelmerge.data.drugs import read_drug_reviews
    from modelmerge.data.paper import PAPER_TASKS, load_hub_task
    from modelmerge.data.splits import SPLITS, datasheet_rows, read_splits, split_frame, write_splits
    from modelmerge.data.toxicity import profanity_scores, toxicity_sets
    from modelmerge.data.tweets import SOURCE_RULES, polarity_task, read_tweets, source_counts, source_of
