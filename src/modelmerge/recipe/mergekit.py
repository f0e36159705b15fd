"""mergekit YAML recipes, translated into this tool's recipe for the methods both tools share: ``linear``,
``task_arithmetic``, ``ties``, ``dare_linear`` and ``dare_ties`` with per-model ``weight`` and ``density``, the
global ``normalize``, ``lambda`` and ``rescale``, and ``dtype``/``out_dtype``. What has no counterpart here (layer
slices, modules, per-layer or per-tensor parameter lists, tokenizer merging, other methods) is refused by name before
any weight is read.

The formulas, as mergekit computes them (``merge_methods/generalized_task_arithmetic.py``, ``linear.py``), with
delta_i = theta_i - theta_0 and w_i the weight of model i:
- linear: sum_i w_i theta_i / sum_i w_i (``normalize: true``, its default)      -> weighted_average(weights = w)
- task_arithmetic: theta_0 + lambda sum_i w_i delta_i (``normalize: false``)    -> task_arithmetic(alphas = lambda w)
- ties: each delta_i trimmed to its top ``density`` by magnitude within every tensor, signs elected by
  sum_i w_i delta_i, the agreeing entries' weighted mean (``normalize: true``)  -> ties(k = density, weights = w,
  lam = lambda, scope = "tensor")
- dare_linear / dare_ties: each delta_i kept entry by entry with probability ``density`` and rescaled, then
  task_arithmetic / ties without trimming and (by default) without normalising -> dare(p = 1 - density) and
  task_arithmetic / ties(k = 1, normalize = false).
Where the results differ, and why, is what ``benchmarks/merge.py`` measures: DARE's masks are random (mergekit's
unseeded, ours seeded) and mergekit rescales them by the L1 norm ratio rather than 1 / density; mergekit's TIES keeps
int(density n) entries (ties at the cutoff broken by an unstable sort; ours keeps ceil(density n) and every entry tied
with the threshold) and elects + where the weighted sum is exactly 0 (ours: the majority of signs); mergekit computes
in the load ``dtype`` (bfloat16 stays bfloat16) where this tool computes in float32 or wider and casts once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelmerge.recipe.config import RecipeError

#: mergekit's methods this tool shares
SHARED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: mergekit keys with no counterpart here, and why
REFUSED_KEYS = {
    "slices": "layer slices (merging ranges of layers from different models)",
    "modules": "per-module merges",
    "tokenizer": "tokenizer merging",
    "chat_template": "chat templates (the base's tokenizer files are copied as they are)",
}
#: defaults of mergekit's global parameters, per method
DEFAULTS = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0},
    "ties": {"normalize": True, "lambda": 1.0, "rescale": False},
    "dare_linear": {"normalize": False, "lambda": 1.0, "rescale": True},
    "dare_ties": {"normalize": False, "lambda": 1.0, "rescale": True},
}
_GLOBAL = {"normalize", "lambda", "rescale", "int8_mask", "weight", "density"}
_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float32": "float32", "fp32": "float32", "float": "float32", "float64": "float64"}


def is_mergekit(raw: Any) -> bool:
    """A mergekit configuration names ``merge_method``; this tool's recipe names ``method``."""
    return isinstance(raw, Mapping) and "merge_method" in raw


def _scalar(value: Any, where: str) -> float:
    """A parameter as one number; lists (per-layer gradients) and mappings (per-tensor filters) are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        filters = isinstance(value, Mapping) or (isinstance(value, list) and any(isinstance(v, Mapping) for v in value))
        kind = ("per-tensor filters" if filters else "a per-layer gradient (a list)" if isinstance(value, list)
                else type(value).__name__)
        raise RecipeError(f"{where}: {kind} has no counterpart in modelmerge: give one number")
    return float(value)


def translate(raw: Mapping) -> tuple[dict, list[str]]:
    """(this tool's recipe, notes saying what was translated and how) for a mergekit configuration."""
    for key, what in REFUSED_KEYS.items():
        if raw.get(key) is not None:
            raise RecipeError(f"mergekit {key}: {what} cannot be translated; modelmerge merges whole models")
    unknown = sorted(set(raw) - {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                                 "tokenizer_source", *REFUSED_KEYS})
    if unknown:
        raise RecipeError(f"mergekit {unknown[0]}: not a field this translation knows")
    method = raw["merge_method"]
    if method not in SHARED:
        raise RecipeError(f"mergekit merge_method: {method!r} has no counterpart here; the shared methods are "
                          f"{', '.join(SHARED)}")
    source = raw.get("tokenizer_source")
    if source not in (None, "base"):
        raise RecipeError(f"mergekit tokenizer_source: {source!r} means tokenizer merging, which cannot be translated "
                          "(the base's tokenizer is copied)")
    params = dict(raw.get("parameters") or {})
    unknown = sorted(set(params) - _GLOBAL)
    if unknown:
        raise RecipeError(f"mergekit parameters.{unknown[0]}: not a parameter of {method} this translation knows")
    settings = {**DEFAULTS[method], **{k: v for k, v in params.items() if k in DEFAULTS[method]}}
    if method.startswith("dare") and not settings["rescale"]:
        raise RecipeError("mergekit parameters.rescale: false keeps DARE's survivors unscaled; modelmerge's DARE "
                          "always rescales (by 1 / density)")
    if method == "ties" and settings["rescale"]:
        raise RecipeError("mergekit parameters.rescale: true rescales TIES' trimmed task vectors by their L1 norm "
                          "ratio; modelmerge's TIES does not rescale")
    if method == "linear" and not settings["normalize"]:
        raise RecipeError("mergekit parameters.normalize: false makes linear an unnormalised sum of models, which "
                          "modelmerge does not offer")
    base = raw.get("base_model")
    if method != "linear" and base is None:
        raise RecipeError(f"mergekit base_model: {method} merges task vectors and needs the base model")
    entries = raw.get("models") or []
    if not entries:
        raise RecipeError("mergekit models: no models to merge")
    models, weights, densities = [], [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise RecipeError(f"mergekit models[{i}]: each entry is a mapping with model: (and parameters:)")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise RecipeError(f"mergekit models[{i}].{extra[0]}: not a field this translation knows")
        if method != "linear" and entry["model"] == base:
            continue  # the base's own entry: its task vector is zero, and mergekit leaves it out
        p = {**{k: params[k] for k in ("weight", "density") if k in params}, **(entry.get("parameters") or {})}
        unknown = sorted(set(p) - {"weight", "density"})
        if unknown:
            raise RecipeError(f"mergekit models[{i}].parameters.{unknown[0]}: not a per-model parameter of {method} "
                              "this translation knows (weight, density)")
        if "weight" not in p:
            raise RecipeError(f"mergekit models[{i}].parameters.weight: {method} needs every model's weight")
        models.append(str(entry["model"]))
        weights.append(_scalar(p["weight"], f"mergekit models[{i}].parameters.weight"))
        densities.append(_scalar(p.get("density", 1.0), f"mergekit models[{i}].parameters.density"))
    lam = _scalar(settings.get("lambda", 1.0), "mergekit parameters.lambda")
    notes = [f"translated mergekit {method} ({len(models)} models) into modelmerge's recipe:"]
    recipe: dict[str, Any] = {"models": models}
    if base is not None:
        recipe["base"] = str(base)
    if method == "linear":
        recipe |= {"method": "weighted_average", "parameters": {"weights": weights}}
        notes.append(f"  weighted_average with weights {weights} (sum w_i theta_i / sum w_i)")
    elif method in ("task_arithmetic", "dare_linear"):
        total = sum(weights) if settings["normalize"] else 1.0
        if total == 0:
            raise RecipeError("mergekit weights sum to zero with normalize: true")
        alphas = [lam * w / total for w in weights]
        recipe |= {"method": "task_arithmetic", "parameters": {"alphas": alphas}}
        notes.append(f"  task_arithmetic with alphas = lambda * weight{' / sum of weights' if settings['normalize'] else ''}"
                     f" = {alphas}")
    else:
        if min(weights) <= 0:
            raise RecipeError(f"mergekit weights {weights}: modelmerge's TIES takes positive weights")
        k = [1.0] * len(models) if method == "dare_ties" else densities
        recipe |= {"method": "ties", "parameters": {"k": k, "weights": weights, "lam": lam, "scope": "tensor",
                                                    "normalize": bool(settings["normalize"])}}
        notes.append(f"  ties with k = {k}, weights {weights}, lam {lam}, trimmed per tensor, "
                     f"{'weighted mean' if settings['normalize'] else 'weighted sum'} of the agreeing entries")
    if method.startswith("dare"):
        recipe["dare"] = {"p": [1.0 - d for d in densities], "seed": 0}
        notes.append(f"  DARE with drop probability 1 - density = {recipe['dare']['p']} (seeded masks, rescaled by "
                     "1 / density; mergekit draws unseeded masks and rescales by the L1 norm ratio)")
    dtype = raw.get("out_dtype") or raw.get("dtype")
    if dtype is not None:
        if str(dtype) not in _DTYPES:
            raise RecipeError(f"mergekit dtype: {dtype!r} is not one of {sorted(set(_DTYPES.values()))}")
        recipe["dtype"] = _DTYPES[str(dtype)]
        notes.append(f"  output dtype {recipe['dtype']} (merged in float32 or wider, cast once at the end)")
    if params.get("int8_mask"):
        notes.append("  int8_mask ignored (a memory option of mergekit's; the result does not depend on it)")
    return recipe, notes
