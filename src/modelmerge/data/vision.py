"""The eight image tasks of the paper suite (DESIGN.md section 7) as FusionBench's CLIP model pool uses them.

SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD from the hub datasets FusionBench loads
(``config/dataset/image_classification/{train,val,test}/<task>.yaml``), with the class names and prompt templates
of its zero-shot heads (``modelmerge.data.vision_classes``) and the fine-tuned ViT-B/32 vision towers
``tanganke/clip-vit-base-patch32_<task>``. Every split is a ``datasets.Dataset`` with an ``image`` column (decoded
to PIL on access) and a ``label`` column (a ``ClassLabel`` named by ``class_names(task)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from modelmerge.data.vision_classes import CLASSNAMES, TEMPLATES

PRETRAINED_CLIP = "openai/clip-vit-base-patch32"
# the corrupted copies of the test split that FusionBench's robustness task pool reads (hub split names)
CORRUPTIONS = ("contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate", "spatter")


@dataclass(frozen=True)
class VisionTask:
    """Where one image task lives on the hub (dataset, config, columns, splits) and its fine-tuned vision tower."""

    path: str
    finetuned: str
    config: str | None = None
    image: str = "image"
    label: str = "label"
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})  # ours -> hub's
    corruptions: tuple[str, ...] = ()


def _ft(suffix: str) -> str:
    return f"tanganke/clip-vit-base-patch32_{suffix}"


VISION_TASKS: dict[str, VisionTask] = {
    "sun397": VisionTask("tanganke/sun397", _ft("sun397")),
    "stanford_cars": VisionTask("tanganke/stanford_cars", _ft("stanford-cars"), corruptions=CORRUPTIONS),
    "resisc45": VisionTask("tanganke/resisc45", _ft("resisc45"), corruptions=CORRUPTIONS),
    "eurosat": VisionTask("tanganke/eurosat", _ft("eurosat"), corruptions=CORRUPTIONS),
    # the hub's cropped_digits config also has an "extra" split (531k easier digits) that FusionBench does not use
    "svhn": VisionTask("ufldl-stanford/svhn", _ft("svhn"), config="cropped_digits"),
    "gtsrb": VisionTask("tanganke/gtsrb", _ft("gtsrb"), corruptions=CORRUPTIONS),
    "mnist": VisionTask("ylecun/mnist", _ft("mnist")),
    "dtd": VisionTask("tanganke/dtd", _ft("dtd")),
}


def _spec(name: str) -> VisionTask:
    if name not in VISION_TASKS:
        raise KeyError(f"unknown vision task {name!r}; known: {sorted(VISION_TASKS)}")
    return VISION_TASKS[name]


def class_names(name: str) -> list[str]:
    """The class names of task ``name``, in label order (name i belongs to label i)."""
    _spec(name)
    return list(CLASSNAMES[name])


def templates(name: str) -> list[str]:
    """The prompt templates of task ``name``: format strings with one ``{}`` for the class name."""
    _spec(name)
    return list(TEMPLATES[name])


def validation_split(
    n: int, fraction: float = 0.1, seed: int = 0, max_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices of an n-row split: the last floor(fraction n) of a seeded permutation.

    The permutation is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``, so the two parts are
    exactly ``torch.utils.data.random_split(range(n), [n - v, v], generator)``: FusionBench's
    ``train_validation_split`` (fraction 0.1, seed 0) and, with ``max_size=5000``, Ilharco et al.'s
    ``split_train_into_train_val``. Both index arrays are returned sorted.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
    n_val = int(n * fraction) if max_size is None else min(int(n * fraction), max_size)
    if n_val < 1 or n_val >= n:
        raise ValueError(f"cannot hold out {n_val} of {n} rows for validation")
    import torch  # here, not at the top: the workflow reads this module's task table at parse time

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[: n - n_val]), np.sort(perm[n - n_val :])


def _hub_files(path: str, config: str | None, splits: Sequence[str], cache_dir: str | None) -> tuple[str, dict]:
    """(packaged builder, hub split -> data files) from the dataset's own configuration, for the wanted splits only."""
    import datasets

    builder = datasets.load_dataset_builder(path, config, cache_dir=cache_dir)
    files = getattr(builder.config, "data_files", None)
    if not files:
        raise ValueError(f"{path} ({config}) lists no data files; it cannot be read split by split")
    missing = [s for s in splits if s not in files]
    if missing:
        raise KeyError(f"{path} ({config}) has no split(s) {missing}; it has {sorted(files)}")
    return builder.name, {s: list(files[s]) for s in splits}


def _normalise(ds, name: str, spec: VisionTask, split: str):
    """Keep image and label, decode images to PIL, and name the labels; raise on labels outside the class list."""
    import datasets
    import pyarrow.compute as pc

    for col in (spec.image, spec.label):
        if col not in ds.column_names:
            raise KeyError(f"{name} {split}: no column {col!r}; columns: {ds.column_names}")
    ds = ds.select_columns([spec.image, spec.label])
    if spec.image != "image":
        ds = ds.rename_column(spec.image, "image")
    if spec.label != "label":
        ds = ds.rename_column(spec.label, "label")
    ds = ds.cast_column("label", datasets.Value("int64"))
    names = class_names(name)
    if len(ds):
        lo, hi = pc.min_max(ds.with_format("arrow")["label"]).values()
        if lo.as_py() < 0 or hi.as_py() >= len(names):
            raise ValueError(f"{name} {split}: labels span [{lo}, {hi}] but the task has {len(names)} classes")
    ds = ds.cast_column("label", datasets.ClassLabel(names=names))
    return ds.cast_column("image", datasets.Image())


def load_vision_task(
    name: str,
    data_files: Mapping[str, str | Sequence[str]] | None = None,
    builder: str = "parquet",
    *,
    source: str | os.PathLike | None = None,
    seed: int = 0,
    validation_fraction: float = 0.1,
    max_validation: int | None = None,
    corruptions: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """Our split name -> ``datasets.Dataset`` (image, label) for train, validation, test (and corrupted test sets).

    None of the eight hub datasets has a validation split, so validation is carved from the hub's train split as
    FusionBench and Ilharco et al. do (``validation_split``: a seeded ``validation_fraction`` of train, at most
    ``max_validation`` rows) and train keeps the rest, so the two are disjoint. Note that the tanganke fine-tunes were
    trained on the hub's whole train split (FusionBench's train config), validation included.

    Without ``data_files`` the split files come from the dataset's own configuration on the hub (or in ``source``, a
    local folder laid out as the hub repository), and only the wanted splits are downloaded. With ``data_files``
    (keyed by the hub's split names) the files are read by ``builder`` offline. ``corruptions`` adds hub test
    splits such as ``"gaussian_noise"`` for the tasks that have them (``VisionTask.corruptions``).
    """
    import datasets

    spec = _spec(name)
    bad = [c for c in corruptions if c not in spec.corruptions]
    if bad:
        raise KeyError(f"{name} has no corrupted split(s) {bad}; it has {list(spec.corruptions)}")
    wanted = {**dict(spec.splits), **{c: c for c in corruptions}}
    cache = None if cache_dir is None else str(cache_dir)
    if data_files is not None:
        missing = [s for s in wanted.values() if s not in data_files]
        if missing:
            raise KeyError(f"{name}: data_files lack the hub split(s) {missing}; given {sorted(data_files)}")
        module, files = builder, {s: data_files[s] for s in wanted.values()}
    else:
        module, files = _hub_files(str(source or spec.path), spec.config, list(wanted.values()), cache)
    raw = datasets.load_dataset(module, data_files=files, cache_dir=cache)
    out = {ours: _normalise(raw[theirs], name, spec, theirs) for ours, theirs in wanted.items()}
    if "validation" not in out:
        train_idx, val_idx = validation_split(len(out["train"]), validation_fraction, seed, max_validation)
        out["train"], out["validation"] = out["train"].select(train_idx), out["train"].select(val_idx)
    order = ["train", "validation", "test", *corruptions]
    return {s: out[s] for s in order}


def check_head(head, labels, num_classes: int | None = None) -> None:
    """Raise ValueError unless ``head`` has one row per class of the data and every label indexes a row.

    ``labels`` is a ``datasets.Dataset`` (its ``ClassLabel`` gives the class count) or a sequence of ints;
    ``num_classes`` overrides the class count.
    """
    features = getattr(labels, "features", None)
    if features is not None:
        if num_classes is None and hasattr(features.get("label"), "num_classes"):
            num_classes = features["label"].num_classes
        labels = labels.with_format("numpy")["label"]
    y = np.asarray(labels, dtype=np.int64)
    if num_classes is not None and head.num_classes != num_classes:
        raise ValueError(f"head has {head.num_classes} classes but the data has {num_classes}")
    if len(y) and (y.min() < 0 or y.max() >= head.num_classes):
        raise ValueError(f"labels span [{y.min()}, {y.max()}] but the head has {head.num_classes} classes")
