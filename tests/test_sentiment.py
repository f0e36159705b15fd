"""The sentiment experiment's data and model plan (001 Sec. 4.1, 4.3, App. C.2): caps, training sets, targets."""

from __future__ import annotations

import pandas as pd
import pytest

from modelmerge.experiments.sentiment import domain_cap, domain_frame, model_domains, target_name

TASKS = ["deflategate", "coachella", "apple", "drugs"]


def test_caps_keep_unlisted_domains_whole_and_subsample_listed_ones_seeded(tmp_path):
    for domain, n in (("airline", 50), ("apple", 7)):
        (tmp_path / domain).mkdir()
        pd.DataFrame({"text": [f"{domain} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}).to_parquet(
            tmp_path / domain / "train.parquet")
    caps = {"airline": 20}
    assert domain_cap(caps, "airline") == 20 and domain_cap(caps, "apple") is None and domain_cap(5, "apple") == 5
    capped = domain_frame(tmp_path, "airline", "train", caps, seed=0)
    whole = domain_frame(tmp_path, "apple", "train", caps, seed=0)
    assert len(capped) == 20 and capped["text"].is_unique
    assert sorted(whole["text"]) == sorted(f"apple {i}" for i in range(7))  # every example, shuffled
    assert capped.equals(domain_frame(tmp_path, "airline", "train", caps, seed=0))  # seeded
    assert not capped.equals(domain_frame(tmp_path, "airline", "train", caps, seed=1))
    assert len(domain_frame(tmp_path, "apple", "train", 100, seed=0)) == 7  # a cap above the size keeps all


def test_each_model_trains_on_its_data_and_targets_are_named_in_task_order():
    assert model_domains("base", "airline", TASKS) == ["airline"]
    assert model_domains("apple", "airline", TASKS) == ["apple"]
    assert model_domains("alldata", "airline", TASKS) == TASKS  # 001 Eq. 9: all task data, from the base
    assert target_name(["apple", "coachella"], TASKS) == "target_coachella+apple"
    assert model_domains("target_coachella+apple", "airline", TASKS) == ["coachella", "apple"]
    assert target_name(list(reversed(TASKS)), TASKS) == "alldata"
    for bad in ("target_apple", "target_apple+imdb", "imdb"):
        with pytest.raises(ValueError):
            model_domains(bad, "airline", TASKS)
