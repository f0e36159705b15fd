"""Shared fixtures: small random state dicts in float64."""

from __future__ import annotations

import pytest
import torch


def random_state(gen: torch.Generator, shapes: dict[str, tuple[int, ...]], dtype=torch.float64) -> dict:
    return {k: torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}


SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (4,), "head.weight": (2, 4)}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def models(gen):
    """theta_0 and three task models theta_t = theta_0 + tau_t."""
    base = random_state(gen, SHAPES)
    tasks = [{k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()} for _ in range(3)]
    return base, tasks


@pytest.fixture
def fishers(gen):
    """Positive diagonal curvatures, one per task model."""
    return [{k: torch.rand(s, generator=gen, dtype=torch.float64) + 0.1 for k, s in SHAPES.items()} for _ in range(3)]


def make_llama_folders(root, texts, vocab_size: int = 64, names=("base", "math", "code")):
    """Tiny llama folders under ``root``: the first is the base, each other one the base plus a seeded task vector."""
    from modelmerge.models import tiny_model, train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    for i, name in enumerate(names):
        model = tiny_model("llama", tok.vocab_size, task="causal_lm", seed=0)
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
    return root
