"""Helpers of the `sentiment` experiment (001 Sec. 4.3): data subsets, the starting encoder, its curvature."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd


def domain_frame(data_dir: str | os.PathLike, domain: str, split: str, limit: int, seed: int) -> pd.DataFrame:
    """A seeded subsample of at most ``limit`` rows of one prepared split (the whole split if smaller)."""
    df = pd.read_parquet(Path(data_dir) / domain / f"{split}.parquet")
    return df.sample(n=min(limit, len(df)), random_state=seed).reset_index(drop=True)


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
    max_train: int, max_length: int, seed: int = 0, threads: int = 1,
) -> str:
    """Diagonal empirical Fisher (F_sum, N) and RegMean Grams of one model on its training subsample; saved."""
    import time

    import torch

    from modelmerge.curvature.estimate import default_device, diagonal_fisher, layer_factors
    from modelmerge.models import load_sequence_classifier
    from modelmerge.train import text_batches

    torch.set_num_threads(threads)
    model, tokenizer = load_sequence_classifier(model_dir)
    train = domain_frame(data_dir, domain, "train", max_train, seed)
    batches = text_batches(tokenizer, train["text"].tolist(), train["label"].tolist(), 32, max_length)
    start = time.perf_counter()
    fisher = diagonal_fisher(model, batches, data=f"{domain} train ({len(train)} examples)")
    grams = layer_factors(model, batches, kind="gram", data=f"{domain} train ({len(train)} examples)")
    fisher.save(fisher_path)
    grams.save(gram_path)
    return f"{domain}: N = {fisher.n}, {time.perf_counter() - start:.1f} s on {default_device()}"
