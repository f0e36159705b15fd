"""Merge recipes: a YAML file that names a method, a base model, task models and (where the method needs it)
their curvature. A recipe is validated against the library's own signatures before any weight is read, then
merged parameter by parameter into a Hugging Face model folder (``modelmerge merge``, ``modelmerge.cli``).

    method: gradient_matching        # any key of METHODS
    base: base-model/                # a model folder, a .safetensors file, or a hub name (where reachable)
    models:
      - {model: math-model/, data: math.csv}           # data: estimate this model's curvature on it
      - {model: code-model/, curvature: code.fisher.safetensors}   # or a file from `modelmerge curvature`
    parameters: {alphas: [1.0, 1.0]}  # the method's own keyword arguments, checked against its signature
    curvature: {kind: fisher, scale: sum, base: 1.0e-4, examples: 256, max_length: 128}
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, create_model, field_validator
from torch import Tensor

from modelmerge import merge as merge_rules
from modelmerge.io import LazySafetensors, tensor_info

#: the files of a model folder that are not weights: copied from the base into a merged folder
WEIGHT_FILE = re.compile(r"(^model(-\d+-of-\d+)?\.safetensors$)|(\.safetensors\.index\.json$)|(\.bin$)|(\.pt$)|(\.pth$)")


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
    task: Literal["causal_lm", "classification"] = "causal_lm"
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
    p: float = Field(ge=0.0, lt=1.0)
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


def _errors(err: ValidationError, prefix: str = "") -> str:
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
        raise RecipeError(_errors(err)) from None
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
        raise RecipeError(_errors(err, "parameters.")) from None
    n = len(recipe.models)
    for key in ("alphas",):
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


def load_recipe(path: str | os.PathLike) -> tuple[Recipe, BaseModel]:
    """Read and validate a YAML recipe (see ``validate_recipe``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"no recipe file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from None
    return validate_recipe(raw)


# -- reading models ----------------------------------------------------------------------------------------------


class ShardedSafetensors(Mapping):
    """A lazy state dict over a sharded checkpoint (``model.safetensors.index.json`` and its shards)."""

    def __init__(self, index: Path):
        weight_map = json.loads(index.read_text())["weight_map"]
        self._files = {f: LazySafetensors(index.parent / f) for f in sorted(set(weight_map.values()))}
        self._where = {k: self._files[f] for k, f in weight_map.items()}

    def __getitem__(self, name: str) -> Tensor:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._where[name].info(name)


@dataclass
class ModelSource:
    """A resolved input model: its weights (lazy), and its folder and config when it has them."""

    label: str  # how messages name it: "base" or "models[i]"
    spec: str
    weights: Mapping[str, Tensor]
    folder: Path | None = None
    config: dict = field(default_factory=dict)

    def n_parameters(self) -> int:
        return sum(math.prod(tensor_info(self.weights, k)[1]) for k in self.weights)

    def largest_tensor_bytes(self) -> int:
        infos = (tensor_info(self.weights, k) for k in self.weights)
        return max(math.prod(shape) * dtype.itemsize for dtype, shape in infos)


def _looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.startswith((".", "/"))


def resolve_model(spec: str, label: str, root: Path) -> ModelSource:
    """A model folder (safetensors weights, config.json), a .safetensors file, or a hub name (downloaded)."""
    path = (root / spec).expanduser() if not Path(spec).is_absolute() else Path(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise RecipeError(f"{label}: {spec} is not a .safetensors file (pickled checkpoints are not read: "
                              "convert them with save_pretrained(..., safe_serialization=True))")
        return ModelSource(label, spec, LazySafetensors(path))
    if not path.is_dir() and _looks_like_hub_name(spec):
        path = _download(spec, label)
    if not path.is_dir():
        raise RecipeError(f"{label}: no model folder, .safetensors file or hub model at {spec!r}")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if (path / "model.safetensors").is_file():
        weights: Mapping[str, Tensor] = LazySafetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").is_file():
        weights = ShardedSafetensors(path / "model.safetensors.index.json")
    elif any(path.glob("*.bin")):
        raise RecipeError(f"{label}: {spec} holds only pickled weights (*.bin), which are not read: convert them "
                          "to safetensors first")
    else:
        raise RecipeError(f"{label}: {spec} has no model.safetensors (or sharded index)")
    return ModelSource(label, spec, weights, path, config)


def _download(spec: str, label: str) -> Path:
    """A hub model's weights, config and tokenizer, cached by huggingface_hub; a clear error where unreachable."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model"]))
    except Exception as err:  # noqa: BLE001  (offline, unknown repo, gated: all end the same way)
        raise RecipeError(f"{label}: {spec!r} is not a local path and the hub could not provide it "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_compatible(base: ModelSource, models: list[ModelSource]) -> None:
    """Every model must have the base's architecture and the base's parameter names and shapes."""
    arch = {k: base.config.get(k) for k in ("architectures", "model_type")}
    for m in models:
        if base.config and m.config:
            other = {k: m.config.get(k) for k in ("architectures", "model_type")}
            if other != arch:
                raise RecipeError(f"{m.label}: architecture {other['architectures'] or other['model_type']} differs "
                                  f"from the base's {arch['architectures'] or arch['model_type']}")
        missing = [k for k in base.weights if k not in m.weights]
        extra = [k for k in m.weights if k not in base.weights]
        if missing or extra:
            name = (missing or extra)[0]
            raise RecipeError(f"{m.label}: parameter {name!r} is " + ("missing" if missing else "not in the base")
                              + f" ({len(missing)} missing, {len(extra)} extra)")
        for k in base.weights:
            if tensor_info(m.weights, k)[1] != tensor_info(base.weights, k)[1]:
                raise RecipeError(f"{m.label}: parameter {k!r} has shape {tensor_info(m.weights, k)[1]}, the base "
                                  f"{tensor_info(base.weights, k)[1]}")


# -- curvature ---------------------------------------------------------------------------------------------------


class ScaledTensors(Mapping):
    """``factor * lazy[name]``, read one tensor at a time (F_avg = F_sum / N without loading the whole file)."""

    def __init__(self, lazy: Mapping[str, Tensor], factor: float):
        self.lazy, self.factor = lazy, factor

    def __getitem__(self, name: str) -> Tensor:
        return self.lazy[name] * self.factor

    def __iter__(self) -> Iterator[str]:
        return iter(self.lazy)

    def __len__(self) -> int:
        return len(self.lazy)

    def __contains__(self, name: object) -> bool:
        return name in self.lazy


def curvature_file_kind(path: Path, label: str) -> str:
    """'fisher', 'gram' or 'kfac', from the file's metadata (written by ``modelmerge curvature`` or the library)."""
    if not path.is_file():
        raise RecipeError(f"{label}: no curvature file at {path}")
    kind = LazySafetensors(path).metadata().get("kind")
    kinds = {"diagonal_fisher_sum": "fisher", "gram": "gram", "kfac": "kfac"}
    if kind not in kinds:
        raise RecipeError(f"{label}: {path.name} is not a curvature file of this library (kind={kind!r})")
    return kinds[kind]


def check_curvature_file(path: Path, label: str, base: ModelSource) -> str:
    """The file's kind, after checking its parameter names and shapes against the base model's."""
    kind = curvature_file_kind(path, label)
    lazy = LazySafetensors(path)
    floats = [k for k in base.weights if tensor_info(base.weights, k)[0].is_floating_point]
    if kind == "fisher":
        missing = [k for k in floats if k not in lazy]
        if missing:
            raise RecipeError(f"{label}: {path.name} has no Fisher for parameter {missing[0]!r} "
                              f"({len(missing)} of {len(floats)} parameters missing: was it estimated on this model?)")
        for k in floats:
            if lazy.info(k)[1] != tensor_info(base.weights, k)[1]:
                raise RecipeError(f"{label}: {path.name} has shape {lazy.info(k)[1]} for parameter {k!r}, the "
                                  f"model {tensor_info(base.weights, k)[1]}")
        return kind
    in_axis = json.loads(lazy.metadata().get("in_axis", "{}"))
    for key in lazy:
        name = key.rsplit("::", 1)[0]
        if name not in base.weights:
            raise RecipeError(f"{label}: {path.name} has factors for {name!r}, which the model does not have")
        shape = tensor_info(base.weights, name)[1]
        if len(shape) != 2:
            raise RecipeError(f"{label}: {path.name} has factors for {name!r}, which is not a matrix {shape}")
        d_in, d_out = shape[in_axis.get(name, 1)], shape[1 - in_axis.get(name, 1)]
        want = (d_in, d_in) if key.endswith("::A") else (d_out, d_out)
        if lazy.info(key)[1] != want:
            raise RecipeError(f"{label}: {path.name} factor {key!r} has shape {lazy.info(key)[1]}, the layer "
                              f"needs {want}")
    return kind


def load_curvature(paths: list[Path], scale: str):
    """A curvature specification from file(s): a diagonal Fisher (F_sum or F_avg), or Gram/K-FAC factors with an
    optional diagonal Fisher for the parameters the factors do not cover."""
    from modelmerge.curvature import WithFallback
    from modelmerge.curvature.estimate import LayerFactors

    def diagonal(path: Path):
        lazy = LazySafetensors(path)
        return ScaledTensors(lazy, 1.0 if scale == "sum" else 1.0 / int(lazy.metadata()["n"]))

    first = paths[0]
    if LazySafetensors(first).metadata().get("kind") == "diagonal_fisher_sum":
        return diagonal(first)
    factors = LayerFactors.load(first).curvature()
    if scale == "sum":  # factors are on F_avg's scale
        n = int(LazySafetensors(first).metadata()["n"])
        factors = {k: h.scale(n) for k, h in factors.items()}
    return WithFallback(factors, diagonal(paths[1])) if len(paths) > 1 else factors


def read_texts(path: Path, column: str, label_column: str | None, examples: int | None, seed: int):
    """Texts (and labels) of a local .txt (one text per line), .csv, .jsonl/.json or .parquet file."""
    import pandas as pd

    if not path.is_file():
        raise RecipeError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        df = pd.DataFrame({column: [line for line in path.read_text().splitlines() if line.strip()]})
    elif suffix == ".csv":
        df = pd.read_csv(path)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl")
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise RecipeError(f"{path.name}: data must be .txt, .csv, .jsonl, .json or .parquet")
    for col in (column, label_column):
        if col is not None and col not in df.columns:
            raise RecipeError(f"{path.name} has no column {col!r} (it has {', '.join(map(str, df.columns))})")
    if examples is not None and examples < len(df):
        df = df.sample(n=examples, random_state=seed).sort_index()
    texts = df[column].astype(str).tolist()
    labels = df[label_column].astype(int).tolist() if label_column else None
    return texts, labels


def estimate_curvature(
    folder: Path, data: Path, out: list[Path], settings: CurvatureConfig, device: str | None = None
) -> str:
    """Estimate a model's diagonal Fisher (F_sum), Grams or K-FAC factors on a local data file and save them to
    ``out[0]``; with a second path, also the diagonal Fisher (K-FAC: from the same pass) for the other parameters."""
    from modelmerge.curvature.estimate import diagonal_fisher, fisher_and_kfac, layer_factors
    from modelmerge.train import text_batches

    kind = settings.kind
    model, tokenizer = load_for_task(folder, settings.task)
    texts, labels = read_texts(data, settings.column, settings.label_column, settings.examples, settings.seed)
    if settings.task == "classification" and labels is None:
        raise RecipeError(f"{data.name}: classification curvature needs label_column")
    batches = text_batches(tokenizer, texts, labels, settings.batch_size, settings.max_length, task=settings.task,
                           by_length=True)
    source = f"{data.name} ({len(texts)} texts)"
    common = dict(task=settings.task, fisher=settings.fisher, seed=settings.seed, device=device, data=source)
    if kind == "kfac" and len(out) == 2:
        results = fisher_and_kfac(model, batches, **common)[::-1]
    elif kind == "fisher":
        results = [diagonal_fisher(model, batches, **common)]
    else:
        results = [layer_factors(model, batches, kind=kind, **common)]
        if len(out) == 2:
            results.append(diagonal_fisher(model, batches, **common))
    for result, path in zip(results, out):
        result.save(path)
    return f"{' and '.join(p.name.split('.')[-2] for p in out)} of {folder.name} on {source}, N = {results[0].n}"


def load_for_task(folder: Path, task: str):
    """(model, tokenizer) from a Hugging Face folder, with a causal-LM or sequence-classification head."""
    import transformers

    from modelmerge.files import check_safetensors

    check_safetensors(folder)
    cls = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModelForSequenceClassification
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cls.from_pretrained(folder), tokenizer


# -- running a recipe --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a recipe will read and compute, resolved and checked (nothing written yet)."""

    recipe: Recipe
    params: BaseModel
    base: ModelSource | None
    models: list[ModelSource]
    curvature_files: list[list[Path] | None]  # per model: file(s) given, or None (estimated from data)
    curvature_data: list[Path | None]
    base_curvature: float | Path | None
    recipe_root: Path = Path(".")

    def subset(self, chosen: list[int]) -> Plan:
        """The plan restricted to the models ``chosen`` (and their alphas and curvature)."""
        params = self.params.model_copy()
        alphas = getattr(params, "alphas", None)
        if isinstance(alphas, (list, tuple)):
            params.alphas = [alphas[i] for i in chosen]
        return Plan(self.recipe, params, self.base, [self.models[i] for i in chosen],
                    [self.curvature_files[i] for i in chosen], [self.curvature_data[i] for i in chosen],
                    self.base_curvature, self.recipe_root)

    @property
    def layout(self) -> ModelSource:
        """The model whose names, dtypes, config and tokenizer the output takes (the base, else the first model)."""
        return self.base or self.models[0]

    def describe(self) -> str:
        """A human-readable account of the plan, with a peak-memory estimate."""
        r, lay = self.recipe, self.layout
        n_params = lay.n_parameters()
        lines = [f"method: {r.method}", f"parameters: {self.params.model_dump()}"]
        if r.dare:
            lines.append(f"DARE on every task vector: p = {r.dare.p}, seed = {r.dare.seed}")
        for src in ([self.base] if self.base else []) + self.models:
            where = src.folder or src.spec
            lines.append(f"{src.label}: {where} ({len(src.weights)} tensors, {n_params:,} parameters)")
        cfg = r.curvature or CurvatureConfig()
        for i, (files, data) in enumerate(zip(self.curvature_files, self.curvature_data)):
            if files:
                lines.append(f"models[{i}] curvature: read {', '.join(str(f) for f in files)} (scale: F_{cfg.scale})")
            elif data:
                lines.append(f"models[{i}] curvature: estimate {cfg.kind} on {data} (column {cfg.column!r}, "
                             f"{cfg.examples or 'all'} examples, max length {cfg.max_length}, batch {cfg.batch_size})")
        if r.select is not None:
            sel = r.select
            lines.append(f"select: the {sel.k} of {len(self.models)} models of the DPP MAP ({'exact' if sel.exact else 'greedy'}), "
                         f"similarity of hidden states on {sel.examples} texts of {sel.data}")
        if self.base_curvature is not None:
            lines.append(f"base curvature H_0: {self.base_curvature if isinstance(self.base_curvature, Path) else f'{self.base_curvature:g} I'}")
        import psutil

        largest = lay.largest_tensor_bytes() * 2  # merged in float32 at least
        t = len(self.models)
        peak = (t + 3) * largest * (2 if any(self.curvature_files) or any(self.curvature_data) else 1)
        if any(self.curvature_data):
            # a model, its activation gradients and the running statistics in float32, and a batch's logits
            # (and their gradient) when the head is a vocabulary
            vocab = int(lay.config.get("vocab_size", 0)) if cfg.task == "causal_lm" else 0
            peak = max(peak, 4 * n_params * 4 + 3 * 4 * cfg.batch_size * cfg.max_length * vocab)
        peak += psutil.Process().memory_info().rss  # what this process already holds (Python, torch)
        if lay.folder is None:
            lines.append(f"note: {lay.label} is a bare .safetensors file: the output has no config or tokenizer and "
                         "does not load with from_pretrained until you add them")
        lines.append(f"output: {n_params:,} parameters streamed to model.safetensors; peak memory estimate "
                     f"~{max(peak / 2**20, 0.1):.1f} MiB")
        return "\n".join(lines)


def plan_recipe(recipe: Recipe, params: BaseModel, root: str | os.PathLike = ".") -> Plan:
    """Resolve every input of a validated recipe and check them against each other (headers only, no weights)."""
    root = Path(root)
    method = METHODS[recipe.method]
    base_entry = recipe.base_entry()
    base = resolve_model(base_entry.model, "base", root) if base_entry else None
    entries = recipe.entries()
    models = [resolve_model(e.model, f"models[{i}]", root) for i, e in enumerate(entries)]
    layout = base or models[0]
    check_compatible(layout, [m for m in models if m is not layout])
    files, data = [], []
    for i, e in enumerate(entries):
        label = f"models[{i}].curvature"
        if e.curvature is not None:
            paths = [root / p for p in ([e.curvature] if isinstance(e.curvature, str) else e.curvature)]
            kinds = [check_curvature_file(p, label, layout) for p in paths]
            if method.curvature == "gram" and kinds[0] != "gram":
                raise RecipeError(f"{label}: {recipe.method} needs Gram matrices, {paths[0].name} holds {kinds[0]}")
            if len(paths) > 2 or (len(paths) == 2 and (kinds[0] == "fisher" or kinds[1] != "fisher")):
                raise RecipeError(f"{label}: give one file, or [K-FAC/Gram factors, diagonal Fisher for the rest]")
            if len(paths) == 1 and kinds[0] != "fisher" and needs_fisher_fallback(recipe.method):
                raise RecipeError(f"{label}: {recipe.method} needs a curvature for every parameter, and "
                                  f"{kinds[0]} factors cover only linear weights: give [{paths[0].name}, a diagonal "
                                  "Fisher file for the rest]")
            files.append(paths)
            data.append(None)
        else:
            files.append(None)
            if e.data is not None:
                if models[i].folder is None:
                    raise RecipeError(f"models[{i}].data: estimating curvature needs a model folder with config.json "
                                      f"and a tokenizer, not the bare file {e.model}")
                cfg = recipe.curvature or CurvatureConfig()
                _check_columns(root / e.data, f"models[{i}].data", cfg.column, cfg.label_column)
            data.append(root / e.data if e.data else None)
    if recipe.select is not None:
        _check_columns(root / recipe.select.data, "select.data", recipe.select.column, None)
        for m in models:
            if m.folder is None:
                raise RecipeError(f"{m.label}: DPP selection compares hidden states and needs a model folder")
    base_curvature = None
    if recipe.method == "gradient_matching":
        b = recipe.curvature.base
        if isinstance(b, str):
            base_curvature = root / b
            if check_curvature_file(base_curvature, "curvature.base", layout) != "fisher":
                raise RecipeError("curvature.base: H_0 from a file must be a diagonal Fisher (or a number c: c I)")
        else:
            if not b >= 0:
                raise RecipeError(f"curvature.base: H_0 = c I needs c >= 0, got {b}")
            base_curvature = float(b)
    return Plan(recipe, params, base, models, files, data, base_curvature, root)


def check_output(out: Path, overwrite: bool = False) -> None:
    """OUT_DIR must not exist, or be empty, or be replaced on purpose."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"OUT_DIR: {out} exists and is not empty (pass --overwrite to replace it)")


def needs_fisher_fallback(method: str) -> bool:
    """Methods without a fallback argument: K-FAC/Gram factors must come with a diagonal Fisher for the rest."""
    return method in ("fisher_average", "gradient_matching")


def _check_columns(path: Path, label: str, column: str, label_column: str | None) -> None:
    """A data file exists, is readable, and has the columns the recipe names (read before any weight)."""
    if not path.is_file():
        raise RecipeError(f"{label}: no data file at {path}")
    try:
        read_texts(path, column, label_column, None, 0)
    except RecipeError as err:
        raise RecipeError(f"{label}: {err}") from None


def model_card(plan: Plan, recipe_text: str) -> str:
    """README.md of a merged folder: the exact recipe and the versions that ran it."""
    import transformers

    import modelmerge

    inputs = "\n".join(f"- {src.label}: `{src.spec}`" for src in ([plan.base] if plan.base else []) + plan.models)
    return (
        "---\ntags: [merge, modelmerge]\n---\n\n"
        f"# Merged with modelmerge: {plan.recipe.method}\n\n"
        f"This folder was written by `modelmerge merge` (modelmerge {modelmerge.__version__}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}). Config and tokenizer are the base's "
        "(or the first model's); the weights are the merge.\n\n"
        f"## Inputs\n\n{inputs}\n\n## Recipe\n\n```yaml\n{recipe_text.strip()}\n```\n\n"
        f"## What ran\n\n```\n{plan.describe()}\n```\n"
    )


def run_plan(plan: Plan, out_dir: str | os.PathLike, recipe_text: str, device: str | None = None,
             overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Estimate what curvature is missing, merge parameter by parameter into ``out_dir/model.safetensors``, copy
    config and tokenizer, write the model card; all in a temporary folder renamed to ``out_dir`` at the end, so a
    failure leaves nothing behind."""
    import shutil
    import tempfile

    from modelmerge.curvature import Scalar
    from modelmerge.io import SafetensorsWriter
    from modelmerge.solve import ConjugateGradient

    out = Path(out_dir)
    check_output(out, overwrite)
    if not out.parent.is_dir():
        raise RecipeError(f"OUT_DIR: the folder {out.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        recipe, method = plan.recipe, METHODS[plan.recipe.method]
        # DARE masks are seeded by each model's place in the recipe, whatever the DPP keeps
        weights: list[Mapping[str, Tensor]] = [m.weights for m in plan.models]
        if recipe.dare is not None:
            weights = merge_rules.dare(plan.base.weights, weights, recipe.dare.p, recipe.dare.seed)
        chosen = list(range(len(plan.models)))
        if recipe.select is not None:
            chosen, report = dpp_select(plan, device)
            log(report)
            plan = plan.subset(chosen)
        cfg = recipe.curvature or CurvatureConfig()
        curvature_paths = []
        for i, (files, data) in zip(chosen, zip(plan.curvature_files, plan.curvature_data)):
            if files is None and data is not None:
                (tmp / "curvature").mkdir(exist_ok=True)
                files = [tmp / "curvature" / f"models_{i}.{k}.safetensors"
                         for k in ([cfg.kind, "fisher"] if cfg.kind != "fisher" and needs_fisher_fallback(recipe.method)
                                   else [cfg.kind])]
                log(estimate_curvature(plan.models[len(curvature_paths)].folder, data, files, cfg, device))
                for f in files:  # what was estimated must fit the model like a given file
                    check_curvature_file(f, f"models[{i}] (estimated)", plan.layout)
            curvature_paths.append(files)
        kwargs: dict[str, Any] = {}
        params = plan.params.model_dump()
        iterations = params.pop("cg_iterations", None)
        preconditioner = params.pop("cg_preconditioner", "none")
        if method.solver:
            kwargs["solver"] = ConjugateGradient(max_iter=iterations, preconditioner=preconditioner)
        if "base" in method.filled:
            kwargs["base"] = plan.base.weights
        kwargs["models"] = [weights[i] for i in chosen]
        if recipe.method == "regmean":  # Grams, and the diagonal Fisher (if given) for what they do not cover
            kwargs["grams"] = [load_curvature(files[:1], cfg.scale) for files in curvature_paths]
            fallbacks = [len(files) == 2 for files in curvature_paths]
            if any(fallbacks) and not all(fallbacks):
                raise RecipeError("models: give every model a diagonal Fisher fallback, or none (RegMean then "
                                  "averages what the Grams do not cover)")
            if all(fallbacks):
                kwargs["fallback"] = [load_curvature(files[1:], cfg.scale) for files in curvature_paths]
        elif method.curvature != "none":
            specs = [load_curvature(files, cfg.scale) for files in curvature_paths]
            kwargs["fishers" if recipe.method == "fisher_average" else "curvatures"] = specs
        if recipe.method == "gradient_matching":
            b = plan.base_curvature
            kwargs["base_curvature"] = load_curvature([b], cfg.scale) if isinstance(b, Path) else Scalar(b)
        meta = {"format": "pt", "modelmerge_method": recipe.method}  # "format": what transformers 4.x expects
        with SafetensorsWriter.like(plan.layout.weights, tmp / "model.safetensors", metadata=meta) as writer:
            method.function(**kwargs, **params, out=writer)
        if plan.layout.folder is not None:
            for f in sorted(plan.layout.folder.iterdir()):
                if f.is_file() and not WEIGHT_FILE.search(f.name) and f.name != "README.md":
                    shutil.copy2(f, tmp / f.name)
        (tmp / "recipe.yaml").write_text(recipe_text)
        (tmp / "README.md").write_text(model_card(plan, recipe_text))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hidden_states(folder: Path, texts: list[str], max_length: int, batch_size: int, device: str | None = None) -> Tensor:
    """Mean-pooled last hidden states (texts x features) of a model folder's backbone."""
    import transformers

    from modelmerge.curvature.estimate import default_device
    from modelmerge.files import check_safetensors
    from modelmerge.train import text_batches

    check_safetensors(folder)
    device = torch.device(device) if device else default_device()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModel.from_pretrained(folder).to(device).eval()
    out = []
    with torch.no_grad():
        for b in text_batches(tokenizer, texts, None, batch_size, max_length):
            mask = b["attention_mask"].to(device)
            h = model(input_ids=b["input_ids"].to(device), attention_mask=mask).last_hidden_state
            out.append(((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).float().cpu())
    return torch.cat(out)


def dpp_select(plan: Plan, device: str | None = None) -> tuple[list[int], str]:
    """003's DPP MAP of size k over the plan's models (see ``Select``); returns the indices and a report."""
    from tqdm.auto import tqdm

    from modelmerge.select import dpp_kernel, exact_map, greedy_map, log_det, quality_scores, similarity_matrix

    sel = plan.recipe.select
    texts, _ = read_texts(plan.recipe_root / sel.data, sel.column, None, sel.examples, 0)
    reps = torch.stack([hidden_states(m.folder, texts, sel.max_length, sel.batch_size, device)
                        for m in tqdm(plan.models, desc="hidden states for the DPP")])
    try:
        q = quality_scores(sel.quality, sel.base_quality)
    except ValueError as err:
        raise RecipeError(f"select.quality: {err}") from None
    L = dpp_kernel(q, similarity_matrix(reps))
    chosen = sorted((exact_map if sel.exact else greedy_map)(L, sel.k))
    if len(chosen) < sel.k:
        raise RecipeError(f"select.k: only {len(chosen)} models can be selected with det(L_Y) > 0 (the others are "
                          "duplicates, or no better than the base)")
    names = ", ".join(plan.models[i].label for i in chosen)
    return chosen, f"DPP selected {names} (log det L_Y = {log_det(L, chosen):.3f})"
