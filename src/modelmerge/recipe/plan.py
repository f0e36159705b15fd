"""A recipe resolved into a plan: every input found and checked against the others (headers only), with a
human-readable account and a peak-memory estimate; what the dry run prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from modelmerge.io import DEFAULT_SHARD_SIZE, parse_size, shard_names, tensor_info
from modelmerge.recipe.config import METHODS, CurvatureConfig, Recipe, RecipeError
from modelmerge.recipe.curvature import check_curvature_file, check_curvature_head, needs_fisher_fallback
from modelmerge.recipe.data import check_columns
from modelmerge.recipe.sources import ModelSource, check_compatible, resolve_model
from modelmerge.statedict import MergeInputError


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
    shard_size: int | str = DEFAULT_SHARD_SIZE  # the output's largest shard (bytes, or "5GB")

    def subset(self, chosen: list[int]) -> Plan:
        """The plan restricted to the models ``chosen`` (and their alphas and curvature)."""
        params = self.params.model_copy()
        alphas = getattr(params, "alphas", None)
        if isinstance(alphas, (list, tuple)):
            params.alphas = [alphas[i] for i in chosen]
        return Plan(self.recipe, params, self.base, [self.models[i] for i in chosen],
                    [self.curvature_files[i] for i in chosen], [self.curvature_data[i] for i in chosen],
                    self.base_curvature, self.recipe_root, self.shard_size)

    @property
    def layout(self) -> ModelSource:
        """The model whose names, dtypes, config and tokenizer the output takes (the base, else the first model)."""
        return self.base or self.models[0]

    def output_layout(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of the output: the layout model's, floating-point tensors in the recipe's dtype."""
        lay, dtype = self.layout.weights, self.recipe.dtype
        out = {k: tensor_info(lay, k) for k in lay}
        if dtype is None:
            return out
        return {k: (getattr(torch, dtype) if d.is_floating_point else d, shape) for k, (d, shape) in out.items()}

    def shards(self) -> list[list[str]]:
        """The output's tensor names per shard (``shard_size``; a tensor larger than a shard is refused)."""
        try:
            return shard_names(self.output_layout(), parse_size(self.shard_size))
        except (MergeInputError, ValueError) as err:
            raise RecipeError(f"--shard-size: {err}") from None

    def describe(self) -> str:
        """A human-readable account of the plan, with a peak-memory estimate."""
        r, lay = self.recipe, self.layout
        n_params = lay.n_parameters()
        lines = [f"method: {r.method}", f"parameters: {self.params.model_dump()}"]
        if r.dare:
            lines.append(f"DARE on every task vector: p = {r.dare.p}, seed = {r.dare.seed}")
        if r.dtype:
            lines.append(f"output dtype: {r.dtype} (merged in float32 or wider, cast once at the end)")
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
        shards = self.shards()
        where = "model.safetensors" if len(shards) == 1 else f"{len(shards)} shards of at most {self.shard_size} + index"
        lines.append(f"output: {n_params:,} parameters streamed to {where}; peak memory estimate "
                     f"~{max(peak / 2**20, 0.1):.1f} MiB")
        return "\n".join(lines)


def plan_recipe(recipe: Recipe, params: BaseModel, root: str | os.PathLike = ".",
                shard_size: int | str = DEFAULT_SHARD_SIZE) -> Plan:
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
                check_curvature_head(models[i], cfg.task, f"models[{i}].data")
                check_columns(root / e.data, f"models[{i}].data", cfg.column, cfg.label_column)
            data.append(root / e.data if e.data else None)
    if recipe.select is not None:
        check_columns(root / recipe.select.data, "select.data", recipe.select.column, None)
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
    plan = Plan(recipe, params, base, models, files, data, base_curvature, root, shard_size)
    plan.shards()  # a shard size below the largest tensor stops here, before any weight is read
    return plan


def check_output(out: Path, overwrite: bool = False) -> None:
    """OUT_DIR must not exist, or be empty, or be replaced on purpose."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RecipeError(f"OUT_DIR: {out} exists and is not empty (pass --overwrite to replace it)")
