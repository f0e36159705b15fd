"""001 Table 1: Eq. 12 reduces to averaging, task arithmetic, Fisher averaging and sparse fine-tuning."""

from __future__ import annotations

import pytest
import torch

from modelmerge import Diagonal, Identity, Scalar
from modelmerge.merge import average, fisher_average, gradient_matching, task_arithmetic, weighted_average


def assert_state_close(a, b, tol=1e-12):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


def test_arithmetic_mean_is_eq12_with_alpha_1_over_T_and_no_task_curvature(models):
    base, tasks = models
    T = len(tasks)
    merged = gradient_matching(base, tasks, [Scalar(0)] * T, Identity(), alphas=1 / T)
    expected = {k: sum(t[k] for t in tasks) / T for k in base}
    assert_state_close(merged, expected)
    assert_state_close(average(tasks), expected)


def test_task_arithmetic_is_eq12_with_no_task_curvature_for_any_H0(models, fishers):
    base, tasks = models
    alphas = [0.7, -0.4, 1.3]
    expected = {k: base[k] + sum(a * (t[k] - base[k]) for a, t in zip(alphas, tasks)) for k in base}
    assert_state_close(task_arithmetic(base, tasks, alphas), expected)
    # H_t = 0 makes Hbar^-1 (H_0 + H_t) = I whatever (positive) H_0 is: scalar or diagonal
    for h0 in (Identity(), Scalar(3.0), fishers[0]):
        assert_state_close(gradient_matching(base, tasks, [Scalar(0)] * 3, h0, alphas=alphas), expected)


def test_fisher_averaging_is_eq12_without_H0(models, fishers):
    base, tasks = models
    alphas = [0.5, 1.0, 2.0]
    expected = {
        k: sum(a * f[k] * t[k] for a, f, t in zip(alphas, fishers, tasks)) / sum(a * f[k] for a, f in zip(alphas, fishers))
        for k in base
    }
    assert_state_close(fisher_average(tasks, fishers, alphas), expected)
    assert_state_close(gradient_matching(base, tasks, fishers, Scalar(0), alphas=alphas), expected)
    # ...and it does not depend on theta_0 at all when H_0 = 0
    shifted = {k: v + 5.0 for k, v in base.items()}
    assert_state_close(gradient_matching(shifted, tasks, fishers, Scalar(0), alphas=alphas), expected, tol=1e-10)


def test_fisher_averaging_with_equal_fishers_is_weighted_average(models):
    base, tasks = models
    same = [{k: torch.full_like(v, 2.0) for k, v in base.items()}] * 3
    torch.testing.assert_close(
        fisher_average(tasks, same, [1, 2, 3])["head.weight"], weighted_average(tasks, [1, 2, 3])["head.weight"]
    )


def test_fisher_delta_is_added_not_clipped(models):
    """Where every Fisher is zero, F + delta falls back to the weighted average (not to zero)."""
    base, tasks = models
    zero = [{k: torch.zeros_like(v) for k, v in base.items()}] * 3
    merged = fisher_average(tasks, zero, [1, 1, 2], delta=1e-10)
    torch.testing.assert_close(merged["encoder.bias"], weighted_average(tasks, [1, 1, 2])["encoder.bias"])


def test_sparse_finetuning_is_eq12_with_mask_curvature(models, gen):
    """H_0 = 0, H_t = disjoint 0/1 masks, alpha = 1: theta_0 + sum_t mask_t * tau_t."""
    base, tasks = models
    owner = {k: torch.randint(-1, 3, v.shape, generator=gen) for k, v in base.items()}  # -1: no task owns it
    per_task = [{k: (o == t).double() for k, o in owner.items()} for t in range(3)]
    merged = gradient_matching(base, tasks, per_task, Scalar(0), alphas=1.0)
    expected = {k: base[k] + sum(per_task[t][k] * (tasks[t][k] - base[k]) for t in range(3)) for k in base}
    assert_state_close(merged, expected)


def test_eq12_with_diagonal_curvature_is_elementwise_formula(models, fishers, gen):
    base, tasks = models
    h0 = {k: torch.rand(v.shape, generator=gen, dtype=v.dtype) for k, v in base.items()}
    alphas = [0.3, 0.9, 1.1]
    merged = gradient_matching(base, tasks, fishers, h0, alphas=alphas, delta=0.01)
    for k in base:
        H0 = h0[k] + 0.01
        hbar = H0 + sum(a * f[k] for a, f in zip(alphas, fishers))
        num = sum(a * (H0 + f[k]) * (t[k] - base[k]) for a, f, t in zip(alphas, fishers, tasks))
        torch.testing.assert_close(merged[k], base[k] + num / hbar)


def test_eq12_is_invariant_to_scaling_all_curvatures(models, fishers):
    base, tasks = models
    a = gradient_matching(base, tasks, fishers, Identity())
    b = gradient_matching(base, tasks, [{k: 7 * v for k, v in f.items()} for f in fishers], Scalar(7.0))
    assert_state_close(a, b, tol=1e-10)


def test_diagonal_and_dense_curvature_agree(models, fishers):
    """The same H as a diagonal or as an explicit matrix gives the same merge."""
    from modelmerge import Dense

    base, tasks = models
    dense = [{k: Dense(torch.diag(v.reshape(-1))) for k, v in f.items()} for f in fishers]
    a = gradient_matching(base, tasks, fishers, Identity(), alphas=[0.5, 0.5, 1.0])
    b = gradient_matching(base, tasks, dense, Identity(), alphas=[0.5, 0.5, 1.0])
    assert_state_close(a, b, tol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_merged_in_float32_and_returned_in_their_dtype(models, dtype):
    base, tasks = models
    low = {k: v.to(dtype) for k, v in base.items()}
    low_tasks = [{k: v.to(dtype) for k, v in t.items()} for t in tasks]
    merged = task_arithmetic(low, low_tasks, 0.5)
    ref = {
        k: (low[k].float() + sum(0.5 * (t[k].float() - low[k].float()) for t in low_tasks)).to(dtype) for k in base
    }
    for k in base:
        assert merged[k].dtype == dtype
        assert torch.equal(merged[k], ref[k])


def test_a_negative_task_curvature_is_named_as_001_numbers_it(models, fishers):
    # 001 writes H_0 for the base's curvature and H_1 .. H_T for the task models': the first task model's bad
    # curvature is H_1, never H_0
    from modelmerge.statedict import MergeInputError

    base, tasks = models
    bad = [dict(f) for f in fishers]
    name = next(iter(bad[0]))
    bad[0][name] = -bad[0][name]
    with pytest.raises(MergeInputError, match=r"curvature H_1 \(model 0\): curvature has \d+ negative entries"):
        gradient_matching(base, tasks, bad, Scalar(1.0))
    bad = [dict(f) for f in fishers]
    bad[2][name] = -bad[2][name]
    with pytest.raises(MergeInputError, match=r"curvature H_3 \(model 2\)"):
        gradient_matching(base, tasks, bad, Scalar(1.0))
