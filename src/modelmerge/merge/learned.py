"""Learned layer-wise merge weights: SuperMerge (004) and AdaMerging (Yang et al. 2023), and hierarchical merging.

Both learn one coefficient per (model i, weight tensor j) and merge as
theta(W)_j = theta_0_j + sum_i c(W_ij) tau_ij (004 Eq. 4) with
- SuperMerge: c = tanh (coefficients in (-1, 1)), supervised loss on validation data (004 Eq. 5);
- SuperMerge without tanh (004 Table 4's ablation): c = identity;
- AdaMerging: c = identity clipped to [0, 1] after every step, entropy of predictions on unlabelled data.
The merged parameters are evaluated with ``torch.func.functional_call``: no copy of the model per step.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from modelmerge.curvature.estimate import label_targets, log_softmax, per_example_nll
from modelmerge.statedict import MergeInputError, StateDict, check_same_keys, check_tensor

OBJECTIVES = ("classification", "causal_lm", "entropy")


class LayerwiseMerge(nn.Module):
    """theta(W)_j = theta_0_j + sum_i c(W_ij) tau_ij over every floating-point tensor j (004 Eq. 4)."""

    def __init__(
        self,
        base: StateDict,
        models: Sequence[StateDict],
        init: float = 0.3,
        activation: str = "tanh",
        clip: tuple[float, float] | None = None,
        tied: Mapping[str, str] | None = None,
    ):
        super().__init__()
        if activation not in ("tanh", "identity"):
            raise MergeInputError(None, f"activation must be 'tanh' or 'identity', got {activation!r}")
        if activation == "tanh" and not -1.0 < init < 1.0:
            raise MergeInputError(None, f"with tanh the initial coefficient must lie in (-1, 1), got {init}")
        check_same_keys(base, models)
        self.activation, self.clip = activation, clip
        self.tied = dict(tied or {})  # alias -> canonical name: one coefficient per shared tensor
        self.names = [n for n in base.keys() if base[n].is_floating_point() and n not in self.tied]
        self.base = {n: base[n].detach() for n in base.keys()}
        self.taus: dict[str, Tensor] = {}
        for n in self.names:
            check_tensor(n, self.base[n], label="base model")
            for i, m in enumerate(models):
                check_tensor(n, m[n], like=self.base[n], label=f"model {i}")
            self.taus[n] = torch.stack([m[n].detach() - self.base[n] for m in models])
        w0 = math.atanh(init) if activation == "tanh" else init
        self.W = nn.Parameter(torch.full((len(models), len(self.names)), w0, dtype=torch.float64))

    def coefficients(self) -> Tensor:
        """c(W), shape (models, tensors)."""
        return torch.tanh(self.W) if self.activation == "tanh" else self.W

    def merged(self) -> dict[str, Tensor]:
        """The merged state dict (differentiable in W); non-float tensors come from the base."""
        c = self.coefficients()
        out = dict(self.base)
        for j, n in enumerate(self.names):
            tau = self.taus[n]
            out[n] = self.base[n] + torch.tensordot(c[:, j].to(tau.dtype), tau, dims=1)
        for alias, canonical in self.tied.items():
            if alias in out:
                out[alias] = out[canonical]
        return out

    def to_device(self, device: torch.device) -> LayerwiseMerge:
        """Move W, the base and the task vectors (plain tensors, not module buffers) to ``device``."""
        self.to(device)
        self.base = {k: v.to(device) for k, v in self.base.items()}
        self.taus = {k: v.to(device) for k, v in self.taus.items()}
        return self

    def project(self) -> None:
        """Keep W in its box after an optimiser step (AdaMerging clips to [0, 1])."""
        if self.clip is not None:
            with torch.no_grad():
                self.W.clamp_(*self.clip)


def merge_objective(objective: str, logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean loss over examples: cross-entropy, per-sequence summed token NLL, or prediction entropy."""
    if objective == "entropy":  # AdaMerging: no labels needed
        logp = log_softmax(logits)
        return -(logp.exp() * logp).sum(-1).mean()
    return per_example_nll(objective, logits, label_targets(objective, batch)).mean()


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Second names of tied parameters -> their canonical (first) name, e.g. lm_head.weight -> embeddings."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


def move_to(value, device: torch.device):
    """A tensor moved to ``device``; anything else (a batch's task name, say) as it is."""
    return value.to(device) if isinstance(value, Tensor) else value


def forward_merged(model: nn.Module, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
    """Logits of ``model`` with its parameters replaced by ``params`` (torch.func.functional_call)."""
    aliases = tied_aliases(model)
    params = {k: v for k, v in params.items() if k not in aliases}  # functional_call ties them back
    device = next(model.parameters()).device
    kwargs = {k: move_to(v, device) for k, v in batch.items() if k != "labels"}
    out = functional_call(model, params, args=(), kwargs=kwargs)
    return out if isinstance(out, Tensor) else out.logits


@dataclass
class LearnedMerge:
    """The result of learning merge weights: merged state dict, coefficients c(W) and the loss per step."""

    state: dict[str, Tensor]
    coefficients: Tensor
    losses: list[float]


def learn_merge_weights(
    merger: LayerwiseMerge,
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    objective: str = "classification",
    epochs: int = 1,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int], None] | None = None,
) -> LearnedMerge:
    """Minimise the mean ``objective`` over ``batches`` with Adam on W only (004 Eq. 5); batches are shuffled
    per epoch with ``seed``. The model's own parameters are never touched (and never copied).

    ``on_epoch(e)`` is called before epoch e and once more, with e = ``epochs``, after the last one (to time or
    count a single epoch, say)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    model.eval()
    merger.to_device(next(model.parameters()).device)
    opt = torch.optim.Adam([merger.W], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    steps = tqdm(total=epochs * len(batches), desc="learning merge weights", disable=not progress, mininterval=2.0)
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        for b in torch.randperm(len(batches), generator=gen).tolist():
            batch = {k: move_to(v, merger.W.device) for k, v in batches[b].items()}
            loss = merge_objective(objective, forward_merged(model, merger.merged(), batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            merger.project()
            losses.append(float(loss.detach()))
            steps.update()
    steps.close()
    if on_epoch is not None:
        on_epoch(epochs)
    with torch.no_grad():
        state = {k: v.detach().cpu().clone() for k, v in merger.merged().items()}
    return LearnedMerge(state, merger.coefficients().detach().cpu().clone(), losses)


def supermerge(
    base: StateDict,
    models: Sequence[StateDict],
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    objective: str = "classification",
    init: float = 0.3,
    use_tanh: bool = True,
    epochs: int = 1,
    lr: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int], None] | None = None,
) -> LearnedMerge:
    """SuperMerge (004): c = tanh(W) learned on labelled validation data; ``use_tanh=False`` is the ablation."""
    merger = LayerwiseMerge(base, models, init=init, activation="tanh" if use_tanh else "identity", tied=tied_aliases(model))
    return learn_merge_weights(merger, model, batches, objective, epochs, lr, seed, progress, on_epoch)


def adamerging(
    base: StateDict,
    models: Sequence[StateDict],
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    init: float = 0.3,
    epochs: int = 1,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    on_epoch: Callable[[int], None] | None = None,
) -> LearnedMerge:
    """AdaMerging (layer-wise): coefficients in [0, 1] that minimise prediction entropy on unlabelled inputs."""
    merger = LayerwiseMerge(base, models, init=init, activation="identity", clip=(0.0, 1.0), tied=tied_aliases(model))
    return learn_merge_weights(merger, model, batches, "entropy", epochs, lr, seed, progress, on_epoch)


def task_vector_similarity(base: StateDict, models: Sequence[StateDict], low_memory: bool = False) -> Tensor:
    """Cosine similarity of the flattened task vectors, accumulated parameter by parameter (k x k).

    ``low_memory``: hold two task-vector tensors at a time (each pair's dot product in float64 chunks) instead of
    all k, reading every model's tensor up to k times: for lazily read models whose count, not size, is the problem.
    """
    k = len(models)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for n in base.keys():
        if not base[n].is_floating_point():
            continue
        if not low_memory:
            taus = torch.stack([(m[n] - base[n]).reshape(-1).double() for m in models])
            gram += taus @ taus.T
            continue
        theta0 = base[n]
        for a in range(k):
            tau_a = (models[a][n] - theta0).reshape(-1)
            for b in range(a + 1):
                tau_b = tau_a if b == a else (models[b][n] - theta0).reshape(-1)
                dot = sum(float(tau_a[i:i + CHUNK].double() @ tau_b[i:i + CHUNK].double())
                          for i in range(0, tau_a.numel(), CHUNK))
                gram[a, b] += dot
                gram[b, a] = gram[a, b]
    norms = gram.diagonal().clamp_min(1e-300).sqrt()
    return gram / norms[:, None] / norms[None, :]


CHUNK = 1 << 20  # entries per float64 chunk of a low-memory dot product


def similarity_groups(similarity: Tensor, fan_in: int) -> list[list[int]]:
    """Groups of at most ``fan_in`` models: each group starts from the lowest unassigned index and grows by the
    unassigned model with the highest mean similarity to the group (deterministic)."""
    if fan_in < 2:
        raise ValueError(f"fan_in must be >= 2, got {fan_in}")
    rest = list(range(similarity.shape[0]))
    groups = []
    while rest:
        group = [rest.pop(0)]
        while rest and len(group) < fan_in:
            best = max(rest, key=lambda j: float(similarity[j, group].mean()))
            group.append(best)
            rest.remove(best)
        groups.append(sorted(group))
    return groups


class Chained(Sequence):
    """Several batch sequences as one, nothing read until indexed."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)
        self.starts = [0, *itertools.accumulate(len(p) for p in self.parts)]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.starts, i) - 1
        return self.parts[part][i - self.starts[part]]

    def __len__(self) -> int:
        return self.starts[-1]


MergeGroup = Callable[[StateDict, Sequence[StateDict], Sequence[Mapping[str, Tensor]]], StateDict]
Store = Callable[[StateDict, int, int], StateDict]


def hierarchical_merge(
    base: StateDict,
    models: Sequence[StateDict],
    batches: Sequence[Sequence[Mapping[str, Tensor]]],
    merge_group: MergeGroup,
    fan_in: int = 2,
    store: Store | None = None,
) -> tuple[StateDict, list[list[list[int]]]]:
    """Merge bottom-up over a tree of similar-task groups (004 Sec. 5, Fig. 4).

    At each level the current models are grouped by task-vector similarity into groups of at most ``fan_in``;
    each group is merged by ``merge_group(base, group_models, group_batches)`` using only the validation
    batches of its own tasks, and the merged models form the next level. No call ever sees more than
    ``fan_in`` models, which bounds peak memory. Returns the final model and the groups of every level.

    ``store(state, level, group)`` decides where each intermediate model lives until the next level reads it:
    by default in memory; to bound memory as 004 does, write it to disk and return a lazy view of the file
    (``modelmerge.io.LazySafetensors``), and pass the task models as lazy files too; with a ``store`` the grouping
    similarities are also computed two task vectors at a time.
    """
    if len(batches) != len(models):
        raise MergeInputError(None, f"got {len(batches)} batch lists for {len(models)} models")
    current, data, tree = list(models), list(batches), []
    while len(current) > 1:
        groups = similarity_groups(task_vector_similarity(base, current, low_memory=store is not None), fan_in)
        tree.append(groups)
        merged, merged_data = [], []
        for index, g in enumerate(groups):
            group_data = Chained([data[i] for i in g])  # read batch by batch, never all at once
            if len(g) == 1:
                merged.append(current[g[0]])
            else:
                state = merge_group(base, [current[i] for i in g], group_data)
                merged.append(state if store is None else store(state, len(tree) - 1, index))
                del state
            merged_data.append(group_data)
        current, data = merged, merged_data
    return current[0], tree
