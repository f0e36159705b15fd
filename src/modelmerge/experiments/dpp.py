"""The DPP-selection experiment on the eight-task suite (003): which task vectors to merge, chosen by quality and
diversity, against merging everything, random subsets of the same size, and quality- or diversity-only choices.

Every merge of a subset is made and scored once (``SubsetScores`` caches it by method and subset), so one table's
subsets are reused by every other table and figure.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from modelmerge.experiments.suite import batch_correct, batches_of
from modelmerge.merge import task_arithmetic, ties
from modelmerge.select import dpp_kernel, exact_map, log_det, quality_scores, sample_dpp, similarity_matrix
from modelmerge.statedict import scaled_update

State = dict[str, Tensor]
Subset = tuple[str, ...]

#: 003's seven corruptions (Hendrycks & Dietterich) -> the nearest standard text perturbation of ``nlpaug``:
#: (its augmenter, its arguments, why it is the analogue)
PERTURBATIONS: dict[str, tuple[str, dict, str]] = {
    "motion blur": ("char.RandomCharAug", {"action": "swap"}, "neighbouring characters smeared into each other"),
    "impulse noise": ("char.RandomCharAug", {"action": "substitute"}, "isolated characters replaced at random"),
    "Gaussian noise": ("char.KeyboardAug", {}, "small local errors: keys next to the intended one"),
    "pixelate": ("char.OcrAug", {}, "lost resolution: glyphs confused as OCR confuses them (0/o, 1/l, ...)"),
    "spatter": ("char.RandomCharAug", {"action": "insert"}, "foreign marks added on top of the text"),
    "contrast": ("word.RandomWordAug", {"action": "delete"}, "weakened signal: whole words dropped"),
    "JPEG compression": ("char.RandomCharAug", {"action": "delete"}, "lossy compression: characters dropped"),
}


def _check_corruption(corruption: str) -> None:
    if corruption not in PERTURBATIONS:
        raise KeyError(f"unknown corruption {corruption!r}; choose from {list(PERTURBATIONS)}")


def perturb(texts: Sequence[str], corruption: str, seed: int) -> list[str]:
    """``texts`` under one of ``PERTURBATIONS`` (nlpaug with its default strengths), reproducibly for a seed."""
    import nlpaug.augmenter.char as nac
    import nlpaug.augmenter.word as naw
    from nlpaug.util import Randomness

    _check_corruption(corruption)
    path, kwargs, _ = PERTURBATIONS[corruption]
    module, cls = path.split(".")
    augmenter = getattr({"char": nac, "word": naw}[module], cls)(**kwargs)
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    Randomness.seed(seed)  # nlpaug draws from Python's, NumPy's (and torch's) global generators: restored after
    try:
        out = augmenter.augment(list(texts))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
    return [o if isinstance(o, str) else o[0] for o in out]


def _imagecorruptions():
    """The ``imagecorruptions`` module. Its 1.1.2 release imports ``pkg_resources`` (for its frost images), which
    setuptools >= 81 no longer ships; where it is missing, a stand-in module answers ``resource_filename`` with
    ``importlib.resources``."""
    import importlib.resources
    import importlib.util
    import sys
    import types

    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, path: str(importlib.resources.files(package).joinpath(path))
        sys.modules["pkg_resources"] = shim
    import imagecorruptions

    return imagecorruptions


def corrupt_images(images: Sequence, corruption: str, seed: int, severity: int = 3) -> list[np.ndarray]:
    """``images`` under one of 003's corruptions (Hendrycks & Dietterich's implementation in ``imagecorruptions``,
    at ``severity`` 1-5), as RGB uint8 arrays, reproducibly for a seed."""
    corrupt = _imagecorruptions().corrupt

    from modelmerge.clip import to_rgb

    _check_corruption(corruption)
    import skimage.util

    name = corruption.lower().replace(" ", "_")
    state, random_noise = np.random.get_state(), skimage.util.random_noise
    np.random.seed(seed)  # imagecorruptions draws from NumPy's global generator ...
    gen = np.random.default_rng(seed)  # ... except impulse noise, which asks scikit-image for a fresh generator
    skimage.util.random_noise = lambda *a, **k: random_noise(*a, **{**k, "rng": gen})
    try:
        return [np.asarray(corrupt(np.asarray(to_rgb(im)), corruption_name=name, severity=severity), dtype=np.uint8)
                for im in images]
    finally:
        np.random.set_state(state)
        skimage.util.random_noise = random_noise


def subsets_of_size(pool: Sequence[str], k: int, draws: int, seed: int) -> list[Subset]:
    """Every k-subset of ``pool`` when there are at most ``draws`` of them, otherwise ``draws`` distinct ones drawn
    uniformly with a seeded generator (each a tuple in pool order)."""
    total = math.comb(len(pool), k)
    if total <= draws:
        return [tuple(c) for c in itertools.combinations(pool, k)]
    rng = np.random.default_rng(seed)
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < draws:
        chosen.add(tuple(sorted(rng.choice(len(pool), size=k, replace=False).tolist())))
    return [tuple(pool[i] for i in c) for c in sorted(chosen)]


@dataclass
class Kernel:
    """003's L = diag(q) S diag(q) over a pool of task models, with the selections the experiment compares."""

    pool: list[str]
    q: Tensor
    S: Tensor

    @property
    def L(self) -> Tensor:
        return dpp_kernel(self.q, self.S)

    def _names(self, idx: Sequence[int]) -> Subset:
        return tuple(self.pool[i] for i in sorted(idx))

    @property
    def max_size(self) -> int:
        """The largest k with some det(L_Y) > 0: models whose quality is 0 (no gain) make every minor singular."""
        return int(torch.linalg.matrix_rank(self.L, hermitian=True))

    def dpp(self, k: int) -> Subset:
        """argmax_{|Y| = k} det(L_Y): quality and diversity."""
        if not 1 <= k <= self.max_size:
            raise ValueError(f"k = {k}: every {k}-subset has det(L_Y) = 0 (q has {int((self.q > 0).sum())} positive "
                             f"entries, L rank {self.max_size}); choose k in 1..{self.max_size}")
        return self._names(exact_map(self.L, k))

    def quality_only(self, k: int) -> Subset:
        """The k largest q_i (= DPP MAP when S = I)."""
        return self._names(torch.argsort(self.q, descending=True, stable=True)[:k].tolist())

    def diversity_only(self, k: int) -> Subset:
        """argmax_{|Y| = k} det(S_Y) (= DPP MAP when every q_i is equal)."""
        return self._names(exact_map(self.S, k))

    def probability(self, subset: Subset) -> float:
        """P(Y) = det(L_Y) / det(L + I) of the DPP with kernel L."""
        idx = [self.pool.index(t) for t in subset]
        L = self.L
        return math.exp(log_det(L, idx) - float(torch.logdet(L + torch.eye(len(self.pool), dtype=L.dtype))))

    def save(self, path) -> None:
        """The pool, q and S as JSON (float64 values round-trip exactly), written atomically."""
        import json

        from modelmerge.files import atomic_write_text

        atomic_write_text(path, json.dumps({"pool": self.pool, "q": self.q.double().tolist(),
                                            "S": self.S.double().tolist()}, indent=1))

    @classmethod
    def load(cls, path) -> Kernel:
        """A kernel written by ``save``."""
        import json
        from pathlib import Path

        d = json.loads(Path(path).read_text())
        q, S = torch.tensor(d["q"], dtype=torch.float64), torch.tensor(d["S"], dtype=torch.float64)
        if q.shape != (len(d["pool"]),) or S.shape != (len(d["pool"]),) * 2:
            raise ValueError(f"{path}: q {tuple(q.shape)} and S {tuple(S.shape)} do not match a pool of {len(d['pool'])}")
        return cls(list(d["pool"]), q, S)

    def samples(self, n: int, seed: int) -> Counter:
        """How often each subset came up in ``n`` exact DPP samples (seeded)."""
        gen = torch.Generator().manual_seed(seed)
        return Counter(self._names(sample_dpp(self.L, gen)) for _ in range(n))


def build_kernel(pool: Sequence[str], accuracy_finetuned: Sequence[float], accuracy_pretrained: Sequence[float],
                 representations: Tensor, quality: str = "relative gain") -> Kernel:
    """q_i = relative validation gain of model i over the pretrained encoder on task i (||q|| = 1), S_ij = mean
    cosine similarity of models i and j's representations of the same validation inputs.

    ``quality="accuracy"`` uses q_i = acc_i / ||acc|| instead (for models that do not beat the pretrained one at all,
    e.g. the smoke run's tiny random models, where 003's relative gain is zero for every model).
    """
    if quality == "relative gain":
        q = quality_scores(accuracy_finetuned, accuracy_pretrained)
    elif quality == "accuracy":
        acc = torch.as_tensor(accuracy_finetuned, dtype=torch.float64)
        q = acc / acc.norm()
    else:
        raise ValueError(f"quality must be 'relative gain' (003) or 'accuracy', got {quality!r}")
    return Kernel(list(pool), q, similarity_matrix(representations))


@torch.no_grad()
def representations(model, batches: Sequence[Mapping[str, Tensor]], bf16: bool = False) -> Tensor:
    """The pooled encoder features (the heads' input) of every input in ``batches``, in order, float32."""
    dev = next(model.encoder.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        return torch.cat([model.features(**{k: v.to(dev) for k, v in b.items() if k != "labels"}).float().cpu()
                          for b in batches])


@dataclass
class SubsetScores:
    """Merges of subsets of task models, each tuned on validation data and scored once, cached.

    ``merge(method, subset)`` is theta_0 + lam * tau(subset): task arithmetic (sum of the task vectors) or TIES
    (``ties_k``); both are linear in lam, so one merged task vector serves the whole lam grid. lam is chosen on
    ``tune`` (task -> validation batches; mean accuracy over its tasks, first best wins); the chosen merge is scored
    on the test split of ``test_tasks`` (default: every task of the evaluator, on its batches ordered by token count)
    and, when asked, on every set of ``extra`` test batches (name -> task -> batches, e.g. perturbed test data), each
    scored against the labels its batches carry. ``correct[(method, subset)]["test/<task>"]`` (and
    ``"<extra>/<task>"``) keeps each example's 0/1 correctness, in the same order for every merge, for paired
    comparisons between merges (``evaluate.paired_bootstrap``).
    """

    base: State
    models: Mapping[str, State]
    evaluator: object
    lambdas: Sequence[float]
    tune: Mapping[str, list]
    test_tasks: Sequence[str] | None = None
    ties_k: float = 0.2
    bf16: bool = True
    extra: Mapping[str, Mapping[str, list]] = field(default_factory=dict)
    rows: dict[tuple[str, Subset], dict] = field(default_factory=dict)
    correct: dict[tuple[str, Subset], dict[str, np.ndarray]] = field(default_factory=dict)
    on_merge: Callable[[str, Subset], None] | None = None

    def merged_update(self, method: str, subset: Subset) -> State:
        """theta(lam = 1) of ``method`` on ``subset``."""
        models = [self.models[t] for t in subset]
        if method == "task arithmetic":
            return dict(task_arithmetic(self.base, models, 1.0))
        if method == "TIES":
            return dict(ties(self.base, models, k=self.ties_k, lam=1.0))
        raise ValueError(f"unknown method {method!r}: 'task arithmetic' or 'TIES'")

    def __call__(self, method: str, subset: Sequence[str], extra: bool = True) -> dict:
        """The cached row of (method, subset): chosen lam, its validation score, test accuracies (and, with
        ``extra``, accuracies on every extra test set: the merge is rebuilt once for them if it was tuned only)."""
        subset = tuple(subset)
        key = (method, subset)
        row = self.rows.get(key)
        want_extra = bool(extra and self.extra) and not any(k.startswith(f"{next(iter(self.extra))}/") for k in row or {})
        if row is not None and not want_extra:
            return row
        if self.on_merge:
            self.on_merge(method, subset)
        unit = self.merged_update(method, subset)
        if row is None:
            val = {}
            for lam in self.lambdas:
                val[lam] = float(np.mean(list(self._accuracy(scaled_update(self.base, unit, lam), self.tune).values())))
            lam = max(val, key=lambda x: (val[x], -list(val).index(x)))
            row = {"method": method, "subset": subset, "size": len(subset), "lambda": lam,
                   "tuning validation Avg.": val[lam]}
            test_tasks = self.evaluator.tasks if self.test_tasks is None else self.test_tasks
            if test_tasks:
                test = {t: self.evaluator.sorted_batches("test")[t] for t in test_tasks}
                self._score(key, row, "test", scaled_update(self.base, unit, lam), test)
        if want_extra:
            self.evaluator.model.load_encoder_state(scaled_update(self.base, unit, row["lambda"]))
            for name, batches in self.extra.items():
                self._score(key, row, name, None, batches)
        self.rows[key] = row
        return row

    def _score(self, key: tuple[str, Subset], row: dict, name: str, state: State | None,
               batches: Mapping[str, list]) -> None:
        """Accuracy per task into ``row`` and per-example correctness into ``correct``, under ``name/<task>``."""
        for t, c in self._correct(state, batches).items():
            row[f"{name}/{t}"] = float(c.mean())
            self.correct.setdefault(key, {})[f"{name}/{t}"] = c

    def _correct(self, state: State | None, batches: Mapping[str, list]) -> dict[str, np.ndarray]:
        """task -> 0/1 per example: ``state``'s (None: the state loaded last) argmax against the batches' labels."""
        if state is not None:
            self.evaluator.model.load_encoder_state(state)
        return batch_correct(self.evaluator.model, batches, bf16=self.bf16)

    def _accuracy(self, state: State | None, batches: Mapping[str, list]) -> dict[str, float]:
        """task -> accuracy of ``state`` (None: the state loaded last) against the labels the batches carry."""
        return {t: float(c.mean()) for t, c in self._correct(state, batches).items()}

    def paired(self, a: tuple[str, Sequence[str]], b: tuple[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]],
               name: str, tasks: Sequence[str], seed: int = 0) -> tuple[float, float, float]:
        """Avg.(a) - Avg.(b) over ``tasks`` on the ``name`` scores ("test" or an extra set), with its paired-bootstrap
        95% interval; ``b`` may be several merges, compared through their mean correctness per example (the expected
        accuracy of a merge drawn uniformly from them)."""
        from modelmerge.evaluate import paired_bootstrap

        many = [b] if isinstance(b[0], str) else list(b)
        ca = {t: self.correct[(a[0], tuple(a[1]))][f"{name}/{t}"] for t in tasks}
        cb = {t: np.mean([self.correct[(m, tuple(s))][f"{name}/{t}"] for m, s in many], axis=0) for t in tasks}
        return paired_bootstrap(ca, cb, seed=seed)

    def frame(self) -> pd.DataFrame:
        """Every scored merge, a row each."""
        return pd.DataFrame(list(self.rows.values()))


def perturbed_batches(tokenizer, frames: Mapping[str, pd.DataFrame], corruptions: Sequence[str], seed: int,
                      max_length: int, batch_size: int = 64) -> dict[str, dict[str, list]]:
    """"clean" and each corruption -> task -> batches of that task's ``frames`` (text or image, label): texts
    perturbed by ``perturb``, images corrupted by ``corrupt_images``, with a seed per (corruption, task); labels
    unchanged."""
    out = {"clean": {t: batches_of(tokenizer, f, batch_size, max_length) for t, f in frames.items()}}
    for c_i, corruption in enumerate(corruptions):
        out[corruption] = {}
        for t_i, (task, frame) in enumerate(frames.items()):
            frame, c_seed = frame.copy(), seed + 1000 * (c_i + 1) + t_i
            if "image" in frame.columns:
                frame["image"] = corrupt_images(frame["image"].tolist(), corruption, c_seed)
            else:
                frame["text"] = perturb(frame["text"].tolist(), corruption, c_seed)
            out[corruption][task] = batches_of(tokenizer, frame, batch_size, max_length)
    return out


def mean_over(row: Mapping, prefix: str, tasks: Sequence[str]) -> float:
    """Mean of ``row[prefix/task]`` over ``tasks``."""
    return float(np.mean([row[f"{prefix}/{t}"] for t in tasks]))


def rank_among(value: float, others: Sequence[float]) -> str:
    """'r of n': 1 + how many of ``others`` score strictly higher (ties share the better rank)."""
    return f"{1 + sum(o > value for o in others)} of {len(others)}"
