"""Exact identities of 001 on linear regression: Eq. 12 equals the joint target, Eq. 13 is Cook's formula."""

from __future__ import annotations

import pytest
import torch

from modelmerge import Dense, Identity, Scalar, gradient_matching, task_arithmetic, task_removal
from modelmerge import linear as lm


def spd(d: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def regression_task(n: int, d: int, gen: torch.Generator, shift: float = 0.0) -> lm.Task:
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, generator=gen, dtype=torch.float64) + shift
    y = X @ w + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return lm.Task(X, y)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed,d,T", [(0, 5, 2), (1, 12, 3), (2, 30, 5), (3, 8, 4)])
def test_eq12_equals_joint_target_for_linear_regression(seed, d, T):
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(d, generator=gen, dtype=torch.float64)
    H0 = spd(d, gen)
    tasks = [regression_task(int(torch.randint(3, 40, (1,), generator=gen)), d, gen, shift=t) for t in range(T)]
    alphas = (torch.rand(T, generator=gen, dtype=torch.float64) * 1.5 + 0.2).tolist()
    thetas = [lm.fit([t], H0, theta0) for t in tasks]  # Eq. 8: fine-tune each task from theta_0
    target = lm.fit(tasks, H0, theta0, alphas)  # Eq. 9: joint fine-tuning

    merged = gradient_matching(
        {"w": theta0},
        [{"w": th} for th in thetas],
        [{"w": Dense(lm.hessian(t, th))} for t, th in zip(tasks, thetas)],
        {"w": Dense(H0)},
        alphas=alphas,
    )["w"]
    assert rel_err(merged, target) < 1e-8
    # task arithmetic does not reach the target: its error is the gradient mismatch of Eq. 10
    ta = task_arithmetic({"w": theta0}, [{"w": th} for th in thetas], alphas)["w"]
    assert rel_err(ta, target) > 1e-3
    mismatch = sum(a * (lm.gradient(t, target) - lm.gradient(t, th)) for a, t, th in zip(alphas, tasks, thetas))
    torch.testing.assert_close(target, ta - torch.linalg.solve(H0, mismatch), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("seed,d,n_rest,n_removed", [(0, 4, 30, 5), (1, 10, 50, 20), (2, 25, 40, 3), (3, 6, 2, 12)])
def test_theorem1_eq13_is_cook_influence_and_retraining(seed, d, n_rest, n_removed):
    gen = torch.Generator().manual_seed(seed)
    delta = 0.5
    rest, removed = regression_task(n_rest, d, gen), regression_task(n_removed, d, gen, shift=1.0)
    zero = torch.zeros(d, dtype=torch.float64)
    # the base ("LLM") is trained on all data with weight decay delta (001 Eq. 7); any H_0 for fine-tuning
    theta_llm = lm.fit([rest, removed], delta * torch.eye(d, dtype=torch.float64), zero)
    H0 = spd(d, gen, scale=2.0)
    theta_t = lm.fit([removed], H0, theta_llm)  # Eq. 8
    H_rest = rest.X.T @ rest.X

    removed_eq13 = task_removal(
        {"w": theta_llm},
        {"w": theta_t},
        rest_curvature={"w": Dense(H_rest)},
        base_curvature={"w": Dense(H0)},
        curvature={"w": Dense(lm.hessian(removed, theta_t))},
        alpha=1.0,
        delta=delta,
    )["w"]
    cook = lm.cook_influence_removal(theta_llm, removed, H_rest + delta * torch.eye(d, dtype=torch.float64))
    retrained = lm.fit([rest], delta * torch.eye(d, dtype=torch.float64), zero)
    assert rel_err(removed_eq13, cook) < 1e-8
    assert rel_err(removed_eq13, retrained) < 1e-8
    assert rel_err(cook, retrained) < 1e-8


def test_eq13_with_zero_task_curvature_and_identity_is_task_negation():
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    model = {"w": torch.randn(3, 4, generator=gen, dtype=torch.float64)}
    out = task_removal(base, model, rest_curvature=Scalar(0), base_curvature=Identity(), curvature=Scalar(0), alpha=0.6, delta=1.0)
    torch.testing.assert_close(out["w"], base["w"] - 0.6 * (model["w"] - base["w"]))
