"""TIES on hand-computed tensors; DARE's special cases and unbiasedness."""

from __future__ import annotations

import math

import pytest
import torch

from modelmerge.merge import dare, task_arithmetic, ties
from modelmerge.merge.ties import ties_merge_tensor

F64 = torch.float64


def test_ties_hand_computed_trim_elect_disjoint_mean():
    taus = torch.tensor(
        [
            [3.0, -1.0, 0.5, 0.0, 2.0, 1.0],
            [-1.0, -2.0, 0.4, 0.0, -2.0, -1.0],
            [1.0, 4.0, 0.3, 0.0, 2.0, 0.0],
        ],
        dtype=F64,
    )
    merged = ties_merge_tensor(taus, thresholds=[1.0, 1.0, 1.0])
    # col 0: trimmed (3, -1, 1): mass +3 -> mean of {3, 1} = 2
    # col 1: trimmed (-1, -2, 4): mass +1 -> only 4 agrees = 4
    # col 2: all below the threshold -> 0
    # col 3: an all-zero coordinate -> 0
    # col 4: (2, -2, 2): mass +2 -> mean of {2, 2} = 2
    # col 5: (1, -1, 0): mass 0 and one task each way: no elected sign -> 0
    torch.testing.assert_close(merged, torch.tensor([2.0, 4.0, 0.0, 0.0, 2.0, 0.0], dtype=F64))


def test_ties_zero_mass_resolves_to_the_majority_sign():
    taus = torch.tensor([[2.0], [-1.0], [-1.0]], dtype=F64)  # mass 0, two negative entries against one
    torch.testing.assert_close(ties_merge_tensor(taus, [0.5, 0.5, 0.5]), torch.tensor([-1.0], dtype=F64))


def test_ties_keeps_entries_tied_at_the_threshold_and_scales_by_lambda():
    base = {"w": torch.zeros(4, dtype=F64)}
    model = {"w": torch.tensor([3.0, -2.0, 2.0, 1.0], dtype=F64)}
    # top 50% = 2 entries, but |-2| and |2| tie at the threshold: both are kept
    merged = ties(base, [model], k=0.5, lam=0.5, scope="tensor")["w"]
    torch.testing.assert_close(merged, torch.tensor([1.5, -1.0, 1.0, 0.0], dtype=F64))


def test_ties_global_trim_uses_one_threshold_over_the_whole_model():
    base = {"a": torch.zeros(2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    model = {"a": torch.tensor([10.0, 9.0], dtype=F64), "b": torch.tensor([1.0, 2.0], dtype=F64)}
    glob = ties(base, [model], k=0.5, scope="model")
    per_tensor = ties(base, [model], k=0.5, scope="tensor")
    torch.testing.assert_close(glob["b"], torch.zeros(2, dtype=F64))  # the small tensor loses everything
    torch.testing.assert_close(per_tensor["b"], torch.tensor([0.0, 2.0], dtype=F64))


def test_ties_with_k_1_and_agreeing_signs_is_the_mean_task_vector(models):
    base, tasks = models
    same_sign = [{k: base[k] + (t[k] - base[k]).abs() for k in base} for t in tasks]
    merged = ties(base, same_sign, k=1.0, lam=1.0)
    expected = task_arithmetic(base, same_sign, 1 / 3)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k])


def test_dare_with_p0_is_task_arithmetic_exactly(models):
    base, tasks = models
    a = task_arithmetic(base, dare(base, tasks, p=0.0, seed=1), [0.3, 0.6, 0.9])
    b = task_arithmetic(base, tasks, [0.3, 0.6, 0.9])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dare_is_seeded_sparse_rescaled_and_unbiased(models):
    base, tasks = models
    one = dare(base, tasks, p=0.7, seed=3)[0]
    again = dare(base, tasks, p=0.7, seed=3)[0]
    assert torch.equal(one["encoder.weight"], again["encoder.weight"])
    tau, dropped = tasks[0]["encoder.weight"] - base["encoder.weight"], one["encoder.weight"] - base["encoder.weight"]
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], tau[kept] / 0.3)
    # the mean over seeds approaches task arithmetic (error ~ 1/sqrt(seeds))
    ta = task_arithmetic(base, tasks, 0.5)
    runs = [task_arithmetic(base, dare(base, tasks, p=0.5, seed=s), 0.5) for s in range(2000)]
    for k in base:
        mean = torch.stack([r[k] for r in runs]).mean(0)
        torch.testing.assert_close(mean, ta[k], atol=0.05, rtol=0)
        assert float((runs[0][k] - ta[k]).abs().max()) > 0.05  # a single run is far from it


def test_dare_composes_with_ties(models):
    """TIES reads DARE models like any others: p = 0 changes nothing, and a DARE'd model trims the rescaled
    survivors (computed here by hand from the masks)."""
    base, tasks = models
    plain = ties(base, tasks, k=0.3)
    same = ties(base, dare(base, tasks, p=0.0), k=0.3)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    dared = dare(base, tasks, p=0.5, seed=0)
    by_hand = [{k: d[k].clone() for k in base} for d in dared]
    a, b = ties(base, dared, k=0.3), ties(base, by_hand, k=0.3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="drop probability"):
        dare(base, tasks, p=1.0)


@pytest.mark.parametrize("k", [0.001, 0.05, 0.2, 0.5, 0.999, 1.0])
def test_streaming_global_threshold_equals_sorting_everything(k):
    from modelmerge.merge.ties import _kth_largest, ties_thresholds

    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen) for n, s in (("a", (50, 40)), ("b", (300,)), ("c", (7, 7, 7)))}
    models = [{n: v + torch.randn(v.shape, generator=gen) * 10.0 ** float(torch.randint(-3, 3, ())) for n, v in base.items()}
              for _ in range(3)]
    models.append({n: v.clone() for n, v in base.items()})  # an all-zero task vector
    models[0]["b"][:100] = base["b"][:100] + 0.5  # many exact ties
    expected = [_kth_largest(torch.cat([(m[n] - base[n]).abs().reshape(-1) for n in base]), k) for m in models]
    assert ties_thresholds(base, models, k) == expected


def test_weighted_ties_by_hand_elects_by_weighted_mass_and_takes_the_weighted_mean():
    taus = torch.tensor([[3.0, -1.0, 2.0], [-1.0, 2.0, 2.0], [1.0, 4.0, -3.0]], dtype=F64)
    merged = ties_merge_tensor(taus, thresholds=[1.0, 1.0, 1.0], weights=[1.0, 4.0, 0.5])
    # col 0: weighted mass 3 - 4 + 0.5 = -0.5 -> negative: only task 1 agrees -> -1
    # col 1: mass -1 + 8 + 2 = 9 -> positive: tasks 1, 2 -> (4 * 2 + 0.5 * 4) / 4.5
    # col 2: mass 2 + 8 - 1.5 = 8.5 -> positive: tasks 0, 1 -> (1 * 2 + 4 * 2) / 5 = 2
    torch.testing.assert_close(merged, torch.tensor([-1.0, 10.0 / 4.5, 2.0], dtype=F64))
    # equal weights are the unweighted TIES
    gen = torch.Generator().manual_seed(0)
    many = torch.randn(4, 50, generator=gen, dtype=F64)
    torch.testing.assert_close(ties_merge_tensor(many, [0.5] * 4, weights=[2.5] * 4), ties_merge_tensor(many, [0.5] * 4))


def test_per_task_fractions_and_drop_probabilities_are_each_tasks_own(models):
    from modelmerge.merge.ties import Dare, ties_thresholds

    base, tasks = models
    assert ties_thresholds(base, tasks[:2], [0.1, 0.6]) == [ties_thresholds(base, [tasks[0]], 0.1)[0],
                                                            ties_thresholds(base, [tasks[1]], 0.6)[0]]
    mixed = ties(base, tasks[:2], k=[0.1, 0.6], scope="tensor")
    for name in base:  # by hand: each task trimmed at its own per-tensor fraction, then the plain TIES
        taus = torch.stack([t[name] - base[name] for t in tasks[:2]])
        n = taus[0].numel()
        keep = [max(1, math.ceil(k * n)) for k in (0.1, 0.6)]
        thr = [0.0 if kp >= n else float(torch.kthvalue(taus[i].abs().flatten(), n - kp + 1).values)
               for i, kp in enumerate(keep)]
        torch.testing.assert_close(mixed[name], base[name] + ties_merge_tensor(taus, thr))
    wrapped = dare(base, tasks[:2], [0.2, 0.7], seed=5)
    for i, (p, t) in enumerate(zip([0.2, 0.7], tasks[:2])):
        direct = Dare(base, t, p, 5, i)
        assert all(torch.equal(wrapped[i][name], direct[name]) for name in base)
    with pytest.raises(Exception, match="3 values for 2 models"):
        dare(base, tasks[:2], [0.1, 0.2, 0.3])
    with pytest.raises(Exception, match="positive"):
        ties(base, tasks[:2], weights=[1.0, 0.0])


def test_ties_without_normalising_sums_the_agreeing_weighted_entries():
    taus = torch.tensor([[3.0, -1.0, 2.0], [-1.0, 2.0, 2.0], [1.0, 4.0, -3.0]], dtype=F64)
    merged = ties_merge_tensor(taus, thresholds=[1.0, 1.0, 1.0], weights=[1.0, 4.0, 0.5], normalize=False)
    torch.testing.assert_close(merged, torch.tensor([-4.0, 10.0, 10.0], dtype=F64))  # see the weighted test above
