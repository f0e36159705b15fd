"""The learned-merging experiment on the eight-task suite (004): SuperMerge, its no-tanh ablation, AdaMerging and
hierarchical SuperMerge against task arithmetic, TIES and DARE, with 004's rank tables and cost.

Each learned merge runs in a process of its own (``python -m modelmerge.experiments.supermerge learn ...``, one
Snakemake job per merge), so its wall time, FLOPs and peak memory are measured alone: the task models are read
lazily from their files, and hierarchical merging keeps its intermediate models on disk, as 004 Sec. 5 intends.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from modelmerge.cost import measure, pin_malloc_threshold
from modelmerge.io import LazySafetensors, atomic_write_text, save_state_dict, tensor_info
from modelmerge.merge import dare, task_arithmetic, ties
from modelmerge.merge.learned import Chained, adamerging, hierarchical_merge, supermerge, tied_aliases
from modelmerge.statedict import StateDict, scaled_update, strip_prefix

#: the learned merges: file-name key -> how 004's tables name it
LEARNED = {
    "supermerge": "SuperMerge",
    "supermerge_no_tanh": "SuperMerge w/o tanh",
    "adamerging": "AdaMerging",
    "hierarchical": "Hierarchical SuperMerge",
}
#: the training-free baselines 004 compares against (lambda, and DARE's p, chosen on validation data)
BASELINES = ("Task Arith.", "DARE + Task Arith.", "TIES", "DARE + TIES")


class Prefixed(Mapping):
    """A state dict seen with ``prefix`` in front of every name (an encoder's weights as the suite model names them),
    read lazily from the wrapped mapping."""

    def __init__(self, state: StateDict, prefix: str):
        self.state, self.prefix = state, prefix

    def __getitem__(self, name: str) -> Tensor:
        if not name.startswith(self.prefix):
            raise KeyError(name)
        return self.state[name[len(self.prefix):]]

    def __iter__(self) -> Iterator[str]:
        return (self.prefix + k for k in self.state.keys())

    def __len__(self) -> int:
        return len(self.state)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) without reading the data when the wrapped state is lazy."""
        if not name.startswith(self.prefix):
            raise KeyError(name)
        return tensor_info(self.state, name[len(self.prefix):])


class TaggedBatches(Sequence):
    """A task's batches, each read when indexed (image batches are preprocessed then) and given the task's name, so
    the suite model scores it with that task's frozen head; ``drop`` removes keys (AdaMerging: the labels)."""

    def __init__(self, batches: Sequence[Mapping], task: str, examples: int, drop: Sequence[str] = ()):
        self.batches, self.task, self.examples, self.drop = batches, task, examples, tuple(drop)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v for k, v in self.batches[i].items() if k not in self.drop}, "task": self.task}

    def __len__(self) -> int:
        return len(self.batches)

    def without(self, *keys: str) -> TaggedBatches:
        """The same batches without ``keys``."""
        return TaggedBatches(self.batches, self.task, self.examples, self.drop + keys)


def tagged_batches(tokenizer, frames: Mapping[str, pd.DataFrame], batch_size: int, max_length: int,
                   seed: int = 0) -> dict[str, TaggedBatches]:
    """task -> its (shuffled, seeded) batches tagged with the task: the supervised loss of 004 Eq. 5 is then the
    loss of each task's examples under that task's frozen head."""
    from modelmerge.experiments.suite import batches_of

    return {t: TaggedBatches(batches_of(tokenizer, f, batch_size, max_length, True, seed + i), t, len(f))
            for i, (t, f) in enumerate(frames.items())}


def learn_suite_merge(
    method: str,
    base: StateDict,
    models: Sequence[StateDict],
    skeleton: nn.Module,
    batches: Sequence[Sequence[Mapping]],
    *,
    epochs: int,
    lr: float,
    init: float = 0.3,
    fan_in: int = 2,
    seed: int = 0,
    store_dir: str | Path | None = None,
    progress: bool = True,
    on_epoch=None,
) -> dict:
    """One learned merge of ``models`` (model i learns on ``batches[i]``); ``skeleton`` is the module the merged
    weights are plugged into (never modified). Returns the merged state, c(W) (models x tensors) with the tensor
    names, the loss after every step, and for hierarchical merging the groups of every level.

    ``hierarchical`` writes every intermediate model to ``store_dir`` (a temporary folder when None) and reads it
    back lazily, so no more than ``fan_in`` task vectors are ever in memory.
    """
    if method not in LEARNED:
        raise ValueError(f"method must be one of {sorted(LEARNED)}, got {method!r}")
    if len(batches) != len(models):
        raise ValueError(f"got {len(batches)} batch lists for {len(models)} models")
    common = dict(epochs=epochs, lr=lr, seed=seed, progress=progress, on_epoch=on_epoch)
    if method == "hierarchical":
        losses: list[float] = []

        def merge_group(b, group, group_batches):
            result = supermerge(b, group, skeleton, group_batches, init=init, **common)
            losses.extend(result.losses)
            return result.state

        with tempfile.TemporaryDirectory(dir=store_dir) as tmp:
            def store(state, level, index):
                path = Path(tmp) / f"level{level}_group{index}.safetensors"
                save_state_dict(state, path)
                return LazySafetensors(path)

            merged, tree = hierarchical_merge(base, models, batches, merge_group, fan_in=fan_in, store=store)
            state = dict(merged.items())  # read into memory before the temporary folder goes
        return {"state": state, "coefficients": None, "names": None, "losses": losses, "tree": tree}
    if method == "adamerging":
        unlabelled = Chained([bs.without("labels") if isinstance(bs, TaggedBatches) else
                              [{k: v for k, v in b.items() if k != "labels"} for b in bs] for bs in batches])
        result = adamerging(base, models, skeleton, unlabelled, init=init, **common)
    else:
        result = supermerge(base, models, skeleton, Chained(batches), init=init, use_tanh=method == "supermerge",
                            **common)
    return {"state": result.state, "coefficients": result.coefficients, "names": coefficient_names(base, skeleton),
            "losses": result.losses, "tree": None}


def coefficient_names(base: StateDict, skeleton: nn.Module) -> list[str]:
    """The tensors that get one learned coefficient each, in ``LayerwiseMerge``'s column order."""
    tied = tied_aliases(skeleton)
    return [n for n in base.keys() if tensor_info(base, n)[0].is_floating_point and n not in tied]


def trainable_parameters(method: str, n_models: int, n_tensors: int, tree: Sequence | None = None) -> tuple[int, int]:
    """(merge weights learned in all, at most at once): k x tensors for a flat merge; for a hierarchical one the
    sum, and the largest, of |group| x tensors over every group of every level."""
    if method != "hierarchical":
        return n_models * n_tensors, n_models * n_tensors
    sizes = [len(g) for level in tree for g in level if len(g) > 1]
    return sum(sizes) * n_tensors, max(sizes) * n_tensors


def tree_names(tree: Sequence[Sequence[Sequence[int]]], tasks: Sequence[str]) -> list[list[list[str]]]:
    """``hierarchical_merge``'s groups (indices into each level's models) as the tasks every group covers."""
    covers, out = [[t] for t in tasks], []
    for level in tree:
        covers = [[t for i in g for t in covers[i]] for g in level]
        out.append(covers)
    return out


class _CountFlops(TorchDispatchMode):
    """Adds up the FLOPs ``torch.utils.flop_counter`` assigns to every operator that runs (matrix products,
    attention, convolutions), without its per-module bookkeeping (half its overhead)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


class FirstEpochFlops:
    """An ``on_epoch`` callback that counts the FLOPs (as ``torch.utils.flop_counter`` does: matrix products, forward
    and backward) of the first epoch of every learning run it is given to, and adds them up. Every epoch passes over
    the same batches, so this is the FLOPs per epoch, without the counter's overhead on the other epochs."""

    def __init__(self):
        self.total, self.runs, self._mode = 0, 0, None

    def __call__(self, epoch: int) -> None:
        if epoch == 0 and self._mode is None:
            self._mode = _CountFlops()
            self._mode.__enter__()
        elif epoch > 0 and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.total += self._mode.total
            self._mode, self.runs = None, self.runs + 1


def skeleton_base(skeleton: nn.Module, base: StateDict) -> dict[str, Tensor]:
    """The pretrained weights as the (CPU) skeleton already holds them, so they are not in memory twice, after
    checking, one tensor at a time, that they are ``base``'s."""
    own = dict(skeleton.state_dict(keep_vars=False))
    out = {}
    for n in base.keys():
        theta0 = base[n]
        if n not in own or not torch.equal(own[n].cpu(), theta0):
            raise ValueError(f"the skeleton's {n!r} is not the base model's: build the skeleton from the base weights")
        out[n] = own[n].detach() if own[n].device.type == "cpu" else theta0  # a GPU skeleton: the base stays on the host
    return out


def measured_learned_merge(method: str, base_path: str, model_paths: Sequence[str], build, *, epochs: int, lr: float,
                           init: float = 0.3, fan_in: int = 2, seed: int = 0, prefix: str = "",
                           store_dir: str | None = None, count_flops: bool = True,
                           progress: bool = True) -> tuple[dict, dict]:
    """``learn_suite_merge`` on lazily read files, timed, FLOP-counted and memory-sampled (``cost.measure``).

    ``build()`` returns (skeleton module, one batch list per model); it runs once before the measurement (so
    imports and one-off set-up are not counted) and again inside it, so the skeleton's own weights count, as 004
    Eq. 6 counts the model weights. The memory is the peak resident size
    above the process's level at entry (run each measurement in a fresh process; glibc's allocation threshold is
    pinned so that freed tensors leave the resident set, ``cost.pin_malloc_threshold``). FLOPs per epoch are counted on
    the first epoch of every learning run (``FirstEpochFlops``; hierarchical: summed over its groups) when
    ``count_flops`` (the counter slows that epoch by about a fifth).
    """
    pin_malloc_threshold()
    skeleton, batches = build()  # a first build, dropped: imports and lazy module set-up do not count as the merge's
    del skeleton, batches
    gc.collect()
    flops = FirstEpochFlops()
    with measure() as m:
        skeleton, batches = build()
        base = skeleton_base(skeleton, Prefixed(LazySafetensors(base_path), prefix))
        models = [Prefixed(LazySafetensors(p), prefix) for p in model_paths]
        result = learn_suite_merge(method, base, models, skeleton, batches, epochs=epochs, lr=lr, init=init,
                                   fan_in=fan_in, seed=seed, store_dir=store_dir, progress=progress,
                                   on_epoch=flops if count_flops else None)
    names = coefficient_names(base, skeleton)
    examples = sum(bs.examples if isinstance(bs, TaggedBatches) else sum(len(b["labels"]) for b in bs) for bs in batches)
    total, at_once = trainable_parameters(method, len(models), len(names), result["tree"])
    cost = {"seconds": m.seconds, "peak_host_mb": m.peak_host_mb, "peak_device_mb": m.peak_device_mb,
            "flops_per_epoch": int(flops.total) if count_flops else None, "learning_runs": flops.runs,
            "epochs": epochs, "steps": len(result["losses"]), "examples": examples,
            "parameters": sum(int(np.prod(tensor_info(base, n)[1])) for n in base.keys()),
            "task_vector_parameters": sum(int(np.prod(tensor_info(base, n)[1])) for n in names),
            "trainable": total, "trainable_at_once": at_once, "threads": torch.get_num_threads(),
            "device": str(next(skeleton.parameters()).device)}
    return result, cost


# --- command line: one learned merge of the suite per process --------------------------------------------------------

def _learn(args: argparse.Namespace) -> None:
    from modelmerge.experiments.suite import eval_frame, load_suite_model

    torch.set_num_threads(args.threads)
    suite = Path(args.suite_dir)

    def build():
        model, tokenizer = load_suite_model(str(suite / "models" / "pretrained"), str(suite / "heads"), args.tasks)
        frames = {t: eval_frame(args.data_dir, t, "validation") for t in args.tasks}
        per_task = tagged_batches(tokenizer, frames, args.batch_size, args.max_length, args.seed)
        return model, [per_task[t] for t in args.tasks]

    start = time.perf_counter()
    result, cost = measured_learned_merge(
        args.method, str(suite / "models" / "pretrained" / "model.safetensors"),
        [str(suite / "models" / t / "model.safetensors") for t in args.tasks], build, epochs=args.epochs, lr=args.lr,
        init=args.init, fan_in=args.fan_in, seed=args.seed, prefix="encoder.", store_dir=args.out_dir,
        count_flops=args.count_flops)
    out = Path(args.out_dir)
    save_state_dict(strip_prefix(result["state"], "encoder."), out / "model.safetensors",
                    metadata={"method": args.method, "tasks": ",".join(args.tasks)})
    record = {
        "method": args.method, "label": LEARNED[args.method], "tasks": args.tasks,
        "settings": {k: getattr(args, k) for k in ("epochs", "lr", "init", "fan_in", "batch_size", "max_length", "seed")},
        "names": [n[len("encoder."):] for n in result["names"]] if result["names"] else None,
        "coefficients": result["coefficients"].tolist() if result["coefficients"] is not None else None,
        "losses": result["losses"],
        "tree": tree_names(result["tree"], args.tasks) if result["tree"] else None,
        "cost": cost, "wall_seconds": time.perf_counter() - start,
    }
    atomic_write_text(out / "learned.json", json.dumps(record, indent=1) + "\n")
    flops = f", {cost['flops_per_epoch']:.3g} FLOPs per epoch" if args.count_flops else ""
    print(f"{LEARNED[args.method]} of {len(args.tasks)} tasks: {cost['steps']} steps, {cost['seconds']:.0f} s, "
          f"peak {cost['peak_host_mb']:.0f} MB above start{flops}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modelmerge.experiments.supermerge", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    learn = sub.add_parser("learn", help="learn one merge of the suite's task models on their validation data")
    learn.add_argument("--method", required=True, choices=sorted(LEARNED))
    learn.add_argument("--tasks", required=True, nargs="+", help="the task models to merge (their validation data)")
    learn.add_argument("--suite-dir", required=True, help="the suite's results folder (models/, heads/)")
    learn.add_argument("--data-dir", required=True, help="the suite's prepared splits")
    learn.add_argument("--out-dir", required=True, help="gets model.safetensors (the merged encoder) and learned.json")
    learn.add_argument("--epochs", type=int, required=True)
    learn.add_argument("--lr", type=float, required=True)
    learn.add_argument("--init", type=float, default=0.3, help="initial coefficient c(W) of every tensor")
    learn.add_argument("--fan-in", type=int, default=2, help="hierarchical: models merged at once")
    learn.add_argument("--batch-size", type=int, default=16)
    learn.add_argument("--max-length", type=int, default=64)
    learn.add_argument("--seed", type=int, default=0)
    learn.add_argument("--threads", type=int, default=1)
    learn.add_argument("--count-flops", action="store_true", help="count the FLOPs of the first epoch (slows it)")
    args = parser.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    _learn(args)



# --- the baselines, tuned on validation data, and every merge scored ----------------------------------------------

def baseline_at_one(method: str, base: StateDict, models: Sequence[StateDict], *, ties_k: float, dare_p: float,
                    seed: int) -> dict[str, Tensor]:
    """A baseline at lambda = 1: theta_0 + sum_i tau_i (task arithmetic) or TIES's merged vector (k = ``ties_k``),
    of DARE'd task models (drop ``dare_p``, masks seeded with ``seed``) for the "DARE + " rows."""
    if method not in BASELINES:
        raise ValueError(f"method must be one of {BASELINES}, got {method!r}")
    if method.startswith("DARE"):
        models = dare(base, list(models), dare_p, seed=seed)
    return dict(task_arithmetic(base, models, 1.0) if "Task Arith." in method else ties(base, models, k=ties_k, lam=1.0))


def tuned_baseline(method: str, base: StateDict, models: Sequence[StateDict], score, *, lambdas: Sequence[float],
                   ties_k: float, dare_p: float, seed: int) -> tuple[dict[str, Tensor], float, dict[float, float]]:
    """The baseline at the lambda maximising ``score(state)`` (ties: the smaller lambda), that lambda and every
    lambda's score; every baseline is linear in lambda: theta(lambda) = theta_0 + lambda (theta(1) - theta_0)."""
    from modelmerge.experiments.mats import choose_on_validation

    at_one = baseline_at_one(method, base, models, ties_k=ties_k, dare_p=dare_p, seed=seed)
    grid = {lam: scaled_update(base, at_one, lam) for lam in sorted(lambdas)}
    best, scores = choose_on_validation(grid, score)
    return grid[best], best, scores


def state_correct(evaluator, state: Mapping[str, Tensor], batches: Mapping[str, list],
                  bf16: bool = False) -> dict[str, np.ndarray]:
    """task -> 1[argmax = label] per example of the encoder ``state`` with the evaluator's frozen heads, in the
    batches' order (the same batches for every method, so scores pair up example by example)."""
    from modelmerge.experiments.suite import batch_correct

    evaluator.model.load_encoder_state(state)
    return batch_correct(evaluator.model, batches, bf16=bf16)


# --- 004's tables: rank (accuracy) ---------------------------------------------------------------------------------

def ranks(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Rank of every method (row) on every task (column): 1 = most accurate; equal accuracies share the best rank
    (004 Table 3 ranks SuperMerge and its hierarchical version both first on SUN397 and Cars)."""
    return accuracy.rank(axis=0, ascending=False, method="min").astype(int)


def rank_accuracy_table(accuracy: pd.DataFrame, ranked: Sequence[str], reference: Sequence[str] = (),
                        groups: Mapping[str, Sequence[str]] | None = None, digits: int = 1,
                        unranked: Sequence[str] = ()) -> pd.DataFrame:
    """004's layout: one row per method, "rank (accuracy %)" per task, and per group of tasks an "Avg." column
    "mean rank (mean accuracy %)"; ``reference`` rows (Individual, Multitask; first) and ``unranked`` rows
    (sensitivity checks; last) are shown with accuracy only and do not take part in the ranking. ``accuracy`` holds
    fractions, methods x tasks."""
    groups = dict(groups or {"": list(accuracy.columns)})
    r = ranks(accuracy.loc[list(ranked)])
    rows = []
    for method in [*reference, *ranked, *unranked]:
        row = {"method": method}
        for name, cols in groups.items():
            avg = f"{name} Avg.".strip()
            mean_acc = 100 * accuracy.loc[method, list(cols)].mean()
            row[avg] = (f"{r.loc[method, list(cols)].mean():.{digits}f} ({mean_acc:.{digits}f})" if method in r.index
                        else f"{mean_acc:.{digits}f}")
            for c in cols:
                acc = 100 * accuracy.loc[method, c]
                row[c] = f"{r.loc[method, c]} ({acc:.{digits}f})" if method in r.index else f"{acc:.{digits}f}"
        rows.append(row)
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
