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
from modelmerge.recipe.sources import ModelSource, resolve_model


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
    from modelmerge.train import masked_lm_batches, text_batches

    kind = settings.kind
    model, tokenizer = load_for_task(folder, settings.task)
    texts, labels = read_texts(data, settings.column, settings.label_column, settings.examples, settings.seed)
    if settings.task == "classification" and labels is None:
        raise RecipeError(f"{data.name}: classification curvature needs label_column")
    if settings.task == "masked_lm":
        batches = masked_lm_batches(tokenizer, texts, settings.batch_size, settings.max_length,
                                    probability=settings.mask_probability, seed=settings.seed)
    else:
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
    checkpoint = set(resolve_model(str(folder), "model", Path(".")).weights)
    for result, path in zip(results, out):
        restrict_to_checkpoint(result, checkpoint).save(path)
    return f"{' and '.join(p.name.split('.')[-2] for p in out)} of {folder.name} on {source}, N = {results[0].n}"


#: the head an architecture's class name says it has -> the loss its curvature is estimated on
HEAD_TASKS = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm", "ForMaskedLM": "masked_lm",
              "ForSequenceClassification": "classification"}


def architecture_task(architecture: str) -> str | None:
    """The curvature task of a Transformers class name (``BertForMaskedLM`` -> "masked_lm"); None: no such head."""
    return next((task for suffix, task in HEAD_TASKS.items() if architecture.endswith(suffix)), None)


def check_curvature_head(source: ModelSource, task: str, label: str) -> type:
    """The class of the folder's own architecture (config.json), after checking from headers alone that it has a
    ``task`` head, that the checkpoint holds every parameter it needs, and that it uses every tensor the
    checkpoint holds: the curvature then carries exactly the checkpoint's names."""
    import torch
    import transformers

    folder = source.folder
    config = transformers.AutoConfig.from_pretrained(folder)
    arch = (config.architectures or [None])[0]
    own = architecture_task(arch) if arch else None
    cls = getattr(transformers, arch, None) if arch else None
    heads = "a language-model (causal or masked) or sequence-classification head"
    if own is None or cls is None:
        raise RecipeError(
            f"{label}: {folder} is a {arch or 'model without an architecture in config.json'}, without {heads}: an "
            f"empirical Fisher is the squared gradient of a loss, and this folder gives none. Two ways out: estimate on "
            f"a checkpoint of the same model that has the head (curvature.task: causal_lm, masked_lm or "
            f"classification, matching it), or estimate with the library on your own loss "
            f"(modelmerge.curvature.estimate.diagonal_fisher(model, batches, task=...) and .save(path), on a model "
            f"whose parameter names are this checkpoint's) and give the file as curvature: instead of data:")
    if own != task:
        raise RecipeError(f"{label}: {folder} is a {arch} (a {own} head) but curvature.task is {task}: set "
                          f"curvature.task: {own}, or give a curvature file estimated on the loss you want")
    with torch.device("meta"):
        skeleton = cls(config)
    canonical = {n for n, _ in skeleton.named_parameters()}
    every = {n for n, _ in skeleton.named_parameters(remove_duplicate=False)}
    missing = sorted(canonical - set(source.weights))
    if missing:
        raise RecipeError(f"{label}: the checkpoint in {folder} has no weights for {len(missing)} parameter(s) of its "
                          f"{arch}, e.g. {missing[:3]}: they would be newly initialised and the Fisher would come from "
                          "random weights. Estimate on a checkpoint that holds its head, or give a curvature file")
    floats = {k for k in source.weights if tensor_info(source.weights, k)[0].is_floating_point}
    unused = sorted(floats - every)
    if unused:
        raise RecipeError(f"{label}: the checkpoint in {folder} holds {len(unused)} tensor(s) its {arch} does not use, "
                          f"e.g. {unused[:3]}: no loss of that class gives them a curvature. Remove them from the "
                          "checkpoint, or give a curvature file that covers them")
    return cls


def restrict_to_checkpoint(result, names: set[str]):
    """A Fisher or Gram/K-FAC estimate with only the checkpoint's ``names``: a tied parameter's second name (a masked
    LM's decoder tied to the embeddings, saved once) is dropped, its statistics stay under the name it is saved as."""
    from dataclasses import replace

    if hasattr(result, "f_sum"):
        return replace(result, f_sum={k: v for k, v in result.f_sum.items() if k in names})
    keep = [k for k in result.A if k in names]
    return replace(result, A={k: result.A[k] for k in keep}, B={k: result.B[k] for k in keep if k in result.B},
                   in_axis={k: result.in_axis[k] for k in keep})


def load_for_task(folder: Path, task: str):
    """(model, tokenizer) from a Hugging Face folder, as the class its config.json names (checked by
    ``check_curvature_head``), so the parameter names are the checkpoint's own."""
    import transformers

    from modelmerge.files import check_safetensors

    check_safetensors(folder)
    cls = check_curvature_head(resolve_model(str(folder), "model", Path(".")), task, "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return cls.from_pretrained(folder), tokenizer


def needs_fisher_fallback(method: str) -> bool:
    """Methods without a fallback argument: K-FAC/Gram factors must come with a diagonal Fisher for the rest."""
    return method in ("fisher_average", "gradient_matching")
