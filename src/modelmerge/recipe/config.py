"""The recipe schema: the fields of a merge recipe, each method's parameters read from the library's signatures,
and every check that needs no file (``validate_recipe``, ``load_recipe``)."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model, field_validator

from modelmerge import merge as merge_rules


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the field, model or parameter at fault."""


@dataclass(frozen=True)
class Method:
    """How a recipe calls one merge function: which of its arguments the recipe fills, and what curvature it needs."""

    function: Callable
    filled: tuple[str, ...]  # arguments built from the recipe's models and curvature, not from `parameters`
    curvature: Literal["none", "any", "gram"] = "none"  # "any": diagonal Fisher, K-FAC or Gram files
    uses_base: bool = True  # False: the base is only where config, tokenizer and output layout come from
    solver: bool = False  # takes a ConjugateGradient (`cg_iterations`, `cg_preconditioner` in `parameters`)


METHODS: dict[str, Method] = {
    "average": Method(merge_rules.average, ("models",), uses_base=False),
    "weighted_average": Method(merge_rules.weighted_average, ("models",), uses_base=False),
    "task_arithmetic": Method(merge_rules.task_arithmetic, ("base", "models")),
    "ties": Method(merge_rules.ties, ("base", "models")),
    "fisher_average": Method(merge_rules.fisher_average, ("models", "fishers"), "any", uses_base=False, solver=True),
    "gradient_matching": Method(merge_rules.gradient_matching, ("base", "models", "curvatures", "base_curvature"),
                                "any", solver=True),
    "regmean": Method(merge_rules.regmean, ("models", "grams"), "gram", uses_base=False),
    "mats": Method(merge_rules.mats, ("base", "models", "curvatures", "init"), "any", solver=True),
}


def method_parameters(name: str) -> dict[str, tuple[Any, Any]]:
    """The keyword arguments a recipe may set for ``name``: (type, default) read from the function's signature."""
    method = METHODS[name]
    hints = typing.get_type_hints(method.function)
    fields: dict[str, tuple[Any, Any]] = {}
    for p in inspect.signature(method.function).parameters.values():
        if p.name in (*method.filled, "out", "solver", "fallback"):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints[p.name], default)
    if method.solver:
        fields["cg_iterations"] = (PositiveInt, 100)
        # "kronecker": preconditioned CG with a Kronecker-factored approximate inverse (beyond 002; same solution)
        fields["cg_preconditioner"] = (Literal["none", "kronecker"], "none")
    return fields


def parameters_model(name: str) -> type[BaseModel]:
    """A pydantic model of ``name``'s parameters: typed, defaults from the library, unknown keys refused."""
    return create_model(f"{name}_parameters", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                        **method_parameters(name))


class Estimate(BaseModel):
    """How curvature is estimated on the fly from each model's ``data`` (a local text, CSV, JSONL or parquet file)."""

    model_config = ConfigDict(extra="forbid")
    column: str = "text"
    label_column: str | None = None  # classification: the column of integer labels
    task: Literal["causal_lm", "masked_lm", "classification"] = "causal_lm"  # the loss of the folder's own head
    mask_probability: float = Field(0.15, gt=0.0, lt=1.0)  # masked_lm: share of tokens masked (seeded)
    fisher: Literal["empirical", "sampled", "exact"] = "empirical"
    examples: PositiveInt | None = None  # a seeded subsample of this many texts (all when omitted)
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 8
    seed: int = 0


class CurvatureConfig(Estimate):
    """What curvature the method uses and how a Fisher is scaled; also the estimation settings."""

    kind: Literal["fisher", "gram", "kfac"] = "fisher"
    scale: Literal["sum", "mean"] = "sum"  # F_sum = sum_n g_n^2 (001's H_t) or F_avg = F_sum / N
    base: float | str | None = None  # gradient matching's H_0: c (H_0 = c I) or a diagonal Fisher file of the base

    @field_validator("base", mode="before")
    @classmethod
    def _number(cls, value):
        """YAML reads 1e-4 (no dot) as a string: a string that parses as a number is that number."""
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return value
        return value


class ModelEntry(BaseModel):
    """One input model: where its weights are, and its curvature as file(s) or data to estimate it on."""

    model_config = ConfigDict(extra="forbid")
    model: str
    curvature: str | list[str] | None = None  # a file, or [K-FAC/Gram file, diagonal Fisher file for the rest]
    data: str | None = None


class Dare(BaseModel):
    """DARE (drop and rescale) applied to every task vector before the method merges them."""

    model_config = ConfigDict(extra="forbid")
    p: Annotated[float, Field(ge=0.0, lt=1.0)] | list[Annotated[float, Field(ge=0.0, lt=1.0)]]  # one, or one per model
    seed: int = 0


class Select(BaseModel):
    """003's DPP selection of which models to merge: L = diag(q) S diag(q), the subset of size k maximising
    det(L_Y), q from each model's validation score relative to the base's, S the mean cosine similarity of the
    models' mean-pooled last hidden states on the same inputs (``data``)."""

    model_config = ConfigDict(extra="forbid")
    k: PositiveInt
    quality: list[float]  # each model's validation score (accuracy, or any higher-is-better metric)
    base_quality: float | list[float]  # the base model's, on the same data (one, or one per model)
    data: str  # texts every model represents
    column: str = "text"
    examples: PositiveInt = 64
    max_length: PositiveInt = 128
    batch_size: PositiveInt = 16
    exact: bool = True  # enumerate every subset of size k (up to 20 models); False: greedy MAP


class Recipe(BaseModel):
    """A merge recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    base: str | ModelEntry | None = None
    models: list[str | ModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    curvature: CurvatureConfig | None = None
    dare: Dare | None = None
    select: Select | None = None
    # the output's floating-point dtype (default: the base's); the merge itself runs in float32 or wider either way
    dtype: Literal["float16", "bfloat16", "float32", "float64"] | None = None

    def entries(self) -> list[ModelEntry]:
        """The task models as entries (a bare string is a model without curvature)."""
        return [m if isinstance(m, ModelEntry) else ModelEntry(model=m) for m in self.models]

    def base_entry(self) -> ModelEntry | None:
        return ModelEntry(model=self.base) if isinstance(self.base, str) else self.base


def _field(loc: tuple) -> str:
    """A pydantic error location as the recipe field it names: ``models[1].model``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "ModelEntry", "float", "int") or str(part).startswith(("list[", "function-")):
            continue  # union-member labels pydantic adds
        else:
            out += ("." if out else "") + str(part)
    return out or "recipe"


def validation_message(err: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line per recipe field: ``models[1].model: ... (got ...)``."""
    seen, lines = set(), []
    for e in err.errors():
        where = prefix + _field(e["loc"])
        if where in seen:
            continue
        seen.add(where)
        lines.append(f"{where}: {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return "; ".join(lines)


def validate_recipe(raw: Any) -> tuple[Recipe, BaseModel]:
    """Check a recipe's fields, its method and the method's parameters, before anything is read from disk."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"a recipe is a mapping of fields (method, base, models, ...), got {type(raw).__name__}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(validation_message(err)) from None
    if recipe.method not in METHODS:
        raise RecipeError(f"method: unknown method {recipe.method!r}; choose one of {', '.join(METHODS)}")
    method = METHODS[recipe.method]
    allowed = method_parameters(recipe.method)
    unknown = sorted(set(recipe.parameters) - set(allowed))
    if unknown:
        raise RecipeError(f"parameters.{unknown[0]}: not a parameter of {recipe.method} "
                          f"(it takes {', '.join(allowed) or 'none'})")
    try:
        params = parameters_model(recipe.method).model_validate(recipe.parameters)
    except ValidationError as err:
        raise RecipeError(validation_message(err, "parameters.")) from None
    n = len(recipe.models)
    for key in ("alphas", "weights", "k"):
        value = getattr(params, key, None)
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise RecipeError(f"parameters.{key}: {len(value)} values for {n} models (one per model, or one number)")
    if recipe.select is not None:
        sel = recipe.select
        if len(sel.quality) != n:
            raise RecipeError(f"select.quality: {len(sel.quality)} values for {n} models")
        if isinstance(sel.base_quality, list) and len(sel.base_quality) != n:
            raise RecipeError(f"select.base_quality: {len(sel.base_quality)} values for {n} models")
        if sel.k > n:
            raise RecipeError(f"select.k: cannot select {sel.k} of {n} models")
    if method.uses_base and recipe.base is None:
        raise RecipeError(f"base: {recipe.method} merges task vectors theta_t - theta_0 and needs the base model")
    if recipe.dare is not None and isinstance(recipe.dare.p, list) and len(recipe.dare.p) != n:
        raise RecipeError(f"dare.p: {len(recipe.dare.p)} values for {n} models (one per model, or one number)")
    if recipe.dare is not None and not method.uses_base:
        raise RecipeError(f"dare: DARE drops task-vector entries; {recipe.method} merges whole models (no base)")
    entries = recipe.entries()
    base_entry = recipe.base_entry()
    if base_entry is not None and (base_entry.curvature is not None or base_entry.data is not None):
        raise RecipeError("base: the base model takes no curvature or data here (gradient matching's H_0 is "
                          "curvature.base)")
    cfg = recipe.curvature or CurvatureConfig()
    if recipe.curvature is not None and recipe.curvature.base is not None and recipe.method != "gradient_matching":
        raise RecipeError(f"curvature.base: only gradient matching uses H_0; {recipe.method} does not")
    if cfg.task == "classification" and cfg.label_column is None and any(e.data for e in entries):
        raise RecipeError("curvature.label_column: classification curvature needs the column of integer labels")
    if cfg.kind != "fisher" and cfg.fisher == "exact":
        raise RecipeError("curvature.fisher: K-FAC and Grams use one label per example: choose empirical or sampled")
    if recipe.select is not None and recipe.select.exact and n > 20:
        raise RecipeError(f"select.exact: enumerating subsets of {n} models is too many; set exact: false (greedy)")
    if method.curvature == "none":
        if recipe.curvature is not None:
            raise RecipeError(f"curvature: {recipe.method} uses no curvature; remove the curvature block")
        for i, e in enumerate(entries):
            if e.curvature is not None or e.data is not None:
                raise RecipeError(f"models[{i}]: {recipe.method} uses no curvature; remove its curvature/data")
    else:
        kind = cfg.kind
        if method.curvature == "gram" and kind != "gram" and any(e.data for e in entries):
            raise RecipeError(f"curvature.kind: {recipe.method} needs Gram matrices; set kind: gram")
        for i, e in enumerate(entries):
            if (e.curvature is None) == (e.data is None):
                raise RecipeError(f"models[{i}]: {recipe.method} needs this model's curvature: give exactly one of "
                                  "curvature (a file) or data (to estimate it on)")
        if recipe.method == "gradient_matching" and (recipe.curvature is None or recipe.curvature.base is None):
            raise RecipeError("curvature.base: gradient matching needs H_0, the base model's curvature: a number c "
                              "(H_0 = c I) or a curvature file")
    return recipe, params


def load_recipe(path: str | os.PathLike, log: Callable[[str], None] = print) -> tuple[Recipe, BaseModel]:
    """Read and validate a YAML recipe (see ``validate_recipe``); a mergekit configuration (``merge_method:``) is
    translated first, and ``log`` says how (``modelmerge.recipe.mergekit``)."""
    import yaml

    from modelmerge.recipe.mergekit import is_mergekit, translate

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    if is_mergekit(raw):
        raw, notes = translate(raw)
        for line in notes:
            log(line)
    return validate_recipe(raw)
