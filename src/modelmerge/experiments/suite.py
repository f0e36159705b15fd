"""The eight-task suite as workflow stages (DESIGN.md section 7): data, pretrained encoder + frozen heads, task and
multitask fine-tunes, curvature, and scoring any encoder on any task.

Layout under ``results/<suite>/``: ``models/pretrained/`` (a ``save_pretrained`` encoder folder with its tokenizer),
``heads/<task>.safetensors`` (``LinearHead``), ``models/<task|multitask>/`` (encoder folder, ``metrics.json``,
``predictions.safetensors`` = logits of every split and task), ``curvature/<task>/<kind>.safetensors``. Task vectors
and every curvature file are keyed by the encoder's own parameter names.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from modelmerge.data.suite import suite_modality  # noqa: F401  (re-exported: the suite's modality)
from modelmerge.heads import EncoderClassifier, LinearHead, encode, fit_linear_probe
from modelmerge.statedict import strip_prefix

CURVATURE_KINDS = ("fisher_train", "fisher_validation", "fisher_sampled", "gram", "kfac_train", "kfac_validation",
                   "kfac_sampled")
# what every default experiment reads; kfac_train and kfac_sampled feed only 002 Table 4's K-FAC rows (mats_full)
DEFAULT_CURVATURE_KINDS = ("fisher_train", "fisher_validation", "fisher_sampled", "gram", "kfac_validation")
MULTITASK = "multitask"
HEAD_KINDS = ("zero_shot", "probe")


# --- data ---------------------------------------------------------------------------------------------------------

def vision_suite_tasks(tasks: Sequence[str], *, seed: int, validation: float, caps: Mapping[str, int]) -> tuple[dict, dict]:
    """(task -> split -> frame with encoded image bytes and label, task -> class names) from the hub (paper suite)."""
    import datasets

    from modelmerge.data.suite import cap_splits
    from modelmerge.data.vision import class_names, load_vision_task

    splits, classes = {}, {}
    for task in tasks:
        parts = load_vision_task(task, seed=seed, validation_fraction=validation)
        frames = {}
        for split, ds in parts.items():
            ds = ds.cast_column("image", datasets.Image(decode=False))
            if len(ds) > caps[split]:
                idx = np.sort(np.random.default_rng(seed).choice(len(ds), caps[split], replace=False))
                ds = ds.select(idx.tolist())
            frames[split] = ds.to_pandas()[["image", "label"]]
        splits[task], classes[task] = cap_splits(frames, caps, seed), class_names(task)
    return splits, classes


def prepare_suite_data(
    tasks: Sequence[str], raw_dir: str, data_dir: str, *, seed: int, validation: float, caps: Mapping[str, int],
    min_condition: int,
) -> tuple[dict, dict]:
    """Write ``data_dir/<task>/{train,validation,test}.parquet`` and ``data_dir/classes.json``; return (splits, classes).

    Offline tasks come from the packaged corpora unpacked under ``raw_dir`` (``data.suite``: deduplicated, split by
    count); paper tasks from the hub (``data.vision``, images kept encoded in the parquet files, ``test`` unused:
    the hub fixes the test split, ``validation`` is the fraction of the hub's train split held out).
    """
    from modelmerge.data import write_splits
    from modelmerge.data.suite import suite_tasks
    from modelmerge.io import atomic_write_text

    if suite_modality(tasks) == "image":
        splits, classes = vision_suite_tasks(tasks, seed=seed, validation=validation, caps=caps)
    else:
        splits, classes = suite_tasks(raw_dir, tasks, seed=seed, caps=caps, min_condition=min_condition)
    for task, parts in splits.items():
        write_splits(parts, Path(data_dir) / task)
    atomic_write_text(Path(data_dir) / "classes.json", json.dumps(classes, indent=1) + "\n")
    return splits, classes


def suite_datasheet_table(splits: Mapping, classes: Mapping, assets: Mapping, stem: str) -> str:
    """The datasheet of the suite (source, licence, classes, split sizes), saved as a table; returns it."""
    from modelmerge.data.suite import TEXT_TASKS, suite_datasheet
    from modelmerge.data.vision import VISION_TASKS
    from modelmerge.report import save_table

    if suite_modality(list(splits)) == "image":
        sources = {t: f"hub {VISION_TASKS[t].path}" for t in splits}
        licences = {t: "see the dataset card on the hub" for t in splits}
        what = "The paper suite (002/003/004's eight image tasks)"
    else:
        spec = {t: assets[TEXT_TASKS[t].asset] for t in splits}
        sources = {t: f"{spec[t]['package']}=={spec[t]['version']}: {TEXT_TASKS[t].describe}" for t in splits}
        licences = {t: spec[t]["licence"] for t in splits}
        what = "The offline eight-task suite"
    sheet = suite_datasheet(splits, classes, sources, licences)
    if sheet["class names"].str.len().max() > 200:  # SUN397's 397 names do not belong in a table cell
        sheet["class names"] = ["; ".join(classes[t][:5]) + ("; ..." if len(classes[t]) > 5 else "") for t in splits]
    save_table(sheet, stem, floatfmt=".1f", caption=(
        f"{what}: every task's source, licence, classes and seeded split sizes (offline tasks: deduplicated by "
        "normalised text, then cut by count, test first); the majority-class share of the test split is the "
        "accuracy of always guessing it."))
    return sheet.drop(columns=["class names"]).to_string()


def read_classes(data_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Task -> class names, as prepared."""
    return json.loads((Path(data_dir) / "classes.json").read_text())


def split_frame_of(data_dir: str | os.PathLike, task: str, split: str, limit: int | None = None, seed: int = 0) -> pd.DataFrame:
    """One prepared split (a seeded subsample of at most ``limit`` rows, in split order, when given)."""
    df = pd.read_parquet(Path(data_dir) / task / f"{split}.parquet")
    if limit is not None and len(df) > limit:
        df = df.sample(n=limit, random_state=seed).sort_index().reset_index(drop=True)
    return df


def eval_frame(data_dir: str | os.PathLike, task: str, split: str) -> pd.DataFrame:
    """A split in the order every score of the suite uses: texts by length (stable), so batches carry little padding;
    images as stored."""
    df = split_frame_of(data_dir, task, split)
    if "text" in df.columns:
        df = df.iloc[np.argsort(df["text"].str.len().to_numpy(), kind="stable")].reset_index(drop=True)
    return df


# --- models --------------------------------------------------------------------------------------------------------

def load_encoder(folder: str | os.PathLike):
    """(encoder, its tokenizer or image processor) from a ``save_pretrained`` folder or a hub name: a text encoder
    without pooler, or a CLIP vision tower with its projection."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from modelmerge.files import check_safetensors

    check_safetensors(folder)  # a cut checkpoint is named here, not deep inside safetensors
    if AutoConfig.from_pretrained(str(folder)).model_type in ("clip", "clip_vision_model"):
        from modelmerge.clip import load_clip_vision

        return load_clip_vision(folder)
    try:
        encoder = AutoModel.from_pretrained(str(folder), add_pooling_layer=False)
    except TypeError:  # architectures without a pooler
        encoder = AutoModel.from_pretrained(str(folder))
    return encoder.eval(), AutoTokenizer.from_pretrained(str(folder))


def suite_pretrained(source: str, out_dir: str, minilm_dir: str, data_dir: str, seed: int = 0) -> None:
    """Save the pretrained encoder: the packaged MiniLM, a tiny random BERT (smoke), or a hub model (a text encoder,
    or CLIP, whose vision tower with its projection is kept: the paper suite)."""
    from modelmerge.models import save_checkpoint, tiny_model, train_tokenizer

    torch.manual_seed(seed)
    if source == "tiny":
        texts = pd.concat([pd.read_parquet(p)["text"] for p in sorted(Path(data_dir).glob("*/train.parquet"))])
        tokenizer = train_tokenizer(texts.tolist(), vocab_size=500)
        encoder = tiny_model("bert", tokenizer.vocab_size, seed=seed).bert
        encoder.pooler = None
    else:
        encoder, tokenizer = load_encoder(minilm_dir if source == "minilm" else source)
    save_checkpoint(encoder, tokenizer, out_dir, {"source": source})


def batches_of(tokenizer, frame: pd.DataFrame, batch_size: int, max_length: int, shuffle: bool = False,
               seed: int = 0) -> list[dict[str, Tensor]]:
    """Classification batches of a split frame: tokenised texts (text, label) or processed images (image, label;
    a lazy sequence, each batch preprocessed when read)."""
    from modelmerge.train import text_batches

    if "image" in frame.columns:
        from modelmerge.clip import image_batches

        if shuffle:
            frame = frame.iloc[np.random.default_rng(seed).permutation(len(frame))]
        return image_batches(tokenizer, frame["image"].tolist(), frame["label"].tolist(), batch_size)
    return text_batches(tokenizer, frame["text"].tolist(), frame["label"].tolist(), batch_size, max_length, shuffle, seed)


def length_order(tokenizer, frame: pd.DataFrame, max_length: int) -> np.ndarray:
    """The permutation that orders a frame's texts by token count (stable; the identity for image frames): batches
    cut in that order carry little padding."""
    if "text" not in frame.columns:
        return np.arange(len(frame))
    ids = tokenizer(frame["text"].tolist(), truncation=True, max_length=max_length)["input_ids"]
    return np.argsort([len(i) for i in ids], kind="stable")


def fit_heads(
    pretrained_dir: str, data_dir: str, heads_dir: str, tasks: Sequence[str], *, max_length: int, l2: float,
    threads: int = 1, clip_source: str | None = None, heads: str = "zero_shot", other_dir: str | None = None,
) -> pd.DataFrame:
    """One frozen head per task, saved in ``heads_dir``; returns each head's validation accuracy on the pretrained
    encoder.

    Text: ``heads="zero_shot"`` is CLIP's construction with the task's class names and templates
    (``data.suite.TEXT_TASKS``, logit scale 100); ``heads="probe"`` a linear probe on the pretrained encoder's
    features of the task's training split. Both kinds are built; the other one is saved in ``other_dir`` (when
    given) and its accuracy reported beside, so the suite can show both pretrained rows. Image (paper): the
    zero-shot head of the full CLIP ``clip_source`` (class names x templates through the text tower).
    """
    if heads not in HEAD_KINDS:
        raise ValueError(f"heads must be one of {HEAD_KINDS}, got {heads!r}")
    torch.set_num_threads(threads)
    encoder, tokenizer = load_encoder(pretrained_dir)
    encoder.to(device())
    classes = read_classes(data_dir)
    image = encoder.config.model_type.startswith("clip")
    if image:
        from modelmerge.clip import load_clip_vision

        if clip_source is None:
            raise ValueError("fit_heads: a CLIP encoder needs clip_source (the full CLIP whose text tower makes the "
                             "zero-shot heads)")
        tower = load_clip_vision(clip_source)[0].state_dict()
        if any(not torch.equal(v.cpu(), tower[k]) for k, v in encoder.state_dict().items()):
            raise ValueError(f"fit_heads: the vision tower of clip_source {clip_source!r} is not the pretrained encoder "
                             f"in {pretrained_dir}: its zero-shot heads would not fit the encoder")
    rows = []
    for task in tasks:
        train, val = (split_frame_of(data_dir, task, s) for s in ("train", "validation"))
        placeholder = {task: LinearHead(torch.zeros(len(classes[task]), 1))}
        model = EncoderClassifier(encoder, placeholder, pooling="clip" if image else "mean")
        xv = encode(model, batches_of(tokenizer, val, 64, max_length))
        if image:
            from modelmerge.clip import zero_shot_head
            from modelmerge.data.vision import templates

            built = {"zero_shot": zero_shot_head(clip_source, classes[task], templates(task), device=device())}
        else:
            from modelmerge.data.suite import TEXT_TASKS

            x = encode(model, batches_of(tokenizer, train, 64, max_length))
            built = {"probe": fit_linear_probe(x, train["label"].to_numpy(), len(classes[task]), l2=l2,
                                               classes=classes[task])}
            if heads == "zero_shot" or task in TEXT_TASKS:  # a task without prompts can still have a probe head
                built["zero_shot"] = text_task_head(encoder, tokenizer, task, classes[task], max_length=max_length)
        row = {"task": task, "classes": len(classes[task]), "train examples": len(train)}
        for kind, head in built.items():
            check_head(task, head, train["label"].to_numpy())
            check_head(task, head, val["label"].to_numpy())
            row[f"validation accuracy, {kind.replace('_', '-')} head"] = float(
                (head(xv).argmax(-1).numpy() == val["label"].to_numpy()).mean())
        if heads not in built:
            raise ValueError(f"heads={heads!r} is not available for image tasks (CLIP's zero-shot heads only)")
        built[heads].save(Path(heads_dir) / f"{task}.safetensors")
        for kind, head in built.items():
            if kind != heads and other_dir is not None:
                head.save(Path(other_dir) / f"{task}.safetensors")
        rows.append(row)
    return pd.DataFrame(rows)


def text_task_head(encoder: torch.nn.Module, tokenizer, task: str, classes: Sequence[str], *, max_length: int) -> LinearHead:
    """The zero-shot head of an offline suite task: its class names put into its templates (``TEXT_TASKS``)."""
    from modelmerge.data.suite import TEXT_TASKS
    from modelmerge.heads import text_zero_shot_head

    if task not in TEXT_TASKS:
        raise KeyError(f"no prompts for task {task!r}; known: {sorted(TEXT_TASKS)}")
    spec = TEXT_TASKS[task]
    names = spec.prompt_names(classes)
    empty = [c for c, n in zip(classes, names) if not str(n).strip()]
    if empty:
        raise ValueError(f"task {task!r}: class(es) {empty} have an empty name; a zero-shot head needs a name per class")
    slotless = [t for t in spec.templates if "{}" not in t]
    if slotless or not spec.templates:
        raise ValueError(f"task {task!r}: template(s) {slotless} have no '{{}}' for the class name")
    head = text_zero_shot_head(encoder, tokenizer, names, spec.templates, max_length=max_length)
    head.classes = list(classes)
    return head


def device() -> torch.device:
    """CUDA when there is a GPU (fine-tuning, curvature and scoring run there), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_head(task: str, head: LinearHead, labels: np.ndarray) -> None:
    """A head must have a row for every label the task's data uses."""
    if len(labels) and int(labels.max()) >= head.num_classes:
        raise ValueError(f"head of task {task!r} has {head.num_classes} classes but its data has label {int(labels.max())}")


def load_suite_model(pretrained_dir: str, heads_dir: str, tasks: Sequence[str], encoder_path: str | None = None):
    """(EncoderClassifier with every task's frozen head, tokenizer); the encoder weights from ``encoder_path`` if given."""
    from modelmerge.io import load_state_dict

    encoder, tokenizer = load_encoder(pretrained_dir)
    missing = [t for t in tasks if not (Path(heads_dir) / f"{t}.safetensors").exists()]
    if missing:
        raise FileNotFoundError(f"no head for task(s) {missing} in {heads_dir}")
    pooling = "clip" if encoder.config.model_type.startswith("clip") else "mean"
    model = EncoderClassifier(encoder, {t: LinearHead.load(Path(heads_dir) / f"{t}.safetensors") for t in tasks}, pooling)
    if encoder_path is not None:
        model.load_encoder_state(load_state_dict(encoder_path))
    return model.to(device()).eval(), tokenizer


def multitask_batches(tokenizer, frames: Mapping[str, pd.DataFrame], batch_size: int, max_length: int, seed: int):
    """epoch -> every task's shuffled batches, each tagged with its task, in a seeded interleaved order."""

    def epoch_batches(epoch: int) -> list[dict]:
        per_task = {task: batches_of(tokenizer, f, batch_size, max_length, True, seed + 1000 * epoch + i)
                    for i, (task, f) in enumerate(frames.items())}
        slots = [(task, j) for task, bs in per_task.items() for j in range(len(bs))]
        order = np.random.default_rng(seed + epoch).permutation(len(slots))
        return [{**per_task[slots[i][0]][slots[i][1]], "task": slots[i][0]} for i in order]

    return epoch_batches, sum(-(-len(f) // batch_size) for f in frames.values())


@torch.no_grad()
def split_logits(model: EncoderClassifier, batches: Mapping[str, list], bf16: bool = False) -> dict[str, Tensor]:
    """task -> logits of its head on its batches (each input encoded once, whichever head scores it).

    ``bf16`` runs the forward passes under bfloat16 autocast (matrix units on recent CPUs and GPUs; about 2.7x
    faster on this project's CPU), for experiments that score many merges; the logits are returned in float32.
    """
    out = {}
    dev = next(model.encoder.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        for task, bs in batches.items():
            model.set_task(task)
            out[task] = torch.cat([model(**{k: v.to(dev) for k, v in b.items() if k != "labels"}).logits.float().cpu()
                                   for b in bs])
    return out


def batch_correct(model: EncoderClassifier, batches: Mapping[str, list], bf16: bool = False) -> dict[str, np.ndarray]:
    """task -> 1[argmax logits = label] per example, in the batches' order, against the labels the batches carry."""
    logits = split_logits(model, batches, bf16=bf16)
    return {t: (lg.argmax(-1) == torch.cat([b["labels"] for b in batches[t]])).numpy().astype(np.float64)
            for t, lg in logits.items()}


def tuning_batches(evaluator: SuiteEvaluator, tasks: Sequence[str], examples: int, seed: int, max_length: int,
                   batch_size: int = 64) -> dict[str, list]:
    """task -> batches of a seeded subsample of ``examples`` validation examples (all when fewer), ordered by token
    count: the data a merge's hyperparameters are chosen on."""
    out = {}
    for t in tasks:
        f = evaluator.frames["validation"][t]
        f = f.sample(n=min(examples, len(f)), random_state=seed).sort_index()
        out[t] = batches_of(evaluator.tokenizer, f.iloc[length_order(evaluator.tokenizer, f, max_length)], batch_size,
                            max_length)
    return out


def suite_finetune(
    name: str, tasks: Sequence[str], pretrained_dir: str, heads_dir: str, data_dir: str, out_dir: str, *,
    train: Mapping, max_length: int, eval_batch_size: int = 64, threads: int = 1, seed: int = 0,
    released: str | None = None,
) -> dict:
    """Fine-tune the encoder on one task (``name``) or on all (``"multitask"``) with frozen heads; save the encoder,
    its metrics, and the logits of every task's test split and of its own tasks' validation splits (nothing reads
    another task's validation logits of a task model; test texts are scored in batches ordered by token count and
    saved in the split's order).

    ``released`` (paper suite) takes a published fine-tuned vision tower instead of training one (FusionBench's
    ``tanganke/clip-vit-base-patch32_<task>``: Ilharco et al.'s recipe), then scores and saves it the same way.
    """
    from modelmerge.io import save_state_dict
    from modelmerge.models import save_checkpoint
    from modelmerge.train import TrainConfig, finetune_batches

    torch.set_num_threads(threads)
    if name != MULTITASK and name not in tasks:
        raise KeyError(f"unknown suite model {name!r}; expected one of {list(tasks)} or {MULTITASK!r}")
    model, tokenizer = load_suite_model(pretrained_dir, heads_dir, tasks)
    config = TrainConfig(**train, max_length=max_length, seed=seed)
    chosen = list(tasks) if name == MULTITASK else [name]
    frames = {t: split_frame_of(data_dir, t, "train") for t in chosen}
    for t, f in frames.items():
        check_head(t, model.heads[t], f["label"].to_numpy())
    heads_before = {t: h.weight.clone() for t, h in model.heads.items()}
    if released is not None:
        from modelmerge.clip import load_finetuned_vision_state

        model.load_encoder_state(load_finetuned_vision_state(released, model.encoder))
        metrics = {"released": released, "seconds": 0.0, "steps": 0, "losses": [None]}
    else:
        epoch_batches, per_epoch = multitask_batches(tokenizer, frames, config.batch_size, max_length, seed)
        model.set_task(chosen[0])
        metrics = finetune_batches(model, epoch_batches, per_epoch, sum(map(len, frames.values())), config,
                                   device=device())
    if any(not torch.equal(heads_before[t], h.weight) for t, h in model.heads.items()):
        raise RuntimeError("a frozen head changed during fine-tuning")
    logits, accuracy = {}, {}
    for split, scored in (("validation", chosen), ("test", tasks)):
        data = {t: eval_frame(data_dir, t, split) for t in scored}
        order = {t: length_order(tokenizer, f, max_length) for t, f in data.items()}
        out = split_logits(model, {t: batches_of(tokenizer, f.iloc[order[t]], eval_batch_size, max_length)
                                   for t, f in data.items()})
        for t in scored:
            logits[f"{split}/{t}"] = out[t][torch.from_numpy(np.argsort(order[t], kind="stable"))]
            accuracy[f"{split}/{t}"] = float((logits[f"{split}/{t}"].argmax(-1).numpy() == data[t]["label"].to_numpy()).mean())
    save_checkpoint(model.encoder, tokenizer, out_dir, {"name": name, "tasks": chosen, "accuracy": accuracy,
                                                        **{k: v for k, v in metrics.items() if k != "losses"},
                                                        "loss_first_last": [metrics["losses"][0], metrics["losses"][-1]]})
    save_state_dict(logits, Path(out_dir) / "predictions.safetensors")
    return {"accuracy": accuracy, "seconds": metrics["seconds"], "steps": metrics["steps"]}


# --- curvature -----------------------------------------------------------------------------------------------------

def suite_curvature(
    task: str, tasks: Sequence[str], pretrained_dir: str, heads_dir: str, model_dir: str, data_dir: str, out_dir: str, *,
    max_length: int, max_examples: int, batch_size: int = 32, threads: int = 1, seed: int = 0,
    kinds: Sequence[str] = CURVATURE_KINDS,
) -> str:
    """The curvature 002 and 001 need of one task model, keyed by the encoder's parameter names:
    diagonal and K-FAC (block-diagonal) Fishers, each empirical on the training and on the validation data and with
    sampled labels on the training data (002 Table 4's three variants; diagonals saved as F_sum with N), and RegMean
    Grams on the training data. ``kinds`` chooses which of ``CURVATURE_KINDS`` to estimate (each has its own seeded
    generator, so a kind is the same whether estimated alone or with the others)."""
    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors, diagonal_fisher, layer_factors

    unknown = sorted(set(kinds) - set(CURVATURE_KINDS))
    if unknown:
        raise ValueError(f"unknown curvature kind(s) {unknown}; expected some of {list(CURVATURE_KINDS)}")

    torch.set_num_threads(threads)
    model, tokenizer = load_suite_model(pretrained_dir, heads_dir, tasks, Path(model_dir) / "model.safetensors")
    model.set_task(task)
    data = {s: split_frame_of(data_dir, task, s, max_examples, seed) for s in ("train", "validation")}
    batches = {s: batches_of(tokenizer, f, batch_size, max_length) for s, f in data.items()}
    out, lines = Path(out_dir), []
    start = time.perf_counter()
    for kind, split, fisher in (("fisher_train", "train", "empirical"), ("fisher_validation", "validation", "empirical"),
                                ("fisher_sampled", "train", "sampled")):
        if kind not in kinds:
            continue
        f = diagonal_fisher(model, batches[split], fisher=fisher, seed=seed, device=device(),
                            data=f"{task} {split} ({len(data[split])} examples)")
        DiagonalFisher(strip_prefix(f.f_sum, "encoder."), f.n, f.meta).save(out / f"{kind}.safetensors")
        lines.append(f"{kind}: N = {f.n}")
    for name, kind, split, fisher in (("gram", "gram", "train", "empirical"), ("kfac_train", "kfac", "train", "empirical"),
                                      ("kfac_validation", "kfac", "validation", "empirical"),
                                      ("kfac_sampled", "kfac", "train", "sampled")):
        if name not in kinds:
            continue
        lf = layer_factors(model, batches[split], kind=kind, fisher=fisher, seed=seed, device=device(),
                           data=f"{task} {split} ({len(data[split])} examples)")
        LayerFactors(kind, strip_prefix(lf.A, "encoder."), strip_prefix(lf.B, "encoder."), strip_prefix(lf.in_axis, "encoder."), lf.n,
                     lf.meta).save(out / f"{name}.safetensors")
        lines.append(f"{name}: {len(lf.A)} layers, N = {lf.n}")
    return f"{task}: " + "; ".join(lines) + f"; {time.perf_counter() - start:.1f} s on {device()}"


# --- scoring any encoder on any task -------------------------------------------------------------------------------

class SuiteEvaluator:
    """Scores encoder states on every task's validation or test split with the frozen heads."""

    def __init__(self, pretrained_dir: str, heads_dir: str, data_dir: str, tasks: Sequence[str], *, max_length: int,
                 batch_size: int = 64):
        self.tasks = list(tasks)
        self.model, self.tokenizer = load_suite_model(pretrained_dir, heads_dir, tasks)
        self.frames = {s: {t: eval_frame(data_dir, t, s) for t in tasks} for s in ("validation", "test")}
        self.batches = {s: {t: batches_of(self.tokenizer, f, batch_size, max_length) for t, f in fr.items()}
                        for s, fr in self.frames.items()}
        self.labels = {s: {t: f["label"].to_numpy() for t, f in fr.items()} for s, fr in self.frames.items()}
        # scoring runs on batches of texts ordered by token count (a third less padding than by characters), and
        # ``logits`` puts every row back in the frame's order
        self._scoring, self._inverse = {}, {}
        for s, fr in self.frames.items():
            for t, f in fr.items():
                order = length_order(self.tokenizer, f, max_length)
                self._scoring.setdefault(s, {})[t] = (batches_of(self.tokenizer, f.iloc[order], batch_size, max_length)
                                                      if "text" in f.columns else self.batches[s][t])
                self._inverse.setdefault(s, {})[t] = torch.from_numpy(np.argsort(order, kind="stable"))

    def sorted_batches(self, split: str) -> dict[str, list]:
        """task -> the split's batches ordered by token count (labels included): for scores that need no row order,
        such as accuracy or per-example correctness compared between models on the same batches."""
        return self._scoring[split]

    def logits(self, state: Mapping[str, Tensor], split: str = "test", bf16: bool = False) -> dict[str, Tensor]:
        """task -> logits of the encoder ``state`` with that task's head, rows in the frame's order (``bf16``: under
        bfloat16 autocast)."""
        self.model.load_encoder_state(state)
        out = split_logits(self.model, self._scoring[split], bf16=bf16)
        return {t: out[t][self._inverse[split][t]] for t in out}

    def accuracy(self, state: Mapping[str, Tensor], split: str = "test", bf16: bool = False) -> dict[str, float]:
        """task -> accuracy, and their mean under "Avg."."""
        return accuracies(self.logits(state, split, bf16), self.labels[split])


def accuracies(logits: Mapping[str, Tensor], labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """task -> accuracy of argmax logits, and "Avg." = the mean over tasks."""
    out = {t: float((logits[t].argmax(-1).numpy() == labels[t]).mean()) for t in logits}
    out["Avg."] = float(np.mean([out[t] for t in logits]))
    return out


def normalized_accuracy(acc: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """merged accuracy / the task model's own accuracy, per task, and their mean "Avg." (as FusionBench reports)."""
    tasks = [t for t in acc if t != "Avg."]
    out = {t: acc[t] / individual[t] for t in tasks}
    out["Avg."] = float(np.mean([out[t] for t in tasks]))
    return out


def ensemble_logits(per_model: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Output-space ensembling: log of the mean over models of softmax probabilities, per task."""
    return {t: torch.log(torch.stack([m[t].softmax(-1) for m in per_model]).mean(0)) for t in per_model[0]}


def read_predictions(models_dir: str | os.PathLike, name: str, split: str) -> dict[str, Tensor]:
    """task -> logits that a saved suite model gave on ``split`` (its ``predictions.safetensors``)."""
    from modelmerge.io import load_state_dict

    p = load_state_dict(Path(models_dir) / name / "predictions.safetensors")
    return {k.split("/", 1)[1]: v for k, v in p.items() if k.startswith(f"{split}/")}


def mean_diagonal(curvatures: Sequence[Mapping[str, Tensor]]) -> float:
    """The mean diagonal entry over every parameter of every given diagonal curvature: sum_t sum_i H_t,i / (T P)."""
    total = sum(float(v.double().sum()) for h in curvatures for v in h.values())
    count = sum(v.numel() for h in curvatures for v in h.values())
    if count == 0:
        raise ValueError("no curvature entries")
    return total / count


def task_arithmetic_on_validation(evaluator: SuiteEvaluator, base: Mapping[str, Tensor],
                                  models: Sequence[Mapping[str, Tensor]], lambdas: Sequence[float],
                                  ) -> tuple[float, dict[float, float], dict[str, Tensor]]:
    """(lambda*, lambda -> validation Avg., test logits at lambda*) of theta_0 + lambda sum_t (theta_t - theta_0),
    lambda* = the best validation Avg. (the smallest lambda on ties)."""
    from modelmerge.merge import task_arithmetic

    scores = {}
    for lam in lambdas:
        scores[float(lam)] = evaluator.accuracy(task_arithmetic(base, models, float(lam)), "validation")["Avg."]
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    return best, scores, evaluator.logits(task_arithmetic(base, models, best), "test")


def headroom_table(zero_shot: Mapping[str, float], individual: Mapping[str, float],
                   merged: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """One row per task (and "Avg."): zero-shot and individual accuracy (%), the fine-tunes' gain (individual minus
    zero-shot, points) and each merge's normalised accuracy (merged / individual, %)."""
    tasks = [t for t in individual if t != "Avg."]
    rows = []
    for t in [*tasks, "Avg."]:
        pick = (lambda acc: float(np.mean([acc[s] for s in tasks]))) if t == "Avg." else (lambda acc: acc[t])
        row = {"task": t, "zero-shot %": 100 * pick(zero_shot), "individual %": 100 * pick(individual)}
        row["gain (points)"] = row["individual %"] - row["zero-shot %"]
        for name, acc in merged.items():
            norm = normalized_accuracy({s: acc[s] for s in tasks}, individual)
            row[f"{name}, normalised %"] = 100 * norm[t]
        rows.append(row)
    return pd.DataFrame(rows)
