"""Determinantal point process selection of task vectors (003): quality times diversity.

The kernel is L = diag(q) S diag(q) (003, "Kernel Construction"): q_i the relative validation-accuracy gain of
fine-tuned model i over the pre-trained model, normalised to ||q|| = 1, and S_ij the average cosine similarity
of the representations that models i and j give to the same validation inputs. P(Y) = det(L_Y) / det(L + I).
The selected subset is then merged by any merge rule.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

F64 = torch.float64


def quality_scores(
    accuracy_finetuned: Sequence[float], accuracy_pretrained: float | Sequence[float], clip_negative: bool = True
) -> Tensor:
    """q_i = (acc_i - acc_pt) / acc_pt, normalised to unit norm.

    With ||q|| = 1 every det(L_Y) <= 1, so the unconstrained MAP is the empty set: select a size k (or sample).
    det(L_Y) depends on q only through q_i^2, so a model that is worse than the pre-trained one would count
    as "high quality" by its loss; with ``clip_negative`` (default) such gains become 0 and the model is never
    selected. ``accuracy_pretrained`` may be one number or one per model (each on model i's validation set).
    """
    acc = torch.as_tensor(accuracy_finetuned, dtype=F64)
    pt = torch.as_tensor(accuracy_pretrained, dtype=F64).expand_as(acc)
    if bool((pt <= 0).any()):
        raise ValueError("pre-trained accuracy must be positive to define a relative gain")
    q = (acc - pt) / pt
    if clip_negative:
        q = q.clamp_min(0.0)
    norm = q.norm()
    if float(norm) == 0.0:
        raise ValueError("no fine-tuned model improves on the pre-trained one: every quality is zero")
    return q / norm


def similarity_matrix(representations: Tensor) -> Tensor:
    """S_ij = mean_x cos(r_i(x), r_j(x)) for representations of shape (models, inputs, features); PSD."""
    if representations.ndim != 3:
        raise ValueError(f"representations must be (models, inputs, features), got {tuple(representations.shape)}")
    r = torch.nn.functional.normalize(representations.to(F64), dim=-1)
    return torch.einsum("inf,jnf->ij", r, r) / r.shape[1]


def dpp_kernel(q: Tensor, S: Tensor) -> Tensor:
    """L = diag(q) S diag(q)."""
    q = q.to(F64)
    return q[:, None] * S.to(F64) * q[None, :]


def log_det(L: Tensor, subset: Sequence[int]) -> float:
    """log det(L_Y) (-inf for a singular principal minor; 0 for the empty set)."""
    if not subset:
        return 0.0
    sign, value = torch.linalg.slogdet(L[list(subset)][:, list(subset)])
    return float(value) if float(sign) > 0 else float("-inf")


def _warn_if_empty(chosen: list[int], k: int | None) -> list[int]:
    if not chosen and k is None:
        warnings.warn(
            "the unconstrained DPP MAP is the empty set: no subset has det(L_Y) > 1 (with ||q|| = 1, as in 003, "
            "every det(L_Y) <= 1); pass the subset size k or sample with sample_dpp",
            stacklevel=3,
        )
    return chosen


def greedy_map(L: Tensor, k: int | None = None, eps: float = 1e-12) -> list[int]:
    """Greedy MAP (fast incremental-Cholesky version, Chen et al. 2018).

    Each step adds the item with the largest det(L_{Y+i}) = det(L_Y) d_i^2. Unconstrained (``k=None``) it
    stops when no item increases the determinant (d_i^2 <= 1); with ``k`` it adds exactly k items (stopping
    early only when every remaining item would make L_Y singular).
    """
    L = L.to(F64)
    n = L.shape[0]
    if k is not None and not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    d2 = L.diagonal().clone()
    c = torch.zeros(n, 0, dtype=F64)
    chosen: list[int] = []
    while len(chosen) < (n if k is None else k):
        gains = d2.clone()
        gains[chosen] = -float("inf")
        j = int(torch.argmax(gains))
        if gains[j] <= eps or (k is None and gains[j] <= 1.0):
            break
        chosen.append(j)
        e = (L[j] - c @ c[j]) / gains[j].sqrt()
        c = torch.cat([c, e[:, None]], dim=1)
        d2 = d2 - e**2
    return _warn_if_empty(chosen, k)


def exact_map(L: Tensor, k: int | None = None) -> list[int]:
    """argmax_Y det(L_Y) by enumeration (|Y| = k if given): exact, for up to ~16 models."""
    n = L.shape[0]
    if n > 20:
        raise ValueError(f"enumeration over 2^{n} subsets is too many; use greedy_map")
    sizes = range(n + 1) if k is None else [k]
    best, best_val = [], 0.0 if k is None else -float("inf")
    for size in sizes:
        for subset in itertools.combinations(range(n), size):
            val = log_det(L, subset)
            if val > best_val:
                best, best_val = list(subset), val
    return _warn_if_empty(best, k)


def sample_dpp(L: Tensor, generator: torch.Generator) -> list[int]:
    """An exact sample Y ~ det(L_Y) / det(L + I) (spectral algorithm, Kulesza & Taskar 2012, Alg. 1)."""
    lam, V = torch.linalg.eigh(L.to(F64))
    lam = lam.clamp_min(0.0)
    keep = torch.rand(lam.shape[0], generator=generator, dtype=F64) < lam / (lam + 1.0)
    V = V[:, keep]
    chosen: list[int] = []
    while V.shape[1] > 0:
        probs = (V**2).sum(1) / V.shape[1]
        i = int(torch.multinomial(probs.clamp_min(0), 1, generator=generator))
        chosen.append(i)
        j = int(torch.argmax(V[i].abs()))
        vj = V[:, j]
        V = V - torch.outer(vj / vj[i], V[i])  # zero row i: the remaining basis excludes item i
        V = torch.cat([V[:, :j], V[:, j + 1 :]], dim=1)
        if V.shape[1] > 0:
            V, _ = torch.linalg.qr(V)
    return sorted(chosen)
