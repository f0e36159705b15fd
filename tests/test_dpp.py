"""DPP selection (003): kernel, greedy MAP against a brute-force reference, exact sampling frequencies."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from modelmerge.select import dpp_kernel, exact_map, greedy_map, log_det, quality_scores, sample_dpp, similarity_matrix

F64 = torch.float64


def random_kernel(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    reps = torch.randn(n, 30, 4, generator=gen, dtype=F64) + torch.randn(n, 1, 4, generator=gen, dtype=F64)
    q = torch.rand(n, generator=gen, dtype=F64) * scale + 0.1
    return dpp_kernel(q, similarity_matrix(reps))


def greedy_reference(L, k=None):
    """Slow greedy: explicit determinants of every candidate subset at every step."""
    chosen = []
    while len(chosen) < (L.shape[0] if k is None else k):
        current = torch.linalg.det(L[chosen][:, chosen]) if chosen else torch.tensor(1.0, dtype=F64)
        rest = [i for i in range(L.shape[0]) if i not in chosen]
        dets = {i: float(torch.linalg.det(L[chosen + [i]][:, chosen + [i]])) for i in rest}
        best = max(dets, key=dets.get)
        if dets[best] <= 1e-12 * max(1.0, float(current)) or (k is None and dets[best] <= float(current)):
            break
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", range(5))
def test_greedy_map_equals_brute_force_greedy(n, seed):
    for scale in (1.0, 10.0):  # small kernels stop early (det shrinks), large ones take many items
        L = random_kernel(n, seed, scale)
        assert greedy_map(L) == greedy_reference(L)
        for k in range(n + 1):
            assert greedy_map(L, k) == greedy_reference(L, k)


def test_exact_map_is_the_best_subset_and_greedy_gets_its_first_pick():
    L = random_kernel(6, 11, 10.0)
    best = exact_map(L)
    every = {s: log_det(L, s) for r in range(7) for s in itertools.combinations(range(6), r)}
    assert log_det(L, best) == max(every.values())
    assert greedy_map(L, 1) == [int(torch.argmax(L.diagonal()))]


def test_sampling_frequencies_match_determinants():
    L = random_kernel(5, 3, 3.0)
    gen = torch.Generator().manual_seed(0)
    n_samples = 20000
    counts = Counter(tuple(sample_dpp(L, gen)) for _ in range(n_samples))
    subsets = [s for r in range(6) for s in itertools.combinations(range(5), r)]
    z = float(torch.linalg.det(L + torch.eye(5, dtype=F64)))
    probs = torch.tensor([max(float(torch.linalg.det(L[list(s)][:, list(s)])) if s else 1.0, 0.0) / z for s in subsets], dtype=torch.float64)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    observed = torch.tensor([counts.get(s, 0) for s in subsets], dtype=F64)
    expected = probs * n_samples
    big = expected >= 5  # pool the rare subsets into one bin
    obs, exp = observed[big], expected[big]
    if bool((~big).any()):
        obs = torch.cat([obs, observed[~big].sum(0, keepdim=True)])
        exp = torch.cat([exp, expected[~big].sum(0, keepdim=True)])
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    # and the test has power: the frequencies of independent inclusion (a Bernoulli process) are rejected
    diag = torch.tensor([float(L[i, i] / (1 + L[i, i])) for i in range(5)], dtype=F64)
    indep = torch.tensor([float(torch.prod(torch.where(torch.isin(torch.arange(5), torch.tensor(s, dtype=torch.long)), diag, 1 - diag))) for s in subsets], dtype=F64)
    assert chisquare(observed.numpy(), (indep / indep.sum() * n_samples).numpy()).pvalue < 1e-6


def test_quality_and_similarity_follow_their_definitions():
    q = quality_scores([0.8, 0.6, 0.4], 0.5)  # gains 0.6, 0.2, -0.2 -> clipped to 0
    torch.testing.assert_close(q, torch.tensor([0.6, 0.2, 0.0], dtype=F64) / (0.4**0.5))
    assert float(q.norm()) == pytest.approx(1.0)
    same = torch.randn(1, 7, 3, dtype=F64)
    reps = torch.cat([same, 2 * same, -same])
    S = similarity_matrix(reps)
    torch.testing.assert_close(S, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=F64))
    L = dpp_kernel(torch.tensor([1.0, 2.0, 3.0], dtype=F64), S)
    assert float(L[1, 2]) == pytest.approx(-6.0)
    assert log_det(L, [0, 1]) == float("-inf")  # identical directions: never selected together
