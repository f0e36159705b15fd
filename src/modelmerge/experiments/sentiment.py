"""Helpers of the `sentiment` experiment (001 Sec. 4.3): data subsets, the starting encoder, its curvature."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

#: a cap on examples: one number for every domain, or domain -> number with unlisted domains kept whole
Cap = int | Mapping[str, int] | None


def domain_cap(cap: Cap, domain: str) -> int | None:
    """The cap of one domain (None: its whole split)."""
    if isinstance(cap, Mapping):
        return cap.get(domain)
    return cap


def domain_frame(data_dir: str | os.PathLike, domain: str, split: str, limit: Cap, seed: int) -> pd.DataFrame:
    """A seeded subsample of at most ``limit`` rows of one prepared split (the whole split, shuffled, if smaller or
    uncapped); ``limit`` may map domains to caps."""
    df = pd.read_parquet(Path(data_dir) / domain / f"{split}.parquet")
    n = domain_cap(limit, domain)
    return df.sample(n=len(df) if n is None else min(n, len(df)), random_state=seed).reset_index(drop=True)


def model_domains(name: str, base_domain: str, task_domains: list[str]) -> list[str]:
    """Training domains of a model: the base domain (base), its own (a task), the four tasks (the all-data target,
    001's theta_{1:T}: the base fine-tuned on all task data at once), or a subset ('target_a+b')."""
    if name == "base":
        return [base_domain]
    if name == "alldata":
        return list(task_domains)
    if name.startswith("target_"):
        chosen = name[len("target_"):].split("+")
        unknown = [d for d in chosen if d not in task_domains]
        if unknown or len(chosen) < 2:
            raise ValueError(f"{name!r}: a target names two or more task domains of {task_domains}, joined by '+'")
        return chosen
    if name not in task_domains:
        raise ValueError(f"unknown sentiment model {name!r}")
    return [name]


def target_name(subset: list[str], task_domains: list[str]) -> str:
    """The model that is the target of merging ``subset``: 'alldata' for every task, else 'target_a+b' (task order)."""
    ordered = [d for d in task_domains if d in subset]
    return "alldata" if len(ordered) == len(task_domains) else "target_" + "+".join(ordered)


def sentiment_pretrained(source: str, out_dir: str, minilm_dir: str, data_dir: str, seed: int = 0) -> None:
    """Save the starting encoder with a fresh, seeded 2-class head: MiniLM, a tiny BERT, or a hub model."""
    import torch

    from modelmerge.models import load_sequence_classifier, save_checkpoint, tiny_model, train_tokenizer

    torch.manual_seed(seed)
    if source == "tiny":
        texts = pd.concat([pd.read_parquet(p)["text"] for p in sorted(Path(data_dir).glob("*/train.parquet"))])
        tokenizer = train_tokenizer(texts.tolist(), vocab_size=500)
        model = tiny_model("bert", tokenizer.vocab_size, seed=seed)
    else:
        model, tokenizer = load_sequence_classifier(minilm_dir if source == "minilm" else source, num_labels=2)
    save_checkpoint(model, tokenizer, out_dir)


def sentiment_curvature(
    model_dir: str, data_dir: str, domain: str, fisher_path: str, gram_path: str,
    max_train: Cap, max_length: int, seed: int = 0, threads: int = 1,
) -> str:
    """Diagonal empirical Fisher (F_sum, N) and RegMean Grams of one model, each from one pass over its whole
    training data (001 App. C.2), batched by length (the sums do not depend on the order); saved."""
    import time

    import torch

    from modelmerge.curvature.estimate import default_device, diagonal_fisher, layer_factors
    from modelmerge.models import load_sequence_classifier
    from modelmerge.train import text_batches

    torch.set_num_threads(threads)
    model, tokenizer = load_sequence_classifier(model_dir)
    train = domain_frame(data_dir, domain, "train", max_train, seed)
    batches = text_batches(tokenizer, train["text"].tolist(), train["label"].tolist(), 32, max_length, by_length=True)
    start = time.perf_counter()
    fisher = diagonal_fisher(model, batches, data=f"{domain} train ({len(train)} examples)")
    grams = layer_factors(model, batches, kind="gram", data=f"{domain} train ({len(train)} examples)")
    fisher.save(fisher_path)
    grams.save(gram_path)
    return f"{domain}: N = {fisher.n}, {time.perf_counter() - start:.1f} s on {default_device()}"
