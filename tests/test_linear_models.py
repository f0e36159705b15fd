"""The exact GLM helpers against autograd, and the fitted models against their stationarity conditions."""

from __future__ import annotations

import pytest
import torch

from modelmerge import linear as lm


def make_task(loss: str, n: int = 40, d: int = 6, seed: int = 0) -> lm.Task:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = X @ torch.randn(d, generator=gen, dtype=torch.float64)
    y = z if loss == "quadratic" else torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(z), 1.0, -1.0).double()
    return lm.Task(X, y, loss)


@pytest.mark.parametrize("loss", lm.LOSSES)
def test_gradient_and_hessian_match_autograd(loss):
    task = make_task(loss)
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_auto = torch.func.grad(lambda th: lm.loss(task, th))(theta)
    h_auto = torch.func.hessian(lambda th: lm.loss(task, th))(theta)
    torch.testing.assert_close(lm.gradient(task, theta), g_auto, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lm.hessian(task, theta), h_auto, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss", lm.LOSSES)
def test_fit_satisfies_first_order_condition(loss):
    """H_0 (theta - theta_0) = - sum_t alpha_t grad l_t(theta) at the fitted theta (001 App. A.1)."""
    tasks = [make_task(loss, seed=s) for s in (2, 3)]
    theta0 = torch.ones(6, dtype=torch.float64)
    H0 = 0.5 * torch.eye(6, dtype=torch.float64)
    alphas = [0.3, 1.7]
    theta = lm.fit(tasks, H0, theta0, alphas)
    residual = H0 @ (theta - theta0) + sum(a * lm.gradient(t, theta) for a, t in zip(alphas, tasks))
    assert float(residual.norm()) < 1e-9


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="loss must be one of"):
        lm.Task(torch.zeros(2, 2), torch.zeros(2), "hinge")
