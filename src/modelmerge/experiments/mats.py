"""The MaTS experiment on the eight-task suite (002 Sec. 6): merge objectives, CG solves that keep every budget,
validation choice of hyperparameters, and the initialisations every MaTS run starts from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from modelmerge.cost import Measurement, measure
from modelmerge.curvature import CurvatureSpec, Diagonal, Identity
from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors
from modelmerge.experiments.suite import split_frame_of
from modelmerge.io import LazySafetensors, save_state_dict
from modelmerge.merge import gradient_matching, mats
from modelmerge.merge.regmean import ScaledGrams
from modelmerge.solve import ConjugateGradient, total_relative_residual
from modelmerge.statedict import StateDict, scaled_update  # noqa: F401  (re-exported for the notebooks)

#: 002 Fig. 2's rows (what CG starts from) and columns (which linear system it solves)
INITIALISATIONS = ("average", "task arithmetic", "TIES", "diagonal Fisher merging", "RegMean")
OBJECTIVES = ("average", "diagonal Fisher", "RegMean", "block-diagonal Fisher (K-FAC)")
#: 002 Table 4's Fisher variants: the suite's curvature files
FISHER_VARIANTS = {"empirical, training data": "train", "empirical, validation data": "validation",
                   "sampled labels, training data": "sampled"}

State = dict[str, Tensor]
Scorer = Callable[[Mapping[str, Tensor]], float]


def load_fishers(suite_dir: str, tasks: Sequence[str], variant: str) -> list[State]:
    """F_avg = F_sum / N of every task model (``variant``: train, validation or sampled), in memory."""
    return [DiagonalFisher.load(f"{suite_dir}/curvature/{t}/fisher_{variant}.safetensors").mean() for t in tasks]


def load_factors(suite_dir: str, tasks: Sequence[str], kind: str) -> list[dict]:
    """Per task, weight name -> ``Gram`` (kind "gram") or ``KFAC`` (kind "kfac_<variant>"), in memory."""
    return [LayerFactors.load(f"{suite_dir}/curvature/{t}/{kind}.safetensors").curvature() for t in tasks]


def fisher_floor(fishers: Sequence[Mapping[str, Tensor]], relative: float) -> float:
    """delta = ``relative`` x the mean diagonal Fisher entry: added to every F_m so that parameters no task's data
    touches (embeddings of unseen tokens) are averaged rather than zeroed (Matena & Raffel's Fisher floor)."""
    total = sum(float(f[n].double().sum()) for f in fishers for n in f)
    count = sum(f[n].numel() for f in fishers for n in f)
    return relative * total / count


def floored(fishers: Sequence[Mapping[str, Tensor]], delta: float) -> list[dict[str, Diagonal]]:
    """F_m + delta I as diagonal curvatures (a view per parameter, computed when read)."""
    return [_Floored(f, delta) for f in fishers]


class _Floored(Mapping):
    def __init__(self, f: Mapping[str, Tensor], delta: float):
        self.f, self.delta = f, delta

    def __getitem__(self, name: str) -> Diagonal:
        return Diagonal(self.f[name] + self.delta)

    def __iter__(self):
        return iter(self.f)

    def __len__(self) -> int:
        return len(self.f)


@dataclass
class Objective:
    """One column of 002 Fig. 2: the C_m of every model, and what covers the parameters they do not."""

    name: str
    curvatures: list[CurvatureSpec]
    fallback: CurvatureSpec | list[CurvatureSpec] = field(default_factory=Identity)


def objective(name: str, n_models: int, fishers: Sequence[Mapping[str, Diagonal]] | None = None,
              grams: Sequence[Mapping] | None = None, kfacs: Sequence[Mapping] | None = None,
              offdiag_scale: float = 1.0) -> Objective:
    """002's objectives: averaging C_m = I; diagonal Fisher C_m = F_m + delta; RegMean C_m = I (x) G_m on linear
    weights (off-diagonals scaled by ``offdiag_scale``) and I elsewhere, as RegMean averages what has no Gram;
    block-diagonal Fisher C_m = K-FAC B_m (x) A_m on linear weights and the diagonal Fisher elsewhere."""
    if name == "average":
        return Objective(name, [Identity()] * n_models)
    if name == "diagonal Fisher":
        return Objective(name, list(fishers))
    if name == "RegMean":
        return Objective(name, [ScaledGrams(g, offdiag_scale) for g in grams], Identity())
    if name == "block-diagonal Fisher (K-FAC)":
        return Objective(name, list(kfacs), list(fishers))
    raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES}")


@dataclass
class Solve:
    """A CG solve that kept the iterates at several budgets: states[k] is the merge after k iterations."""

    states: dict[int, State]
    residual: list[float]
    cost: Measurement
    solver: ConjugateGradient | None = None


def solve_mats(base: StateDict, models: Sequence[StateDict], obj: Objective, init: StateDict,
               iterations: Sequence[int], preconditioner: str = "none", track_objective: bool = False) -> Solve:
    """MaTS from ``init`` on ``obj``, run once for max(iterations) and read at every budget in ``iterations``
    (``preconditioner="kronecker"``: preconditioned CG, beyond 002; ``track_objective``: the quadratic of every
    parameter at every iteration, for ``objective_curve``)."""
    solver = ConjugateGradient(max_iter=max(iterations), tol=0.0, keep=tuple(iterations), preconditioner=preconditioner,
                               track_objective=track_objective)
    with measure() as cost:
        final = mats(base, models, obj.curvatures, init=init, fallback=obj.fallback, solver=solver)
    states = _states(final, solver, iterations)
    solver.iterates = {}
    return Solve(states, total_relative_residual(solver), cost, solver)


def objective_curve(solver: ConjugateGradient, start_value: float) -> list[float]:
    """The merge objective sum_m 1/2 (theta_k - theta_m)^T C_m (theta_k - theta_m) after k = 0, 1, ... iterations:
    ``start_value`` (the initialisation's, ``merge_objective``) plus every parameter's change f(x_k) - f(x_0) tracked
    by the solver (``track_objective``); a parameter whose solve stopped early keeps its last value."""
    names = list(solver.objective)
    length = max((len(solver.objective[n]) for n in names), default=1)
    return [start_value + sum(solver.objective[n][min(k, len(solver.objective[n]) - 1)] for n in names)
            for k in range(length)]


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """The first k with curve[k] <= target (None if it never does)."""
    return next((k for k, v in enumerate(curve) if v <= target), None)


def solve_gradient_matching(base: StateDict, models: Sequence[StateDict], curvatures: Sequence[CurvatureSpec],
                            base_curvature: CurvatureSpec, alpha: float, iterations: Sequence[int]) -> Solve:
    """001 Eq. 12 whose Hbar has no closed form (K-FAC H_t) solved by CG from sum_t alpha tau_t, at every budget."""
    solver = ConjugateGradient(max_iter=max(iterations), tol=0.0, keep=tuple(iterations))
    with measure() as cost:
        final = gradient_matching(base, models, curvatures, base_curvature, alpha, solver=solver)
    # the solves return the update Hbar^-1 (...), so a kept iterate x_k is the merge theta_0 + x_k
    states = {k: {n: (base[n] + solver.iterates[n][k] if n in solver.iterates else final[n]) for n in final}
              for k in iterations}
    return Solve(states, total_relative_residual(solver), cost)


def _states(final: Mapping[str, Tensor], solver: ConjugateGradient, iterations: Sequence[int]) -> dict[int, State]:
    kept = solver.iterates
    return {k: {n: (kept[n][k] if n in kept else final[n]) for n in final} for k in iterations}


def relative_change(a: Mapping[str, Tensor], b: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> float:
    """||a - b|| / ||b - theta_0|| over every float parameter."""
    num = sum(float((a[n] - b[n]).double().pow(2).sum()) for n in a if a[n].is_floating_point())
    den = sum(float((b[n] - base[n]).double().pow(2).sum()) for n in b if b[n].is_floating_point())
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def choose_on_validation(states: Mapping, score: Scorer, base: Mapping[str, Tensor] | None = None,
                         same: float = 1e-6) -> tuple[object, dict]:
    """The key whose state scores highest on validation (ties: the first key, i.e. the cheapest) and every score.

    With ``base`` given, a state within relative distance ``same`` of the last scored one (a solve that has
    converged) takes its score instead of being scored again.
    """
    scores, last = {}, None
    for key, state in states.items():
        if base is not None and last is not None and relative_change(state, states[last], base) <= same:
            scores[key] = scores[last]
            continue
        scores[key] = score(state)
        last = key
    best = max(scores, key=lambda k: (scores[k], -list(scores).index(k)))
    return best, scores


def save_state(state: Mapping[str, Tensor], path: str | Path, meta: Mapping[str, str] | None = None) -> None:
    """Write a merged encoder state atomically (safetensors)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.contiguous() for k, v in state.items()}, path, metadata=dict(meta or {}))


def statistics_size(suite_dir: str, data_dir: str, tasks: Sequence[str], variant: str, evaluator,
                    max_length: int) -> tuple[list[int], list[float]]:
    """Per task, the examples N a Fisher ``variant`` was computed on (its file's metadata) and the tokens per
    example of that split (texts: mean unpadded length up to ``max_length``; images: patches + 1), so T = N x it."""
    split = "validation" if variant == "validation" else "train"
    ns, per_example = [], []
    for task in tasks:
        ns.append(int(LazySafetensors(f"{suite_dir}/curvature/{task}/fisher_{variant}.safetensors").metadata()["n"]))
        frame = split_frame_of(data_dir, task, split)
        if "text" in frame.columns:
            ids = evaluator.tokenizer(list(frame["text"]), truncation=True, max_length=max_length)["input_ids"]
            per_example.append(sum(map(len, ids)) / len(ids))
        else:
            cfg = evaluator.model.encoder.config
            per_example.append((cfg.image_size // cfg.patch_size) ** 2 + 1)
    return ns, per_example
