"""Running a plan: estimate the missing curvature, select, merge parameter by parameter into a new model folder
(written in a temporary folder and renamed at the end), with a model card."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from modelmerge import merge as merge_rules
from modelmerge.recipe.config import METHODS, CurvatureConfig, RecipeError
from modelmerge.recipe.curvature import check_curvature_file, estimate_curvature, load_curvature, needs_fisher_fallback
from modelmerge.recipe.plan import Plan, check_output
from modelmerge.recipe.select import dpp_select
from modelmerge.recipe.sources import WEIGHT_FILE


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


class CastTo(MutableMapping):
    """Writes floating-point tensors to ``out`` cast to ``dtype`` (a recipe's output dtype); others as they are."""

    def __init__(self, out: MutableMapping[str, Tensor], dtype: torch.dtype):
        self.out, self.dtype = out, dtype

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        self.out[name] = tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def __getitem__(self, name: str) -> Tensor:
        return self.out[name]

    def __delitem__(self, name: str) -> None:
        del self.out[name]

    def __iter__(self):
        return iter(self.out)

    def __len__(self) -> int:
        return len(self.out)


def run_plan(plan: Plan, out_dir: str | os.PathLike, recipe_text: str, device: str | None = None,
             overwrite: bool = False, log: Callable[[str], None] = print, fast: bool = True) -> Path:
    """Estimate what curvature is missing, merge parameter by parameter into ``out_dir/model.safetensors`` (or
    shards of ``plan.shard_size`` with their index; the elementwise methods on the fast path unless ``fast`` is
    False, with the same result bit for bit), copy
    config and tokenizer, write the model card; all in a temporary folder renamed to ``out_dir`` at the end, so a
    failure leaves nothing behind."""
    import shutil
    import tempfile

    from modelmerge.curvature import Scalar
    from modelmerge.io import ShardedSafetensorsWriter
    from modelmerge.merge.fast import METHODS as FAST_METHODS
    from modelmerge.merge.fast import fast_merge
    from modelmerge.solve import ConjugateGradient

    out = Path(out_dir)
    check_output(out, overwrite)
    if not out.parent.is_dir():
        raise RecipeError(f"OUT_DIR: the folder {out.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        recipe, method = plan.recipe, METHODS[plan.recipe.method]
        # the fast path of the elementwise methods reads memory-mapped inputs (the same bits as the reference)
        fast = fast and recipe.method in FAST_METHODS
        base_weights = None if plan.base is None else plan.base.mapped() if fast else plan.base.weights
        weights: list[Mapping[str, Tensor]] = [m.mapped() if fast else m.weights for m in plan.models]
        # DARE masks are seeded by each model's place in the recipe, whatever the DPP keeps
        if recipe.dare is not None:
            weights = merge_rules.dare(base_weights, weights, recipe.dare.p, recipe.dare.seed)
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
            kwargs["base"] = base_weights
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
        with ShardedSafetensorsWriter(tmp, plan.output_layout(), plan.shard_size, metadata=meta) as writer:
            target = writer if recipe.dtype is None else CastTo(writer, getattr(torch, recipe.dtype))
            if fast:  # in-place chunks over memory-mapped inputs, written as they are produced
                fast_merge(recipe.method, base_weights, kwargs["models"], target, device=device, **params)
            else:
                method.function(**kwargs, **params, out=target)
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
