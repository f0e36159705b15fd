"""Fine-tuning loop of 001 App. C: AdamW, or Adam with a decoupled quadratic penalty toward theta_0.

The penalty variant takes, before every Adam step, theta <- theta - lr_t * lam * H_0 (theta - theta_0), the
decoupled form (like AdamW's weight decay) of the gradient of lam/2 ||theta - theta_0||^2_{H_0} (001 Eq. 8),
with H_0 = I or a diagonal curvature. Linear warmup then linear decay, gradient-norm clipping, seeded
shuffling; deterministic on CPU. The all-data (multitask) baseline is this loop on the concatenated data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modelmerge.curvature.estimate import label_targets, per_example_nll


@dataclass
class TrainConfig:
    """Hyperparameters of one fine-tuning run (defaults: 001 App. C.2 where it gives them)."""

    epochs: float = 1.0
    lr: float = 1e-5
    batch_size: int = 16
    max_length: int = 128
    optimizer: str = "adamw"  # "adamw" or "adam_penalty"
    weight_decay: float = 0.0  # AdamW's decay toward zero
    penalty: float = 0.0  # lam of the decoupled quadratic penalty toward theta_0 ("adam_penalty")
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    seed: int = 0
    group_by_length: bool = False  # batch texts of similar token counts (shuffled groups): less padding to compute


def text_batches(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    batch_size: int,
    max_length: int,
    shuffle: bool = False,
    seed: int = 0,
    task: str = "classification",
    by_length: bool = False,
    group_by_length: bool = False,
    group_batches: int = 50,
) -> list[dict[str, Tensor]]:
    """Tokenised, padded batches; causal-LM batches get ``labels`` = input ids with padding set to -100.

    ``by_length`` orders the texts by token count (stable) so that batches carry little padding: for sums over
    examples (curvature), whose value does not depend on the order. ``group_by_length`` (with ``shuffle``, for
    training) sorts each run of ``group_batches`` x ``batch_size`` shuffled texts by token count, cuts it into
    batches and shuffles the batches: every text once, random batch order, little padding.
    """
    order = list(range(len(texts)))
    if by_length and shuffle:
        raise ValueError("choose shuffle or by_length, not both")
    if group_by_length and not shuffle:
        raise ValueError("group_by_length groups a shuffled order: set shuffle=True (or use by_length)")
    lengths = None
    if by_length or group_by_length:
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    if by_length:
        order = sorted(order, key=lambda i: lengths[i])
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(texts), generator=generator).tolist()
        if group_by_length:
            group = group_batches * batch_size
            order = [i for g in range(0, len(order), group) for i in sorted(order[g : g + group], key=lambda i: lengths[i])]
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:  # shuffle the batches (the last one may be short: shuffle whole batches, not the flat order)
        chunks = [chunks[c] for c in torch.randperm(len(chunks), generator=generator).tolist()]
    batches = []
    for idx in chunks:
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == "causal_lm":
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        elif labels is not None:
            batch["labels"] = torch.tensor([int(labels[i]) for i in idx])
        batches.append(batch)
    return batches


def masked_lm_batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int, *, probability: float = 0.15,
                      seed: int = 0, by_length: bool = True) -> list[dict[str, Tensor]]:
    """Masked-LM batches: each non-special token is replaced by the mask token with ``probability`` (seeded; at least
    one per text), ``labels`` = the original token there and -100 elsewhere (BERT's objective, masks only)."""
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token: it cannot make masked-LM batches")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability}")
    generator = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    out = []
    for batch in text_batches(tokenizer, texts, None, batch_size, max_length, by_length=by_length):
        ids, attention = batch["input_ids"], batch["attention_mask"]
        candidate = (attention == 1) & ~torch.isin(ids, special)
        draw = torch.rand(ids.shape, generator=generator)
        masked = candidate & (draw < probability)
        # a text with no masked token gets its candidate with the smallest draw (texts without any candidate: none)
        first = torch.where(candidate, draw, torch.inf).argmin(-1)
        none = ~masked.any(-1) & candidate.any(-1)
        masked[none, first[none]] = True
        out.append({"input_ids": ids.masked_fill(masked, tokenizer.mask_token_id), "attention_mask": attention,
                    "labels": ids.masked_fill(~masked, -100)})
    return out


def mean_loss(model: nn.Module, batch: Mapping[str, Tensor], task: str) -> Tensor:
    """Mean over examples of the per-example NLL (a sequence's tokens summed for causal LMs)."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return per_example_nll(task, out.logits, label_targets(task, batch)).mean()


def finetune(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    config: TrainConfig,
    task: str = "classification",
    penalty_curvature: Mapping[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune ``model`` in place on texts; returns metrics (loss per step, seconds, examples, steps, config)."""

    def epoch_batches(epoch: int) -> list[dict[str, Tensor]]:
        return text_batches(tokenizer, texts, labels, config.batch_size, config.max_length, True, config.seed + epoch, task,
                            group_by_length=config.group_by_length)

    return finetune_batches(model, epoch_batches, math.ceil(len(texts) / config.batch_size), len(texts), config, task,
                            penalty_curvature, device, progress)


def finetune_batches(
    model: nn.Module,
    epoch_batches: Callable[[int], Iterable[Mapping]],
    batches_per_epoch: int,
    examples: int,
    config: TrainConfig,
    task: str = "classification",
    penalty_curvature: Mapping[str, Tensor] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """The loop of ``finetune`` over ``epoch_batches(epoch)`` (any inputs: texts, images, several tasks).

    A batch may carry ``"task"``: the name of the head the model scores it with (``EncoderClassifier.set_task``),
    which is how one run trains a multitask model.
    """
    if config.optimizer not in ("adamw", "adam_penalty"):
        raise ValueError(f"optimizer must be 'adamw' or 'adam_penalty', got {config.optimizer!r}")
    from transformers import get_linear_schedule_with_warmup

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    model.to(device).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta0 = {n: p.detach().clone() for n, p in params.items()} if config.optimizer == "adam_penalty" else {}
    h0 = {n: penalty_curvature[n].to(device) for n in params} if penalty_curvature is not None else None
    decay = config.weight_decay if config.optimizer == "adamw" else 0.0
    opt = torch.optim.AdamW(params.values(), lr=config.lr, betas=(0.9, 0.999), weight_decay=decay)
    total = max(1, round(config.epochs * batches_per_epoch))
    sched = get_linear_schedule_with_warmup(opt, min(config.warmup_steps, total // 2), total)
    losses, step, epoch = [], 0, 0
    start = time.perf_counter()
    bar = tqdm(total=total, desc="fine-tuning", disable=not progress, mininterval=2.0)
    while step < total:
        for batch in epoch_batches(epoch):
            if step >= total:
                break
            batch = dict(batch)
            head = batch.pop("task", None)
            if head is not None:
                model.set_task(head)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = mean_loss(model, batch, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params.values(), config.max_grad_norm)
            if theta0:  # decoupled quadratic penalty toward theta_0, weighted by H_0 (identity if None)
                lr_t = sched.get_last_lr()[0]
                with torch.no_grad():
                    for n, p in params.items():
                        diff = p - theta0[n]
                        p.sub_(lr_t * config.penalty * (h0[n] * diff if h0 is not None else diff))
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        epoch += 1
    bar.close()
    model.eval()
    return {
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "examples": examples,
        "steps": step,
        "device": str(device),
        "config": asdict(config),
    }
