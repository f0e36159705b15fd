"""Curvature estimators over a PyTorch model and batches: diagonal Fishers, RegMean Grams, K-FAC factors.

Batches are dicts of tensors in the Hugging Face convention (``input_ids``, ``attention_mask``, ...,
``labels``); every key but ``labels`` is passed to the model, which must return ``.logits`` (or a tensor).
Three tasks: ``"classification"`` (logits N x C, labels N), ``"causal_lm"`` (logits N x S x V; each sequence's
loss is the sum of its next-token losses, padding and ``labels == -100`` ignored) and ``"masked_lm"`` (logits
N x S x V; the sum of the losses of the masked tokens, ``labels`` = the original token where masked, -100 elsewhere:
``modelmerge.train.masked_lm_batches``).

Diagonal Fisher (001 Sec. 3.3, 002 Eq. 2), with F_sum = sum_n g_n^2 kept together with N so that
F_avg = F_sum / N is derived, g_n the gradient of example n's negative log-likelihood under
- ``"empirical"``: the data's labels;
- ``"sampled"``: labels drawn from the model's predictive distribution (seeded), the "true" Fisher by Monte Carlo;
- ``"exact"``: the expectation over all classes, sum_c p(c|x) (grad log p(c|x))^2 (classification heads).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modelmerge.curvature.base import KFAC, Curvature, Gram
from modelmerge.curvature.hooks import LayerHooks, linear_layers, tied_parameter_ids
from modelmerge.io import LazySafetensors, SafetensorsWriter

TASKS = ("classification", "causal_lm", "masked_lm")
FISHERS = ("empirical", "sampled", "exact")


def default_device() -> torch.device:
    """CUDA when there is a GPU, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out if isinstance(out, Tensor) else out.logits


def label_targets(task: str, batch: Mapping[str, Tensor]) -> Tensor:
    """The data's labels; for causal LMs, next tokens with padding and ignored positions set to -100; for masked
    LMs, the batch's own labels (the original tokens where masked, -100 elsewhere)."""
    if task in ("classification", "masked_lm"):
        if "labels" not in batch:
            raise KeyError(f"{task} batches need 'labels'" + (" (-100 where no token is masked)" if task == "masked_lm" else ""))
        return batch["labels"]
    labels = batch.get("labels", batch["input_ids"]).clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def log_softmax(logits: Tensor) -> Tensor:
    """log-softmax over the last axis in at least float32 (half-precision logits are upcast, float64 kept)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _token_logprobs(task: str, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax over classes, targets) aligned token by token: N x C / N, or N x (S-1) x V / N x (S-1)."""
    if task == "causal_lm":
        logits, targets = logits[:, :-1], targets[:, 1:]
    return log_softmax(logits), targets


def per_example_nll(task: str, logits: Tensor, targets: Tensor) -> Tensor:
    """Negative log-likelihood per example (summed over a sequence's tokens), shape N."""
    logp, y = _token_logprobs(task, logits, targets)
    valid = y != -100
    picked = logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    return -(picked if task == "classification" else picked.sum(-1))


def sample_targets(task: str, logits: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from the model's predictive distribution (same positions as the data's labels)."""
    logp, y = _token_logprobs(task, logits.detach(), targets)
    probs = logp.exp().reshape(-1, logp.shape[-1]).cpu().double()
    draws = torch.multinomial(probs, 1, generator=generator).reshape(y.shape).to(y.device)
    sampled = torch.where(y == -100, y, draws)
    if task == "causal_lm":  # put back in the unshifted layout that per_example_nll expects
        sampled = torch.cat([torch.full_like(targets[:, :1], -100), sampled], dim=1)
    return sampled


def _batch_size(batch: Mapping[str, Tensor]) -> int:
    """Examples in a batch: the first axis of ``input_ids``, else of the first input tensor."""
    if "input_ids" in batch:
        return batch["input_ids"].shape[0]
    return next(v for k, v in batch.items() if k != "labels" and isinstance(v, Tensor)).shape[0]


def _check(task: str, fisher: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    if fisher == "exact" and task != "classification":
        raise ValueError("the exact Fisher sums over all labels: only for classification heads")


def _batches(batches: Iterable[Mapping[str, Tensor]], device: torch.device, desc: str, progress: bool):
    total = len(batches) if hasattr(batches, "__len__") else None
    for batch in tqdm(batches, desc=desc, total=total, disable=not progress, mininterval=2.0):
        yield {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def _losses_per_pass(task, fisher, logits, batch, generator) -> list[Tensor]:
    """Per-example losses whose gradients are squared and summed; the exact Fisher needs one pass per class."""
    targets = label_targets(task, batch)
    if fisher == "empirical":
        return [per_example_nll(task, logits, targets)]
    if fisher == "sampled":
        return [per_example_nll(task, logits, sample_targets(task, logits, targets, generator))]
    logp = log_softmax(logits)
    # sum_c p_c g_c^2 = sum_c (sqrt(p_c) g_c)^2: weight each class's loss by sqrt(p_c), held constant
    return [-(logp[:, c].detach().exp().sqrt() * logp[:, c]) for c in range(logp.shape[-1])]


@dataclass
class DiagonalFisher:
    """F_sum = sum_n g_n^2 per parameter, with the number of examples N (F_avg = F_sum / N)."""

    f_sum: dict[str, Tensor]
    n: int
    meta: dict[str, str] = field(default_factory=dict)

    def sum(self) -> dict[str, Tensor]:
        """F_sum."""
        return self.f_sum

    def mean(self) -> dict[str, Tensor]:
        """F_avg = F_sum / N."""
        return {k: v / self.n for k, v in self.f_sum.items()}

    def save(self, path: str | os.PathLike) -> None:
        """safetensors with the parameter names; metadata holds the estimator, N and the data."""
        meta = {**self.meta, "kind": "diagonal_fisher_sum", "n": str(self.n)}
        with SafetensorsWriter.like(self.f_sum, path, metadata=meta) as out:
            for k, v in self.f_sum.items():
                out[k] = v

    @classmethod
    def load(cls, path: str | os.PathLike) -> DiagonalFisher:
        lazy = LazySafetensors(path)
        meta = lazy.metadata()
        if meta.get("kind") != "diagonal_fisher_sum":
            raise ValueError(f"{path} does not hold a diagonal Fisher (kind={meta.get('kind')!r})")
        return cls({k: lazy[k] for k in lazy}, int(meta["n"]), meta)


@dataclass
class LayerFactors:
    """Per linear layer: the input Gram A = sum z z^T / N and (K-FAC) B = sum o' o'^T / N, keyed by weight name."""

    kind: str  # "gram" or "kfac"
    A: dict[str, Tensor]
    B: dict[str, Tensor]
    in_axis: dict[str, int]
    n: int
    meta: dict[str, str] = field(default_factory=dict)

    def curvature(self) -> dict[str, Curvature]:
        """Weight name -> ``Gram(A)`` or ``KFAC(A, B)``; combine with ``WithFallback`` for other parameters."""
        if self.kind == "gram":
            return {k: Gram(a, self.in_axis[k]) for k, a in self.A.items()}
        return {k: KFAC(a, self.B[k], self.in_axis[k]) for k, a in self.A.items()}

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"{k}::A": v for k, v in self.A.items()} | {f"{k}::B": v for k, v in self.B.items()}
        meta = {**self.meta, "kind": self.kind, "n": str(self.n), "in_axis": json.dumps(self.in_axis, sort_keys=True)}
        with SafetensorsWriter.like(tensors, path, metadata=meta) as out:
            for k, v in tensors.items():
                out[k] = v

    @classmethod
    def load(cls, path: str | os.PathLike) -> LayerFactors:
        lazy = LazySafetensors(path)
        meta = lazy.metadata()
        if meta.get("kind") not in ("gram", "kfac"):
            raise ValueError(f"{path} does not hold Gram or K-FAC factors (kind={meta.get('kind')!r})")
        A = {k[: -len("::A")]: lazy[k] for k in lazy if k.endswith("::A")}
        B = {k[: -len("::B")]: lazy[k] for k in lazy if k.endswith("::B")}
        return cls(meta["kind"], A, B, json.loads(meta["in_axis"]), int(meta["n"]), meta)


def _expand_tied(model: nn.Module, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Give every name of a tied parameter (e.g. embeddings and LM head) the statistics of its canonical name."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: stats[canonical[id(p)]] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] in stats}


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    task: str = "classification",
    fisher: str = "empirical",
    seed: int = 0,
    device: str | torch.device | None = None,
    method: str = "hooks",
    data: str = "",
    progress: bool = True,
) -> DiagonalFisher:
    """F_sum = sum_n (grad_theta l_n)^2 over all examples, l_n the NLL of example n (see module docstring).

    ``method="hooks"`` gets every per-example gradient from one batched forward/backward through layer hooks;
    parameters of modules the hooks do not know fall back to a per-example loop (with a warning).
    ``method="loop"`` is the batch-size-1 reference (one backward per example), as in the authors' code.
    """
    _check(task, fisher)
    if method not in ("hooks", "loop"):
        raise ValueError(f"method must be 'hooks' or 'loop', got {method!r}")
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    desc = f"{fisher} Fisher ({method})"
    if method == "loop":
        f_sum, n = _fisher_loop(model, batches, task, fisher, generator, device, None, desc, progress)
    else:
        f_sum, n = {}, 0
        with LayerHooks(model, "sq_grad") as hooks:
            for batch in _batches(batches, device, desc, progress):
                hooks.begin_batch(_batch_size(batch), batch.get("attention_mask"))
                with torch.enable_grad():
                    logits = _logits(model, batch)
                    losses = _losses_per_pass(task, fisher, logits, batch, generator)
                    for i, loss in enumerate(losses):
                        loss.sum().backward(retain_graph=i < len(losses) - 1)
                        hooks.end_batch()
                n += _batch_size(batch)
            rest = list(hooks.parameters_not_covered())
            f_sum = dict(hooks.sq_grad)
        if rest:
            warnings.warn(f"per-example loop for {len(rest)} parameters the hooks do not cover: {rest[:5]} ...")
            generator = torch.Generator().manual_seed(seed)
            extra, _ = _fisher_loop(model, batches, task, fisher, generator, device, set(rest), desc + " (rest)", progress)
            f_sum.update(extra)
    return _diagonal_fisher_of(model, f_sum, n, fisher, task, seed, method, data)


def _diagonal_fisher_of(model, f_sum, n, fisher, task, seed, method, data) -> DiagonalFisher:
    """F_sum on the CPU under every name of a tied parameter, with the estimator in the metadata."""
    f_sum = {k: v.cpu() for k, v in _expand_tied(model, f_sum).items()}
    meta = {"estimator": f"diagonal {fisher} Fisher", "task": task, "seed": str(seed), "method": method, "data": data}
    return DiagonalFisher(f_sum, n, meta)


def _fisher_loop(model, batches, task, fisher, generator, device, only, desc, progress):
    """Batch-size-1 reference: one forward/backward per example, squared parameter gradients summed."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and (only is None or n in only)}
    f_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_seen = 0
    for batch in _batches(batches, device, desc, progress):
        size = _batch_size(batch)
        for i in range(size):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            logits = _logits(model, one)
            for loss in _losses_per_pass(task, fisher, logits, one, generator):
                grads = torch.autograd.grad(loss.sum(), list(params.values()), retain_graph=True, allow_unused=True)
                for (name, _), g in zip(params.items(), grads):
                    if g is not None:
                        f_sum[name] += g.float() ** 2
        n_seen += size
    return f_sum, n_seen


def layer_factors(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    kind: str = "gram",
    task: str = "classification",
    fisher: str = "empirical",
    seed: int = 0,
    device: str | torch.device | None = None,
    data: str = "",
    progress: bool = True,
) -> LayerFactors:
    """RegMean Grams (``kind="gram"``, forward only) or K-FAC factors (``"kfac"``) of every linear layer.

    Grams (RegMean, 002 Eq. 5): A = sum_{n,s} z z^T / N over the unpadded tokens s of the N examples (z the
    layer input). K-FAC ("expand" convention): A = sum_{n,s} z z^T / (number of unpadded tokens) and
    B = sum_{n,s} o' o'^T / N, o' the gradient of example n's NLL (labels as in ``fisher``) with respect to the
    layer output, so that B (x) A is on the scale of the averaged Fisher F_avg whatever the sequence length;
    for one example with one token it is exactly that example's Fisher of the layer. Linear layers whose
    weight is tied to another use (a tied LM head) get no factors.
    """
    if kind not in ("gram", "kfac"):
        raise ValueError(f"kind must be 'gram' or 'kfac', got {kind!r}")
    _check(task, fisher)
    if kind == "kfac" and fisher == "exact":
        raise ValueError("K-FAC here uses one label per example: choose fisher='empirical' or 'sampled'")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError("Gram / K-FAC factors of encoder-decoder models need per-stack padding masks")
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    n = 0
    with LayerHooks(model, kind) as hooks:
        for batch in _batches(batches, device, f"{kind} factors", progress):
            hooks.begin_batch(_batch_size(batch), batch.get("attention_mask"))
            if kind == "gram":
                with torch.no_grad():
                    _logits(model, batch)
            else:
                with torch.enable_grad():
                    logits = _logits(model, batch)
                    (loss,) = _losses_per_pass(task, fisher, logits, batch, generator)
                    loss.sum().backward()
            n += _batch_size(batch)
    meta = {"estimator": kind, "task": task, "fisher": fisher, "seed": str(seed), "data": data}
    return _layer_factors_of(model, hooks, kind, n, meta)


def _layer_factors_of(model: nn.Module, hooks: LayerHooks, kind: str, n: int, meta: dict) -> LayerFactors:
    """Normalise the hooks' sums into ``LayerFactors`` (Grams per example; K-FAC A per row, B per example)."""
    layers = linear_layers(model)
    # a layer whose weight is tied to another use (an LM head sharing the embeddings) gets no factors: they
    # would describe only one of its uses; such weights fall back to whatever covers the other parameters
    tied = tied_parameter_ids(model)
    weight = {name: f"{name}.weight" if name else "weight" for name in layers}
    keep = [k for k in hooks.A if id(layers[k][0].weight) not in tied]
    if kind == "gram":
        A = {weight[k]: (hooks.A[k] / n).cpu() for k in keep}
        B = {}
    else:  # K-FAC expand: A per input row, B per example, so B (x) A is on the scale of F_avg
        A = {weight[k]: (hooks.A[k] / hooks.tokens[k]).cpu() for k in keep}
        B = {weight[k]: (hooks.B[k] / n).cpu() for k in keep}
    in_axis = {weight[k]: layers[k][1] for k in keep}
    return LayerFactors(kind, A, B, in_axis, n, meta)


def fisher_and_kfac(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    task: str = "classification",
    fisher: str = "empirical",
    seed: int = 0,
    device: str | torch.device | None = None,
    data: str = "",
    progress: bool = True,
    kfac_every: int = 1,
) -> tuple[DiagonalFisher, LayerFactors]:
    """``diagonal_fisher`` and ``layer_factors(kind="kfac")`` of the same per-example gradients, from one
    forward/backward per batch instead of two (equal to the two calls with the same ``seed``). With
    ``kfac_every = k`` the K-FAC factors use batches 0, k, 2k, ... only (the Fisher uses every batch): over batches
    ordered by length, a length-stratified 1/k of the data for 1/k of the factors' cost."""
    _check(task, fisher)
    if fisher == "exact":
        raise ValueError("K-FAC here uses one label per example: choose fisher='empirical' or 'sampled'")
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    if kfac_every < 1:
        raise ValueError(f"kfac_every must be >= 1, got {kfac_every}")
    generator = torch.Generator().manual_seed(seed)
    n = n_kfac = 0
    # the Fisher hooks enter first: they record which parameters were trainable (parameters_not_covered) before
    # either context freezes them, and exit last, restoring them
    with LayerHooks(model, "sq_grad") as squares, LayerHooks(model, "kfac") as factors:
        for i, batch in enumerate(_batches(batches, device, f"{fisher} Fisher and K-FAC", progress)):
            factors.active = i % kfac_every == 0
            for hooks in (squares, factors):
                hooks.begin_batch(_batch_size(batch), batch.get("attention_mask"))
            with torch.enable_grad():
                logits = _logits(model, batch)
                (loss,) = _losses_per_pass(task, fisher, logits, batch, generator)
                loss.sum().backward()
            squares.end_batch()
            n += _batch_size(batch)
            n_kfac += _batch_size(batch) if factors.active else 0
        rest = list(squares.parameters_not_covered())
    if rest:
        raise NotImplementedError(f"the hooks do not cover {rest[:5]}: use diagonal_fisher and layer_factors")
    kfac_meta = {"estimator": "kfac", "task": task, "fisher": fisher, "seed": str(seed), "data": data}
    if kfac_every > 1:
        kfac_meta["subsample"] = f"batches 0, {kfac_every}, {2 * kfac_every}, ..."
    return (_diagonal_fisher_of(model, dict(squares.sq_grad), n, fisher, task, seed, "hooks", data),
            _layer_factors_of(model, factors, "kfac", n_kfac, kfac_meta))
