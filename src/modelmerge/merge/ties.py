"""TIES-merging (Yadav et al. 2023) and DARE (Yu et al. 2024): sparsified task vectors."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

from modelmerge.merge.core import merge_parameters
from modelmerge.statedict import MergeInputError, StateDict, check_alphas, check_same_keys, compute_dtype

CHUNK = 1 << 22  # entries per elementwise chunk (16 MB of float32 per task)


def _kth_largest(values: Tensor, k: float) -> float:
    """The magnitude threshold that keeps the top fraction ``k`` of ``values`` (ties at it are kept too)."""
    n = values.numel()
    keep = max(1, math.ceil(k * n))
    if keep >= n:
        return 0.0
    return float(torch.kthvalue(values, n - keep + 1).values)  # in the values' own dtype: no rounding of the threshold


def ties_thresholds(base: StateDict, models: Sequence[StateDict], k: float | Sequence[float]) -> list[float]:
    """Per task, the global magnitude threshold keeping the top-k fraction (``k``: one, or one per task) of |tau_t|
    over the whole model.

    Exact and streaming: a first pass counts magnitudes per bucket of their float32 bit pattern (monotonic in
    the value for non-negative floats; 65,536 buckets by the top 16 bits), a second pass gathers only the bucket
    that holds the threshold and takes its exact order statistic. Memory: one tensor plus one bucket.
    """
    names = [n for n in base.keys() if base[n].is_floating_point()]
    ks = fractions(k, len(models))
    out = []
    for model, k_t in zip(models, ks):

        def magnitudes():  # in the merge's compute dtype, so the threshold matches what the rule compares
            for n in names:
                cd = compute_dtype(base[n].dtype)
                yield (model[n].to(cd) - base[n].to(cd)).abs().reshape(-1).float()

        counts = torch.zeros(1 << 16, dtype=torch.int64)
        total = 0
        for a in magnitudes():
            counts += torch.bincount(a.view(torch.int32) >> 16, minlength=1 << 16)
            total += a.numel()
        keep = max(1, math.ceil(k_t * total))
        if keep >= total:
            out.append(0.0)
            continue
        above = torch.flip(counts, [0]).cumsum(0)  # above[i] = entries in buckets >= 65535 - i
        bucket = (1 << 16) - 1 - int(torch.searchsorted(above, keep))
        n_higher = int(counts[bucket + 1 :].sum())
        inside = torch.cat([a[(a.view(torch.int32) >> 16) == bucket] for a in magnitudes()])
        # the (keep - n_higher)-th largest inside the bucket is the keep-th largest overall
        out.append(float(torch.kthvalue(inside, inside.numel() - (keep - n_higher) + 1).values))
    return out


def ties_merge_tensor(taus: Tensor, thresholds: Sequence[float], weights: Sequence[float] | None = None,
                      normalize: bool = True) -> Tensor:
    """TIES on stacked task vectors (T x ...): trim, elect, disjoint mean; returns the merged task vector.

    1. trim: keep entries with |tau_t| >= threshold_t (entries tied with the threshold are all kept);
    2. elect: the sign of the summed trimmed values ("total mass", each task's scaled by its weight w_t); where
       that sum is exactly 0, the sign held by more tasks' non-zero entries; where those counts tie too, no sign
       is elected and the entry stays 0;
    3. disjoint mean: sum_t w_t tau_t / sum_t w_t over the non-zero trimmed entries whose sign agrees with the
       elected one (0 if none); without weights, their plain mean; ``normalize=False``: their sum sum_t w_t tau_t
       (mergekit's ``normalize: false``, the default of its ``dare_ties``).
    """
    shape = (-1, *([1] * (taus.ndim - 1)))
    thr = torch.tensor(thresholds, dtype=taus.dtype, device=taus.device).reshape(shape)
    trimmed = torch.where(taus.abs() >= thr, taus, torch.zeros_like(taus))
    signs = torch.sign(trimmed)
    if weights is None and normalize:
        elected = torch.sign(trimmed.sum(0))
        elected = torch.where(elected == 0, torch.sign(signs.sum(0)), elected)
        agree = (signs == elected) & (signs != 0)
        count = agree.sum(0)
        return torch.where(count > 0, (trimmed * agree).sum(0) / count.clamp_min(1), torch.zeros_like(elected))
    w = torch.tensor([1.0] * len(taus) if weights is None else weights, dtype=taus.dtype, device=taus.device).reshape(shape)
    scaled = trimmed * w
    elected = torch.sign(scaled.sum(0))
    elected = torch.where(elected == 0, torch.sign(signs.sum(0)), elected)
    agree = (signs == elected) & (signs != 0)
    if not normalize:
        return (scaled * agree).sum(0)
    mass = (w * agree).sum(0)
    return torch.where(mass > 0, (scaled * agree).sum(0) / torch.where(mass > 0, mass, 1), torch.zeros_like(elected))


def fractions(k: float | Sequence[float], n: int, name: str = "k") -> list[float]:
    """One fraction in (0, 1] per task (a single ``k`` is broadcast)."""
    ks = [float(k)] * n if isinstance(k, (int, float)) else [float(x) for x in k]
    if len(ks) != n:
        raise MergeInputError(None, f"{name} has {len(ks)} values for {n} models")
    for x in ks:
        if not 0.0 < x <= 1.0:
            raise MergeInputError(None, f"{name} (fraction kept) must be in (0, 1], got {x}")
    return ks


def ties_settings(k: float | Sequence[float], weights: Sequence[float] | None, scope: str,
                  n: int) -> tuple[list[float], list[float] | None]:
    """TIES' settings checked: a fraction in (0, 1] per task, positive weights (or none), a known scope."""
    ks = fractions(k, n)
    if weights is not None:
        weights = check_alphas(weights, n, name="weights")
        if min(weights) <= 0:
            raise MergeInputError(None, f"TIES weights must be positive, got {weights}")
    if scope not in ("model", "tensor"):
        raise MergeInputError(None, f"scope must be 'model' or 'tensor', got {scope!r}")
    return ks, weights


def ties(
    base: StateDict,
    models: Sequence[StateDict],
    k: float | Sequence[float] = 0.2,
    lam: float = 1.0,
    scope: str = "model",
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    out: MutableMapping[str, Tensor] | None = None,
) -> MutableMapping[str, Tensor]:
    """theta = theta_0 + lam * TIES(tau_1..tau_T) (see ``ties_merge_tensor``; ``normalize=False``: the agreeing
    entries summed, not averaged).

    ``k`` is the fraction of entries each task keeps (one, or one per task): over the whole model
    (``scope="model"``, TIES' default; one extra pass over the inputs finds the thresholds) or within every tensor
    (``"tensor"``, as mergekit). ``weights`` (positive, one per task) scale each task's mass in the election and
    make the disjoint mean a weighted mean (mergekit's ``weight`` with ``normalize: true``).
    """
    ks, weights = ties_settings(k, weights, scope, len(models))
    check_same_keys(base, models)
    global_thr = ties_thresholds(base, models, ks) if scope == "model" else None

    def rule(name: str, theta0: Tensor, thetas: list[Tensor]) -> Tensor:
        thr = global_thr
        if thr is None:
            thr = [_kth_largest((t - theta0).abs().reshape(-1), kt) for t, kt in zip(thetas, ks)]
        # elementwise from here on: go through large tensors in chunks to bound the temporaries
        flat0, flats = theta0.reshape(-1), [t.reshape(-1) for t in thetas]
        out = torch.empty_like(flat0)
        for s in range(0, flat0.numel(), CHUNK):
            e = min(s + CHUNK, flat0.numel())
            taus = torch.stack([f[s:e] - flat0[s:e] for f in flats])
            out[s:e] = flat0[s:e] + lam * ties_merge_tensor(taus, thr, weights, normalize)
        return out.reshape(theta0.shape)

    return merge_parameters(base, models, rule, out=out, desc="TIES")


class Dare(Mapping):
    """A task model with DARE applied: theta_0 + m * tau / (1 - p), m ~ Bernoulli(1 - p) per entry, seeded.

    Lazily computed per parameter (it plugs into any merge rule as a model, streaming included). The mask of
    a parameter depends only on (seed, index, parameter name), not on the order parameters are read in.
    """

    def __init__(self, base: StateDict, model: StateDict, p: float, seed: int = 0, index: int = 0):
        if not 0.0 <= p < 1.0:
            raise MergeInputError(None, f"DARE drop probability p must be in [0, 1), got {p}")
        self.base, self.model, self.p, self.seed, self.index = base, model, p, seed, index

    def __getitem__(self, name: str) -> Tensor:
        theta, theta0 = self.model[name], self.base[name]
        if not theta.is_floating_point() or self.p == 0.0:
            return theta
        gen = torch.Generator().manual_seed(hash_seed(self.seed, self.index, name))
        keep = torch.rand(theta.shape, generator=gen) >= self.p
        tau = theta - theta0
        return theta0 + torch.where(keep.to(theta.device), tau / (1.0 - self.p), torch.zeros_like(tau))

    def __iter__(self) -> Iterator[str]:
        return iter(self.model)

    def __len__(self) -> int:
        return len(self.model)

    def __contains__(self, name: object) -> bool:
        return name in self.model


def hash_seed(seed: int, index: int, name: str) -> int:
    """A 63-bit seed from (seed, model index, parameter name), stable across runs and platforms."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + zlib.crc32(name.encode())) % (2**63 - 1)


def dare(base: StateDict, models: Sequence[StateDict], p: float | Sequence[float], seed: int = 0) -> list[Dare]:
    """DARE versions of all task models (model t gets its own masks, and its own drop probability when ``p`` is a
    list); merge them with any rule."""
    ps = [float(p)] * len(models) if isinstance(p, (int, float)) else [float(x) for x in p]
    if len(ps) != len(models):
        raise MergeInputError(None, f"DARE p has {len(ps)} values for {len(models)} models")
    return [Dare(base, m, pt, seed, i) for i, (m, pt) in enumerate(zip(models, ps))]
