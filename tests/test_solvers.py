"""Gram and K-FAC curvature, conjugate gradients, RegMean and MaTS against closed forms (002 Secs. 2-5)."""

from __future__ import annotations

import pytest
import torch

from modelmerge import Identity
from modelmerge.curvature import KFAC, Dense, Diagonal, Gram, Scalar, SumCurvature, WithFallback
from modelmerge.merge import average, fisher_average, gradient_matching, mats, regmean
from modelmerge.solve import ConjugateGradient

F64 = torch.float64


def spd(n: int, gen: torch.Generator, cond: float = 10.0) -> torch.Tensor:
    """A random SPD matrix with condition number ``cond``."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q @ torch.diag(torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=F64)) @ q.T


@pytest.mark.parametrize("in_axis", [1, 0])
def test_kfac_and_gram_products_and_solves_equal_explicit_kronecker_products(in_axis):
    gen = torch.Generator().manual_seed(0)
    d_in, d_out = 5, 3
    W = torch.randn((d_out, d_in) if in_axis == 1 else (d_in, d_out), generator=gen, dtype=F64)
    A, B = spd(d_in, gen), spd(d_out, gen)
    kron_kfac = torch.kron(B, A) if in_axis == 1 else torch.kron(A, B)
    kron_gram = torch.kron(torch.eye(d_out, dtype=F64), A) if in_axis == 1 else torch.kron(A, torch.eye(d_out, dtype=F64))
    for h, m in ((KFAC(A, B, in_axis), kron_kfac), (Gram(A, in_axis), kron_gram)):
        torch.testing.assert_close(h.to_dense(W), m)
        torch.testing.assert_close(h.mv(W).reshape(-1), m @ W.reshape(-1))
        torch.testing.assert_close(h.solve(W).reshape(-1), torch.linalg.solve(m, W.reshape(-1)))
    # the K-FAC product is B W A for nn.Linear (out x in): no Kronecker product is ever formed
    if in_axis == 1:
        torch.testing.assert_close(KFAC(A, B).mv(W), B @ W @ A)


@pytest.mark.parametrize("in_axis", [1, 0])
def test_damped_kfac_solves_exactly_in_the_eigenbases_and_agrees_with_cg(in_axis):
    """(c B (x) A + delta I)^-1 R in closed form = the dense solve = CG on the same products, for every delta."""
    gen = torch.Generator().manual_seed(3)
    d_in, d_out = 5, 4
    W = torch.randn((d_out, d_in) if in_axis == 1 else (d_in, d_out), generator=gen, dtype=F64)
    A = spd(d_in, gen, cond=1e6)
    B = spd(d_out, gen, cond=1e3)
    B[0] = B[:, 0] = 0.0  # a singular factor: only the damping makes the sum invertible
    base = KFAC(A, B, in_axis).scale(2.0)
    for delta in (1e-6, 0.5):
        damped = base + Scalar(delta)
        assert isinstance(damped, KFAC) and damped.damping == delta and damped._eig is base._eig  # shared eigh
        dense = 2.0 * (torch.kron(B, A) if in_axis == 1 else torch.kron(A, B)) + delta * torch.eye(W.numel(), dtype=F64)
        torch.testing.assert_close(damped.to_dense(W), dense)
        torch.testing.assert_close(damped.mv(W).reshape(-1), dense @ W.reshape(-1))
        exact = torch.linalg.solve(dense, W.reshape(-1))
        torch.testing.assert_close(damped.solve(W).reshape(-1), exact, rtol=1e-8, atol=1e-8)
        cg = ConjugateGradient(max_iter=200, tol=1e-13)(damped.mv, W, None, "w")
        torch.testing.assert_close(cg.reshape(-1), exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
    assert len(base._eig) == 1  # one eigendecomposition for both dampings
    # float32 weights: the eigenbases are float64, so a tiny damping is still resolved (float32 eigh would not be)
    damped = base + Scalar(1e-6)
    exact = torch.linalg.solve(damped.to_dense(W), W.reshape(-1))
    torch.testing.assert_close(damped.solve(W.float()).double().reshape(-1), exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    torch.testing.assert_close((base + Scalar(0.5)).scale(3.0).to_dense(W), 3.0 * (base + Scalar(0.5)).to_dense(W))


def test_sums_without_closed_form_are_solved_by_cg_to_the_dense_solution():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(3, 4, generator=gen, dtype=F64)
    terms = [KFAC(spd(4, gen), spd(3, gen)), KFAC(spd(4, gen), spd(3, gen)), Diagonal(torch.rand(3, 4, generator=gen, dtype=F64))]
    total = terms[0] + terms[1] + terms[2]
    assert isinstance(total, SumCurvature) and len(total.terms) == 3
    assert isinstance(Gram(spd(4, gen)) + Gram(spd(4, gen)) + Scalar(2.0), Gram)  # closed form kept
    dense = sum(t.to_dense(W) for t in terms)
    solver = ConjugateGradient(max_iter=50, tol=1e-14)
    x = total.solve(W, "w", solver=solver)
    torch.testing.assert_close(x.reshape(-1), torch.linalg.solve(dense, W.reshape(-1)), atol=1e-10, rtol=1e-10)
    assert solver.history["w"][0] == pytest.approx(1.0) and solver.history["w"][-1] < 1e-14


def test_cg_converges_in_at_most_n_steps_and_records_residuals():
    gen = torch.Generator().manual_seed(2)
    M = spd(12, gen, cond=10.0)
    b = torch.randn(12, generator=gen, dtype=F64)
    solver = ConjugateGradient(max_iter=12, tol=0.0)
    x = solver(lambda v: M @ v, b, name="v")
    torch.testing.assert_close(x, torch.linalg.solve(M, b), atol=1e-6, rtol=1e-6)
    assert len(solver.history["v"]) <= 13


def _layer_models(gen, T=3, d_in=6, d_out=4, n=50, cond=10.0):
    """T task weights of one linear layer with their input Grams Z^T Z / N."""
    Ws, grams = [], []
    for _ in range(T):
        Ws.append({"layer.weight": torch.randn(d_out, d_in, generator=gen, dtype=F64), "layer.bias": torch.randn(d_out, generator=gen, dtype=F64)})
        grams.append({"layer.weight": Gram(spd(d_in, gen, cond))})
    return Ws, grams


def test_cg_reaches_closed_form_regmean_and_fisher_averaging():
    gen = torch.Generator().manual_seed(3)
    models, grams = _layer_models(gen)
    base = {k: torch.zeros_like(v) for k, v in models[0].items()}
    solver = ConjugateGradient(max_iter=100, tol=0.0)
    closed = regmean(models, grams)
    by_cg = mats(base, models, grams, solver=solver)
    for k in closed:
        torch.testing.assert_close(by_cg[k], closed[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(closed["layer.bias"], average(models)["layer.bias"])  # fallback: averaging
    # RegMean by hand: W* = (sum W_m G_m)(sum G_m)^-1
    G = [g["layer.weight"].G for g in grams]
    expected = sum(m["layer.weight"] @ g for m, g in zip(models, G)) @ torch.linalg.inv(sum(G))
    torch.testing.assert_close(closed["layer.weight"], expected, atol=1e-10, rtol=1e-10)

    fishers = [{k: torch.rand(v.shape, generator=gen, dtype=F64) + 0.1 for k, v in m.items()} for m in models]
    by_cg = mats(base, models, fishers, solver=ConjugateGradient(max_iter=100))
    closed = fisher_average(models, fishers)
    for k in closed:
        torch.testing.assert_close(by_cg[k], closed[k], atol=1e-6, rtol=0)


def test_mats_with_identity_objective_is_averaging_from_any_start():
    gen = torch.Generator().manual_seed(4)
    models, _ = _layer_models(gen)
    base = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in models[0].items()}
    merged = mats(base, models, [Identity()] * 3, init_alpha=0.3)
    for k in merged:
        torch.testing.assert_close(merged[k], average(models)[k])


def regmean_objective(models, grams, W: torch.Tensor) -> float:
    """sum_m 1/N_m ||Z_m W_m^T - Z_m W^T||^2 = sum_m tr((W - W_m) G_m (W - W_m)^T) (002 Eq. 4)."""
    return float(sum(torch.trace((W - m["layer.weight"]) @ g["layer.weight"].G @ (W - m["layer.weight"]).T) for m, g in zip(models, grams)))


def test_unscaled_cg_beats_scaled_closed_form_on_ill_conditioned_grams():
    """002 Sec. 6.2: CG on the unscaled RegMean objective reaches a lower objective than scaled RegMean."""
    gen = torch.Generator().manual_seed(5)
    models, grams = _layer_models(gen, d_in=20, cond=1e8)
    base = {k: torch.zeros_like(v) for k, v in models[0].items()}
    for lam in (0.5, 0.9, 0.99):
        scaled = regmean(models, grams, offdiag_scale=lam)["layer.weight"]
        cg = mats(base, models, grams, init_alpha=1 / 3, solver=ConjugateGradient(max_iter=100))["layer.weight"]
        assert regmean_objective(models, grams, cg) < regmean_objective(models, grams, scaled)
    # ...and the scaled solution is the exact optimum of the scaled objective, not of the true one
    optimum = regmean(models, grams, offdiag_scale=1.0)["layer.weight"]
    assert regmean_objective(models, grams, optimum) <= regmean_objective(models, grams, cg) + 1e-12


def test_kfac_gradient_matching_equals_joint_target_on_exactly_quadratic_losses():
    """l_t(W) = 1/2 sum_n (W z_n - y_n)^T B_t (W z_n - y_n) has Hessian B_t (x) Z_t^T Z_t exactly, so Eq. 12
    with K-FAC curvature (solved by CG) is the joint target of 001 Eq. 9."""
    gen = torch.Generator().manual_seed(6)
    d_in, d_out, T = 5, 3, 3
    W0 = torch.randn(d_out, d_in, generator=gen, dtype=F64)
    A0, B0 = spd(d_in, gen), spd(d_out, gen)
    H0 = torch.kron(B0, A0)
    hess, grads_at = [], []
    for _ in range(T):
        Z = torch.randn(20, d_in, generator=gen, dtype=F64)
        Y = torch.randn(20, d_out, generator=gen, dtype=F64)
        Bt = spd(d_out, gen)
        hess.append((Z.T @ Z, Bt))
        grads_at.append(lambda W, Z=Z, Y=Y, Bt=Bt: (Bt @ (W @ Z.T - Y.T) @ Z).reshape(-1))  # row-major vec
    alphas = [0.5, 1.0, 1.5]
    full = [torch.kron(B, A) for A, B in hess]

    def minimise(Hs, gs, coeffs):
        # quadratic: theta = W0 - (H0 + sum c H)^-1 sum c grad(W0)
        H = H0 + sum(c * h for c, h in zip(coeffs, Hs))
        g = sum(c * gf(W0) for c, gf in zip(coeffs, gs))
        return W0 - torch.linalg.solve(H, g).reshape(d_out, d_in)

    thetas = [minimise([h], [g], [1.0]) for h, g in zip(full, grads_at)]  # Eq. 8
    target = minimise(full, grads_at, alphas)  # Eq. 9
    solver = ConjugateGradient(max_iter=200, tol=1e-13)
    merged = gradient_matching(
        {"w": W0}, [{"w": t} for t in thetas], [{"w": KFAC(A, B)} for A, B in hess], {"w": KFAC(A0, B0)}, alphas, solver=solver
    )["w"]
    torch.testing.assert_close(merged, target, atol=1e-8, rtol=1e-8)
    assert solver.history["w"][-1] < 1e-13


def test_with_fallback_covers_what_the_matrix_objective_does_not():
    gen = torch.Generator().manual_seed(7)
    models, grams = _layer_models(gen)
    fishers = [{k: torch.rand(v.shape, generator=gen, dtype=F64) + 0.1 for k, v in m.items()} for m in models]
    merged = regmean(models, grams, fallback=fishers)
    torch.testing.assert_close(merged["layer.bias"], fisher_average(models, fishers)["layer.bias"])
    spec = WithFallback(grams[0], fishers[0])
    assert set(spec) == {"layer.weight", "layer.bias"} and isinstance(spec["layer.weight"], Gram)


def test_dense_and_gram_views_of_regmean_agree():
    gen = torch.Generator().manual_seed(8)
    models, grams = _layer_models(gen)
    W = models[0]["layer.weight"]
    dense = [{"layer.weight": Dense(g["layer.weight"].to_dense(W)), "layer.bias": Identity()} for g in grams]
    a = fisher_average(models, dense)
    b = regmean(models, grams)
    torch.testing.assert_close(a["layer.weight"], b["layer.weight"], atol=1e-10, rtol=1e-10)
