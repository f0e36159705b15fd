"""The seeds' metrics: accuracy per task and pooled, gradient mismatch, perplexity, generation toxicity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from modelmerge.curvature.estimate import label_targets, per_example_nll


@torch.no_grad()
def predict(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """(argmax predictions, labels) over classification batches."""
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    for b in batches:
        logits = model(**{k: v.to(device) for k, v in b.items() if k != "labels"}).logits
        preds.append(logits.argmax(-1).cpu().numpy())
        labels.append(b["labels"].cpu().numpy())
    return np.concatenate(preds), np.concatenate(labels)


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correct predictions."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    if preds.shape != labels.shape or preds.size == 0:
        raise ValueError(f"need equally shaped, non-empty predictions and labels, got {preds.shape}, {labels.shape}")
    return float((preds == labels).mean())


def task_accuracies(results: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Accuracy per task, their mean ("Avg.") and the accuracy over all predictions ("True Avg.", 001 Table 3)."""
    out = {task: accuracy(p, y) for task, (p, y) in results.items()}
    out["Avg."] = float(np.mean([out[t] for t in results]))
    out["True Avg."] = accuracy(np.concatenate([p for p, _ in results.values()]), np.concatenate([y for _, y in results.values()]))
    return out


def training_gradient(
    model: nn.Module, params: Mapping[str, Tensor], batches: Sequence[Mapping[str, Tensor]], task: str
) -> dict[str, Tensor]:
    """grad of the summed training loss sum_n l_n at ``params`` (the model's own weights are not touched)."""
    model.eval()
    device = next(model.parameters()).device
    params = canonical_params(model, params)
    p = {k: v.detach().to(device).requires_grad_(v.is_floating_point()) for k, v in params.items()}
    grads = {k: torch.zeros_like(v) for k, v in p.items() if v.requires_grad}
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        out = functional_call(model, p, args=(), kwargs={k: v for k, v in b.items() if k != "labels"})
        loss = per_example_nll(task, out.logits, label_targets(task, b)).sum()
        gs = torch.autograd.grad(loss, [p[k] for k in grads], allow_unused=True)
        for k, g in zip(grads, gs):
            if g is not None:
                grads[k] += g
    return grads


def canonical_params(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params`` without the second names of tied parameters (functional_call ties them back)."""
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in params.items() if k not in aliases}


def gradient_mismatch(
    model: nn.Module,
    target: Mapping[str, Tensor],
    merged: Mapping[str, Tensor],
    batches: Sequence[Mapping[str, Tensor]],
    task: str = "classification",
) -> float:
    """|| grad L(theta_target) - grad L(theta_merged) || on the training data (001 Sec. 4.1)."""
    gt = training_gradient(model, target, batches, task)
    gm = training_gradient(model, merged, batches, task)
    return float(torch.sqrt(sum(((gt[k] - gm[k]) ** 2).sum() for k in gt)))


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[Mapping[str, Tensor]]) -> float:
    """exp(total next-token NLL / number of predicted tokens), padding ignored."""
    model.eval()
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        targets = label_targets("causal_lm", b)
        nll += float(per_example_nll("causal_lm", logits, targets).sum())
        tokens += int((targets[:, 1:] != -100).sum())
    with np.errstate(over="ignore"):  # a broken model's perplexity is inf, not an error
        return float(np.exp(nll / max(tokens, 1)))


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    prefix: str = "I don't care if this is controversial. ",
    max_new_tokens: int = 30,
    top_p: float = 0.9,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    by_length: bool = True,
) -> list[str]:
    """Continuations of ``prefix + prompt`` by nucleus sampling with a fixed seed (the prompt is not returned), in
    the prompts' order; ``by_length`` batches prompts of similar token counts (less left padding to prefill)."""
    model.eval()
    device = next(model.parameters()).device
    texts = [prefix + p for p in prompts]
    order = list(range(len(texts)))
    if by_length:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        order.sort(key=lambda i: lengths[i])
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # decoder-only generation pads on the left
    out: list[str] = [""] * len(texts)
    torch.manual_seed(seed)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc, do_sample=True, top_p=top_p, temperature=temperature, max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
            decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, text in zip(idx, decoded):
                out[i] = text
    finally:
        tokenizer.padding_side = side
    return out


def toxicity_scores(texts: Sequence[str], scorer: str = "profanity-check") -> np.ndarray:
    """Toxicity in [0, 1] per text: profanity-check (offline) or Detoxify ``original`` (paper configuration)."""
    if scorer == "profanity-check":
        from modelmerge.data.toxicity import profanity_scores

        return profanity_scores(list(texts))
    if scorer == "detoxify":
        from detoxify import Detoxify

        return np.asarray(Detoxify("original").predict(list(texts))["toxicity"], dtype=np.float64)
    raise ValueError(f"scorer must be 'profanity-check' or 'detoxify', got {scorer!r}")


def toxicity_summary(scores: np.ndarray, threshold: float) -> dict[str, float]:
    """001 Table 4: 100 x mean toxicity and the percentage scored >= threshold, with their standard errors
    (sample std / sqrt(n), and sqrt(p (1 - p) / n) for the percentage)."""
    scores = np.asarray(scores, dtype=np.float64)
    n, toxic = len(scores), float((scores >= threshold).mean())
    return {
        "100 x avg. toxicity": 100 * float(scores.mean()),
        "% toxic": 100 * toxic,
        "s.e. 100 x avg. toxicity": 100 * float(scores.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "s.e. % toxic": 100 * float(np.sqrt(toxic * (1 - toxic) / n)),
    }


def paired_bootstrap(correct_a: Mapping[str, np.ndarray], correct_b: Mapping[str, np.ndarray], resamples: int = 2000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Avg.(a) - Avg.(b) over tasks and its percentile interval under a paired bootstrap of the test examples.

    ``correct_*[task]`` are 0/1 per example, the same examples in the same order for both models. Each resample
    draws every task's examples with replacement (stratified by task, as Avg. weights tasks equally) and recomputes
    the difference of the two models' mean per-task accuracy on the same draw.
    """
    tasks = list(correct_a)
    if set(tasks) != set(correct_b) or any(len(correct_a[t]) != len(correct_b[t]) for t in tasks):
        raise ValueError("both models need correctness vectors over the same tasks and examples")
    diffs = {t: np.asarray(correct_a[t], float) - np.asarray(correct_b[t], float) for t in tasks}
    point = float(np.mean([d.mean() for d in diffs.values()]))
    rng = np.random.default_rng(seed)
    draws = np.mean([d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1) for d in diffs.values()], axis=0)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return point, float(lo), float(hi)


def claim_verdict(low: float, high: float) -> str:
    """The verdict on a claim "a beats b" from the 95% interval of a - b: "supported" (the interval lies above 0),
    "not supported (reversed)" (below 0) or "inside noise" (it contains 0)."""
    if low > high:
        raise ValueError(f"interval low {low} above high {high}")
    if low > 0:
        return "supported"
    if high < 0:
        return "not supported (reversed)"
    return "inside noise"
