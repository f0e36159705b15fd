"""A recipe's curvature: files checked against the model they belong to, loaded lazily (F_sum or F_avg; K-FAC or
Gram factors with a diagonal Fisher for the rest), or estimated on a local data file."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch import Tensor

from modelmerge.io import LazySafetensors, tensor_info
from modelmerge.recipe.config import CurvatureConfig, RecipeError
from modelmerge.recipe.data import read_texts
from modelmerge.recipe.sources import ModelSource


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
    common = {"task": settings.task, "fisher": settings.fisher, "seed": settings.seed, "device": device, "data": source}
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


def needs_fisher_fallback(method: str) -> bool:
    """Methods without a fallback argument: K-FAC/Gram factors must come with a diagonal Fisher for the rest."""
    return method in ("fisher_average", "gradient_matching")
