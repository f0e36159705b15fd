"""Helpers of the `toxicity` experiment (001 Sec. 3.2 Eq. 13, Sec. 4.4, App. C.3): base LM, Fishers, removal."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

TOXICITY_METHODS = {"ta": "task arithmetic", "eq13": "Eq. 13 (ours)", "eq13kfac": "Eq. 13 (ours), K-FAC"}

#: parameter groups of the update diagnostics: where Eq. 13's update departs from task arithmetic's
PARAMETER_GROUPS = ("embeddings (tied LM head)", "linear layers", "norms")


def parameter_group(name: str, shape: tuple[int, ...]) -> str:
    """The group of one parameter of a decoder LM: embeddings, 2-D linear weights, or 1-D norm/bias vectors."""
    if "embed" in name or "lm_head" in name or "wte" in name or "wpe" in name:
        return PARAMETER_GROUPS[0]
    return PARAMETER_GROUPS[1] if len(shape) == 2 else PARAMETER_GROUPS[2]


def update_norms(base, toxic, merged, alpha: float) -> dict[str, float]:
    """Per group, ||theta_LLM - theta|| / (alpha ||tau||): 1 for task arithmetic, larger where Eq. 13 removes more."""
    num, den = dict.fromkeys(PARAMETER_GROUPS, 0.0), dict.fromkeys(PARAMETER_GROUPS, 0.0)
    for k, theta0 in base.items():
        group = parameter_group(k, tuple(theta0.shape))
        num[group] += float(((theta0.double() - merged[k].double()) ** 2).sum())
        den[group] += float(((toxic[k].double() - theta0.double()) ** 2).sum()) * alpha**2
    return {g: (num[g] / den[g]) ** 0.5 if den[g] > 0 else float("nan") for g in PARAMETER_GROUPS}


def toxicity_pretrained(source: str, out_dir: str, smollm2_dir: str, data_dir: str, seed: int = 0) -> None:
    """Save the base LM theta_LLM: SmolLM2-135M (packaged GGUF, dequantised), a tiny random llama, or a hub model."""
    import torch

    from modelmerge.models import load_causal_lm, save_checkpoint, tiny_model, train_tokenizer

    torch.manual_seed(seed)
    if source == "tiny":
        texts = pd.concat([pd.read_parquet(Path(data_dir) / f"{s}.parquet")["text"] for s in ("generic", "toxic")])
        tokenizer = train_tokenizer(texts.tolist(), vocab_size=500)
        model = tiny_model("llama", tokenizer.vocab_size, task="causal_lm", seed=seed)
    elif source == "smollm2":
        model, tokenizer = load_causal_lm(smollm2_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        model, tokenizer = load_causal_lm(source)
    save_checkpoint(model, tokenizer, out_dir, {"source": source})


def text_sample(path: str | os.PathLike, limit: int, seed: int) -> list[str]:
    """A seeded subsample of at most ``limit`` texts of a prepared set (all if smaller), in set order, with every
    whitespace run collapsed to one space (some tweets carry carriage returns, which would otherwise become a
    token the toxic set and the generic set see at very different rates)."""
    df = pd.read_parquet(path)
    if limit < len(df):
        df = df.sample(n=limit, random_state=seed).sort_index()
    return [" ".join(t.split()) for t in df["text"]]


def toxicity_curvature(
    model_dir: str, texts_path: str, fisher_path: str, kfac_path: str, max_examples: int, max_length: int,
    seed: int = 0, threads: int = 1, batch_size: int = 8, kfac_every: int = 1,
) -> str:
    """Diagonal empirical Fisher F_sum = sum_n g_n^2 and K-FAC factors of a causal LM (sequence NLL), from one
    pass over a seeded subsample (texts batched by length: the sums do not depend on the order); the factors from
    every ``kfac_every``-th batch (a length-stratified subsample); saved."""
    import time

    import torch

    from modelmerge.curvature.estimate import default_device, fisher_and_kfac
    from modelmerge.models import load_causal_lm
    from modelmerge.train import text_batches

    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(model_dir)
    texts = text_sample(texts_path, max_examples, seed)
    batches = text_batches(tokenizer, texts, None, batch_size, max_length, task="causal_lm", by_length=True)
    start = time.perf_counter()
    data = f"{Path(texts_path).stem} ({len(texts)} texts)"
    fisher, kfac = fisher_and_kfac(model, batches, task="causal_lm", data=data, kfac_every=kfac_every)
    fisher.save(fisher_path)
    kfac.save(kfac_path)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return (f"{Path(texts_path).stem}: N = {fisher.n} texts ({kfac.n} for K-FAC), {tokens} tokens, "
            f"{time.perf_counter() - start:.1f} s on {default_device()} ({threads} threads)")


def texts_per_set(data_dir: str | os.PathLike) -> dict[str, int]:
    """Texts in the whole generic and toxic sets (the curvature subsamples are rescaled to them)."""
    return {s: len(pd.read_parquet(Path(data_dir) / f"{s}.parquet")) for s in ("generic", "toxic")}


def set_curvatures(curvature_dir: str | os.PathLike, set_sizes: dict[str, int], kfac: bool = False):
    """(H_rest, H_t): F_sum of each whole set estimated from its subsample, N_set x the subsample mean; with
    ``kfac`` the linear layers get N_set x K-FAC (B (x) A is on F_avg's scale) and the rest the diagonal."""
    from modelmerge.curvature import WithFallback
    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors

    out = []
    for lm, texts in (("base", "generic"), ("toxic", "toxic")):
        diag = {k: v * set_sizes[texts] for k, v in DiagonalFisher.load(Path(curvature_dir) / f"{lm}.fisher.safetensors").mean().items()}
        if kfac:
            factors = LayerFactors.load(Path(curvature_dir) / f"{lm}.kfac.safetensors").curvature()
            diag = WithFallback({k: h.scale(set_sizes[texts]) for k, h in factors.items()}, diag)
        out.append(diag)
    return tuple(out)


def kfac_directions(
    models_dir: str, curvature_dir: str, deltas: list[str], out_paths: list[str], set_sizes: dict[str, int],
    threads: int = 1,
) -> str:
    """001 Eq. 13's direction d = (H_rest + delta I)^-1 (H_0 + H_t) tau with K-FAC on the linear layers (exact
    damped solve in the factors' eigenbases, float64, eigenbases shared by every delta); one file per delta."""
    import json
    import time

    import torch

    from modelmerge.io import atomic_write_text, load_state_dict, save_state_dict
    from modelmerge.merge import task_removal

    torch.set_num_threads(threads)
    start = time.perf_counter()
    base = {k: v.double() for k, v in load_state_dict(Path(models_dir) / "base" / "model.safetensors").items()}
    toxic = {k: v.double() for k, v in load_state_dict(Path(models_dir) / "toxic" / "model.safetensors").items()}
    rest, task = set_curvatures(curvature_dir, set_sizes, kfac=True)
    diag_rest, _ = set_curvatures(curvature_dir, set_sizes)
    lines = []
    for label, path in zip(deltas, out_paths):
        delta = resolve_delta(label, diag_rest, list(base))
        merged = task_removal(base, toxic, rest, rest, task, alpha=1.0, delta=delta)
        direction = {k: (base[k] - merged[k]).float() for k in base}
        save_state_dict(direction, path, metadata={"kind": "eq13_direction", "curvature": "kfac", "delta": repr(delta),
                                                   "delta_label": label})
        norms = update_norms(base, toxic, merged, 1.0)
        atomic_write_text(str(path) + ".json", json.dumps({"delta_label": label, "delta": delta, "update_norms": norms}) + "\n")
        lines.append(f"K-FAC direction, delta {label} = {delta:.3g}: " + ", ".join(f"{g} x{v:.3g}" for g, v in norms.items()))
        del merged, direction
    return "\n".join(lines) + f"\n{time.perf_counter() - start:.0f} s"


def parse_variant(variant: str) -> tuple[str, float | None, str | None]:
    """'base' | 'toxic' | 'ta_<alpha>' | 'eq13[kfac]_<alpha>_<delta>' -> (method, alpha, delta label)."""
    if variant in ("base", "toxic"):
        return variant, None, None
    method, *rest = variant.split("_")
    try:
        if method == "ta" and len(rest) == 1:
            return method, float(rest[0]), None
        if method in ("eq13", "eq13kfac") and len(rest) == 2 and rest[1]:
            return method, float(rest[0]), rest[1]
    except ValueError:
        pass
    raise ValueError(
        f"unknown variant {variant!r}: expected base, toxic, ta_<alpha>, eq13_<alpha>_<delta> or eq13kfac_<alpha>_<delta>"
    )


def resolve_delta(label: str, rest_curvature: dict, names) -> float:
    """Eq. 13's delta: a number, or ``"<c>mean"``: c times the mean diagonal entry of H_rest over ``names``."""
    if not label.endswith("mean"):
        return float(label)
    factor = float(label[: -len("mean")] or 1.0)
    total = sum(float(rest_curvature[n].double().sum()) for n in names)
    return factor * total / sum(rest_curvature[n].numel() for n in names)


def toxicity_removal(
    base, toxic, method: str, alpha: float, rest_curvature=None, task_curvature=None, delta: float = 0.0
):
    """theta_LLM - alpha tau (task arithmetic) or 001 Eq. 13 with H_rest = H_0 = rest_curvature, H_t = task_curvature.

    Eq. 13: theta_LLM - alpha (H_rest + delta I)^-1 (H_0 + H_t) tau, tau = theta_t - theta_LLM. As in 001 App. C.3 the
    base model's squared gradients on generic text stand for both the Hessian of its objective without D_t and the
    fine-tuning prior H_0, and the task model's squared gradients on the toxic set for H_t.
    """
    from modelmerge.merge import task_negation, task_removal

    if method == "ta":
        return task_negation(base, toxic, alpha)
    if method == "eq13":
        return task_removal(base, toxic, rest_curvature, rest_curvature, task_curvature, alpha=alpha, delta=delta)
    raise ValueError(f"method must be one of {sorted(TOXICITY_METHODS)}, got {method!r}")


def load_tied_state(model, state) -> None:
    """``model.load_state_dict(state)`` where ``state`` may omit weights tied to others (a saved tied LM head)."""
    result = model.load_state_dict(dict(state), strict=False)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    bad = set(result.missing_keys) - tied
    if bad or result.unexpected_keys:
        raise KeyError(f"state does not fit the model: missing {sorted(bad)[:5]}, unexpected {result.unexpected_keys[:5]}")


def generation_report(
    model, tokenizer, prompts: list[str], heldout: list[str], *, scorer: str, threshold: float, prefix: str,
    max_new_tokens: int, top_p: float, seed: int, max_length: int, batch_size: int = 50,
    max_perplexity: float = float("inf"),
) -> dict:
    """001 Table 4's columns for one model: toxicity of seeded continuations of prefix + prompt, and perplexity.

    A model whose held-out perplexity is not finite or exceeds ``max_perplexity`` is not generated from: its
    continuations are not language, so a toxicity score of them measures the scorer, not the model (the toxicity
    columns are NaN and ``scored`` is False).
    """
    import math

    from modelmerge.evaluate import generate, perplexity, toxicity_scores, toxicity_summary
    from modelmerge.train import text_batches

    ppl = perplexity(model, text_batches(tokenizer, heldout, None, 32, max_length, task="causal_lm", by_length=True))
    common = {"perplexity": ppl, "n_perplexity_texts": len(heldout), "max_perplexity": max_perplexity}
    if not (math.isfinite(ppl) and ppl <= max_perplexity):
        nan = float("nan")
        return {"100 x avg. toxicity": nan, "% toxic": nan, "s.e. 100 x avg. toxicity": nan, "s.e. % toxic": nan,
                **common, "scored": False, "n_prompts": 0, "generations": []}
    texts = generate(model, tokenizer, prompts, prefix=prefix, max_new_tokens=max_new_tokens, top_p=top_p, seed=seed,
                     batch_size=batch_size)
    scores = toxicity_scores(texts, scorer)
    return {
        **toxicity_summary(scores, threshold),
        **common,
        "scored": True,
        "n_prompts": len(scores),
        "generations": [{"prompt": p, "continuation": t, "toxicity": float(s)} for p, t, s in zip(prompts, texts, scores)],
    }


def toxicity_variant(
    variant: str, models_dir: str, curvature_dir: str, data_dir: str, out_json: str, *, set_sizes: dict[str, int],
    eval_config: dict, threads: int = 1, directions_dir: str | None = None,
) -> str:
    """Build one row of the Table 4 analog (base, toxic model, or a removal at one alpha), evaluate it, write JSON."""
    import json
    import time

    import torch

    from modelmerge.io import atomic_write_text, load_state_dict
    from modelmerge.models import load_causal_lm

    torch.set_num_threads(threads)
    start = time.perf_counter()
    method, alpha, delta_label = parse_variant(variant)
    delta = norms = None
    model, tokenizer = load_causal_lm(Path(models_dir) / "base")
    if method == "toxic":
        load_tied_state(model, load_state_dict(Path(models_dir) / "toxic" / "model.safetensors"))
    elif method != "base":
        base = load_state_dict(Path(models_dir) / "base" / "model.safetensors")
        toxic = load_state_dict(Path(models_dir) / "toxic" / "model.safetensors")
        if method == "eq13kfac":  # the direction was solved once per delta (kfac_directions)
            path = Path(directions_dir) / f"kfac_{delta_label}.safetensors"
            direction = load_state_dict(path)
            delta = json.loads(Path(str(path) + ".json").read_text())["delta"]
            merged = {k: v - alpha * direction[k] for k, v in base.items()}
        else:
            rest = task = None
            if method == "eq13":
                rest, task = set_curvatures(curvature_dir, set_sizes)
                delta = resolve_delta(delta_label, rest, list(base))
            merged = toxicity_removal(base, toxic, method, alpha, rest, task, delta or 0.0)
        norms = update_norms(base, toxic, merged, alpha)
        load_tied_state(model, merged)
    cfg = dict(eval_config)
    prompts = text_sample(Path(data_dir) / "prompts.parquet", cfg.pop("n_prompts"), cfg["seed"])
    heldout = text_sample(Path(data_dir) / "heldout.parquet", cfg.pop("n_perplexity"), cfg["seed"])
    report = generation_report(model, tokenizer, prompts, heldout, **cfg)
    report = {"variant": variant, "method": method, "alpha": alpha, "delta_label": delta_label, "delta": delta,
              "update_norms": norms, **report, "seconds": time.perf_counter() - start}
    atomic_write_text(out_json, json.dumps(report, indent=1) + "\n")
    scored = (f"toxicity {report['100 x avg. toxicity']:.2f}, {report['% toxic']:.1f}% toxic" if report["scored"]
              else f"not generated from (perplexity above {report['max_perplexity']:g})")
    return f"{variant}: {scored}, perplexity {report['perplexity']:.2f}, {report['seconds']:.0f} s"
