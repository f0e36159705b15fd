"""The ``modelmerge`` command: ``modelmerge merge RECIPE.yaml OUT_DIR`` and ``modelmerge curvature MODEL DATA OUT``.

Relative paths inside a recipe are read from the recipe file's folder, so a recipe runs the same from anywhere.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from modelmerge.io import DEFAULT_SHARD_SIZE
from modelmerge.statedict import MergeInputError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelmerge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the models of a YAML recipe into a Hugging Face model folder")
    m.add_argument("recipe", type=Path, help="the YAML recipe (method, base, models, parameters, curvature)")
    m.add_argument("out_dir", type=Path, help="the merged model folder to write (must not exist or be empty)")
    m.add_argument("--dry-run", action="store_true", help="check the recipe and print what would run; write nothing")
    m.add_argument("--device", default=None,
                   help="where curvature is estimated (default: cuda if present, else cpu) and where the elementwise "
                        "methods' arithmetic runs (default: cpu; the other methods merge on the cpu)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    m.add_argument("--reference", action="store_true",
                   help="merge with the reference driver instead of the fast path of the elementwise methods "
                        "(average, weighted_average, task_arithmetic, ties, with or without dare): the same bits, slower")
    m.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE,
                   help=f"largest output shard, e.g. 5GB or 2GiB (default {DEFAULT_SHARD_SIZE}, as save_pretrained); "
                        "a larger model is written as model-0000k-of-0000n.safetensors with its index")

    c = sub.add_parser("curvature", help="estimate a model's curvature on a local data file, once, for many merges")
    c.add_argument("model", type=Path, help="a Hugging Face model folder (config, tokenizer, safetensors weights)")
    c.add_argument("data", type=Path, help="a .txt (one text per line), .csv, .jsonl or .parquet file")
    c.add_argument("out", type=Path, help="the .safetensors file to write")
    c.add_argument("--kind", choices=["fisher", "gram", "kfac"], default="fisher",
                   help="diagonal Fisher F_sum (default), RegMean Grams, or K-FAC factors")
    c.add_argument("--task", choices=["causal_lm", "masked_lm", "classification"], default="causal_lm",
                   help="the loss of the folder's own head (its config.json architecture)")
    c.add_argument("--fisher", choices=["empirical", "sampled", "exact"], default="empirical",
                   help="labels the squared gradients use: the data's, sampled from the model, or the expectation")
    c.add_argument("--column", default="text", help="the text column (default: text)")
    c.add_argument("--label-column", default=None, help="classification: the integer label column")
    c.add_argument("--examples", type=int, default=None, help="a seeded subsample of this many texts (default: all)")
    c.add_argument("--max-length", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=None)
    c.add_argument("--dry-run", action="store_true", help="check the inputs and print what would run")
    return parser


def _merge(args: argparse.Namespace) -> None:
    from modelmerge.recipe import check_output, load_recipe, plan_recipe, run_plan

    recipe, params = load_recipe(args.recipe)
    check_output(args.out_dir, args.overwrite)
    plan = plan_recipe(recipe, params, root=args.recipe.resolve().parent, shard_size=args.shard_size)
    print(plan.describe())
    if args.dry_run:
        print("dry run: nothing written")
        return
    start = time.perf_counter()
    out = run_plan(plan, args.out_dir, args.recipe.read_text(), device=args.device, overwrite=args.overwrite,
                   fast=not args.reference)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _curvature(args: argparse.Namespace) -> None:
    from modelmerge.recipe import (
        CurvatureConfig,
        RecipeError,
        check_curvature_head,
        estimate_curvature,
        read_texts,
        resolve_model,
    )

    source = resolve_model(str(args.model), "model", Path.cwd())
    if source.folder is None:
        raise RecipeError(f"model: estimating curvature needs a model folder (config.json, tokenizer), not {args.model}")
    if args.out.suffix != ".safetensors":
        raise RecipeError(f"out: write curvature to a .safetensors file, not {args.out.name}")
    settings = CurvatureConfig(kind=args.kind, column=args.column, label_column=args.label_column, task=args.task,
                               fisher=args.fisher, examples=args.examples, max_length=args.max_length,
                               batch_size=args.batch_size, seed=args.seed)
    check_curvature_head(source, args.task, "model")  # the folder's own head gives the loss, names kept
    texts, _ = read_texts(args.data, args.column, args.label_column, args.examples, args.seed)
    print(f"{args.kind} of {source.folder} ({source.n_parameters():,} parameters) on {len(texts)} texts "
          f"of {args.data}, max length {args.max_length}, batch {args.batch_size}")
    if args.dry_run:
        print("dry run: nothing written")
        return
    start = time.perf_counter()
    summary = estimate_curvature(source.folder, args.data, [args.out], settings, args.device)
    print(f"{summary}; wrote {args.out} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``modelmerge`` console script; returns the exit status."""
    from pydantic import ValidationError

    from modelmerge.recipe import RecipeError, validation_message

    args = _parser().parse_args(argv)
    try:
        (_merge if args.command == "merge" else _curvature)(args)
    except ValidationError as err:  # command-line settings checked by the recipe's types
        print(f"modelmerge {args.command}: error: {validation_message(err)}", file=sys.stderr)
        return 1
    except (RecipeError, MergeInputError, ValueError, OSError) as err:
        print(f"modelmerge {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
