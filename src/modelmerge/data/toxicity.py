"""Offline toxicity data: tweets scored by profanity-check (DESIGN.md section 4).

- ``toxic``: tweets scored >= ``threshold`` (0.8, as Civil Comments' toxicity >= 0.8 in 001 App. C.3), the
  fine-tuning set of the task model;
- ``generic`` / ``heldout``: tweets scored < ``clean_below``, disjoint: curvature of the base model and
  perplexity (the roles of WikiText-103 in 001);
- ``prompts``: the first ``prompt_words`` words of further held-out tweets (the role of RealToxicityPrompts).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def profanity_scores(texts: list[str]) -> np.ndarray:
    """Probability of offensive language per text (alt-profanity-check's linear model)."""
    from profanity_check import predict_prob

    return np.asarray(predict_prob(list(texts)), dtype=np.float64)


def toxicity_sets(
    texts: pd.Series,
    scores: np.ndarray,
    seed: int,
    threshold: float = 0.8,
    clean_below: float = 0.2,
    n_generic: int = 2000,
    n_heldout: int = 1000,
    n_prompts: int = 200,
    prompt_words: int = 6,
) -> dict[str, pd.DataFrame]:
    """The four disjoint sets above (duplicates dropped, order shuffled with ``seed``)."""
    df = pd.DataFrame({"text": texts.astype(str).str.strip(), "score": scores}).drop_duplicates("text")
    df = df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
    toxic = df[df["score"] >= threshold]
    clean = df[df["score"] < clean_below]
    generic, heldout = clean.iloc[:n_generic], clean.iloc[n_generic : n_generic + n_heldout]
    rest = df[(df["score"] < threshold) & ~df["text"].isin(pd.concat([generic, heldout])["text"])]
    long_enough = rest[rest["text"].str.split().str.len() > prompt_words]
    prompts = long_enough.iloc[:n_prompts].copy()
    prompts["text"] = prompts["text"].str.split().str[:prompt_words].str.join(" ")
    return {k: v.reset_index(drop=True) for k, v in
            {"toxic": toxic, "generic": generic, "heldout": heldout, "prompts": prompts}.items()}
