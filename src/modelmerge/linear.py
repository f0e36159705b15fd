"""Generalised linear models solved exactly: the setting in which 001's identities can be checked to 1e-8.

Losses are sums over examples (not means), as in 001 Sec. 3: the quadratic loss
l(theta) = 1/2 ||y - X theta||^2 and the logistic loss l(theta) = sum_i log(1 + exp(-s_i x_i^T theta))
with labels s_i in {-1, +1}. Fitting solves the fine-tuning problems of 001 Eqs. 8-9,
argmin_theta sum_t alpha_t l_t(theta) + 1/2 ||theta - theta_0||^2_{H_0}, by a linear solve (quadratic) or by
damped Newton iterations (logistic) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

LOSSES = ("quadratic", "logistic")


@dataclass(frozen=True)
class Task:
    """A dataset D_t = (X_t, y_t) and its loss; y holds real targets or labels in {-1, +1}."""

    X: Tensor
    y: Tensor
    loss: str = "quadratic"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.X.ndim != 2 or self.y.shape != (self.X.shape[0],):
            raise ValueError(f"need X of shape (n, d) and y of shape (n,), got {tuple(self.X.shape)}, {tuple(self.y.shape)}")


def loss(task: Task, theta: Tensor) -> Tensor:
    """l_t(theta), summed over the task's examples."""
    z = task.X @ theta
    if task.loss == "quadratic":
        return 0.5 * ((task.y - z) ** 2).sum()
    return torch.nn.functional.softplus(-task.y * z).sum()


def gradient(task: Task, theta: Tensor) -> Tensor:
    """grad l_t(theta) = X^T (X theta - y) (quadratic) or -X^T (s * sigmoid(-s z)) (logistic)."""
    z = task.X @ theta
    if task.loss == "quadratic":
        return task.X.T @ (z - task.y)
    return -task.X.T @ (task.y * torch.sigmoid(-task.y * z))


def hessian(task: Task, theta: Tensor) -> Tensor:
    """Hessian of l_t: X^T X (quadratic) or X^T diag(p (1 - p)) X with p = sigmoid(z) (logistic)."""
    if task.loss == "quadratic":
        return task.X.T @ task.X
    p = torch.sigmoid(task.X @ theta)
    return task.X.T @ ((p * (1 - p))[:, None] * task.X)


def objective(tasks: Sequence[Task], alphas: Sequence[float], H0: Tensor, theta0: Tensor, theta: Tensor) -> Tensor:
    """sum_t alpha_t l_t(theta) + 1/2 (theta - theta_0)^T H_0 (theta - theta_0)."""
    d = theta - theta0
    return sum(a * loss(t, theta) for a, t in zip(alphas, tasks)) + 0.5 * d @ H0 @ d


def fit(
    tasks: Sequence[Task],
    H0: Tensor,
    theta0: Tensor,
    alphas: Sequence[float] | None = None,
    tol: float = 1e-13,
    max_iter: int = 100,
) -> Tensor:
    """argmin_theta sum_t alpha_t l_t(theta) + 1/2 ||theta - theta_0||^2_{H_0} (001 Eqs. 8 and 9), exactly.

    Quadratic losses: one linear solve. Otherwise Newton's method with backtracking, stopped when the
    gradient norm falls below ``tol`` times its initial value (an error is raised if it does not).
    """
    alphas = [1.0] * len(tasks) if alphas is None else list(alphas)
    if len(alphas) != len(tasks):
        raise ValueError(f"{len(alphas)} alphas for {len(tasks)} tasks")
    if all(t.loss == "quadratic" for t in tasks):
        A = H0 + sum(a * t.X.T @ t.X for a, t in zip(alphas, tasks))
        b = H0 @ theta0 + sum(a * t.X.T @ t.y for a, t in zip(alphas, tasks))
        return torch.linalg.solve(A, b)

    def grad(th: Tensor) -> Tensor:
        return H0 @ (th - theta0) + sum(a * gradient(t, th) for a, t in zip(alphas, tasks))

    theta = theta0.clone()
    g0 = float(grad(theta).norm())
    for _ in range(max_iter):
        g = grad(theta)
        if float(g.norm()) <= tol * max(g0, 1.0):
            return theta
        H = H0 + sum(a * hessian(t, theta) for a, t in zip(alphas, tasks))
        step = torch.linalg.solve(H, g)
        f = objective(tasks, alphas, H0, theta0, theta)
        slack = 1e-12 * abs(float(f))  # near the optimum decreases fall below round-off: do not reject them
        eta = 1.0
        while eta > 1e-8 and objective(tasks, alphas, H0, theta0, theta - eta * step) > f - 1e-4 * eta * (g @ step) + slack:
            eta /= 2
        theta = theta - eta * step
    if float(grad(theta).norm()) > 1e-9 * max(g0, 1.0):
        raise RuntimeError(f"Newton did not converge in {max_iter} iterations (|grad| = {float(grad(theta).norm()):.3g})")
    return theta


def cook_influence_removal(theta_full: Tensor, removed: Task, H_rest: Tensor) -> Tensor:
    """Cook (1977, Eq. 5) / 001 Eq. 14: theta_\\t = theta_full + Hbar_\\t^-1 X_t^T (X_t theta_full - y_t)."""
    if removed.loss != "quadratic":
        raise ValueError("Cook's formula is exact only for the quadratic loss")
    return theta_full + torch.linalg.solve(H_rest, removed.X.T @ (removed.X @ theta_full - removed.y))


def gradient_mismatch(tasks: Sequence[Task], alphas: Sequence[float], theta_target: Tensor, theta_merged: Tensor) -> float:
    """|| sum_t alpha_t [grad l_t(theta_target) - grad l_t(theta_merged)] || (001 Sec. 4.1, training data)."""
    diff = sum(a * (gradient(t, theta_target) - gradient(t, theta_merged)) for a, t in zip(alphas, tasks))
    return float(diff.norm())
