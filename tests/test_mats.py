"""The MaTS experiment's pieces (002 Sec. 6) against dense linear algebra: every objective of the grid solved by CG
reaches A^-1 b, the grid's diagonal cells reproduce the closed forms, one solve yields every shorter budget, the
objective value and total residual are the quantities they claim, and App. E.1's FLOPs match counted products."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modelmerge.cost import flops_kfac_cg, flops_mats_kfac, flops_mats_regmean, measure
from modelmerge.curvature import KFAC, Gram, Scalar, WithFallback, curvature_for, linear_combination
from modelmerge.experiments.mats import (OBJECTIVES, choose_on_validation, fisher_floor, floored, objective,
                                         scaled_update, solve_gradient_matching, solve_mats)
from modelmerge.merge import average, fisher_average, gradient_matching, regmean, task_arithmetic, ties
from modelmerge.merge.mats import merge_objective
from modelmerge.solve import ConjugateGradient, total_relative_residual

F64 = torch.float64
SHAPES = {"layer.weight": (3, 4), "layer.bias": (3,), "emb.weight": (5, 2)}


def spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n + 2, generator=gen, dtype=F64)
    return x @ x.T / n + 0.05 * torch.eye(n, dtype=F64)


@pytest.fixture
def suite():
    """Base, four task models, and each model's diagonal Fisher, Gram and K-FAC curvature."""
    gen = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=gen, dtype=F64) for n, s in SHAPES.items()}
    models = [{n: t + 0.3 * torch.randn(t.shape, generator=gen, dtype=F64) for n, t in base.items()} for _ in range(4)]
    fishers = [{n: torch.rand(s, generator=gen, dtype=F64) for n, s in SHAPES.items()} for _ in models]
    fishers[0]["emb.weight"][0] = 0.0  # a row no task touches: the floor must keep it finite
    for f in fishers[1:]:
        f["emb.weight"][0] = 0.0
    grams = [{"layer.weight": Gram(spd(4, gen))} for _ in models]
    kfacs = [{"layer.weight": KFAC(spd(4, gen), spd(3, gen))} for _ in models]
    return base, models, floored(fishers, fisher_floor(fishers, 1e-3)), grams, kfacs


def dense_solution(base, models, obj):
    """A^-1 b per parameter with A = sum_m C_m as explicit matrices (float64)."""
    out = {}
    for name, theta0 in base.items():
        fallbacks = obj.fallback if isinstance(obj.fallback, list) else [obj.fallback] * len(models)
        cs = [curvature_for(c if isinstance(c, Scalar) else WithFallback(c, f), name, theta0)
              for c, f in zip(obj.curvatures, fallbacks)]
        A = sum(c.to_dense(theta0) for c in cs)
        b = sum(c.to_dense(theta0) @ m[name].reshape(-1) for c, m in zip(cs, models))
        out[name] = torch.linalg.solve(A, b).reshape(theta0.shape)
    return out


@pytest.mark.parametrize("name", OBJECTIVES)
def test_every_grid_objective_solved_by_cg_reaches_the_dense_solution(suite, name):
    base, models, fishers, grams, kfacs = suite
    obj = objective(name, len(models), fishers=fishers, grams=grams, kfacs=kfacs)
    init = task_arithmetic(base, models, 0.3)
    solved = solve_mats(base, models, obj, init, [200])
    exact = dense_solution(base, models, obj)
    for n in base:
        torch.testing.assert_close(solved.states[200][n], exact[n], rtol=1e-7, atol=1e-9)
    assert solved.residual[-1] < 1e-8 < solved.residual[0]


def test_diagonal_cells_of_the_grid_reproduce_the_closed_forms(suite):
    """Same method as initialisation and objective: CG from the closed form stays there, and from any other start
    it converges to it (averaging, diagonal Fisher merging, RegMean with unscaled Grams)."""
    base, models, fishers, grams, kfacs = suite
    closed = {"average": average(models), "diagonal Fisher": fisher_average(models, fishers),
              "RegMean": regmean(models, grams)}
    for name, cf in closed.items():
        obj = objective(name, len(models), fishers=fishers, grams=grams, kfacs=kfacs)
        from_closed = solve_mats(base, models, obj, cf, [0, 10])
        from_ties = solve_mats(base, models, obj, ties(base, models, 0.5), [200])
        for n in base:
            torch.testing.assert_close(from_closed.states[10][n], cf[n], rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(from_ties.states[200][n], cf[n], rtol=1e-7, atol=1e-9)
        assert from_closed.states[0]["layer.weight"] is not from_closed.states[10]["layer.weight"]


def test_one_solve_yields_every_shorter_budget_exactly(suite):
    base, models, fishers, grams, kfacs = suite
    obj = objective("block-diagonal Fisher (K-FAC)", len(models), fishers=fishers, kfacs=kfacs)
    init = task_arithmetic(base, models, 0.3)
    long = solve_mats(base, models, obj, init, [0, 1, 3, 7])
    for k in (0, 1, 3, 7):
        short = solve_mats(base, models, obj, init, [k]) if k else None
        for n in base:
            expected = init[n] if k == 0 else short.states[k][n]
            torch.testing.assert_close(long.states[k][n], expected, rtol=0, atol=0)


def test_total_residual_is_the_residual_of_the_whole_system(suite):
    base, models, fishers, grams, kfacs = suite
    obj = objective("block-diagonal Fisher (K-FAC)", len(models), fishers=fishers, kfacs=kfacs)
    init = task_arithmetic(base, models, 0.3)
    solved = solve_mats(base, models, obj, init, [0, 2, 5])
    fallbacks = obj.fallback
    for k in (0, 2, 5):
        r2 = b2 = 0.0
        for n, theta0 in base.items():
            cs = [curvature_for(WithFallback(c, f), n, theta0) for c, f in zip(obj.curvatures, fallbacks)]
            A = sum(c.to_dense(theta0) for c in cs)
            b = sum(c.to_dense(theta0) @ m[n].reshape(-1) for c, m in zip(cs, models))
            r2 += float((b - A @ solved.states[k][n].reshape(-1)).pow(2).sum())
            b2 += float(b.pow(2).sum())
        assert solved.residual[k] == pytest.approx((r2 / b2) ** 0.5, rel=1e-9)


def test_gradient_matching_budgets_equal_separate_solves(suite):
    base, models, fishers, grams, kfacs = suite
    hs = [WithFallback(k, f) for k, f in zip(kfacs, fishers)]
    solved = solve_gradient_matching(base, models, hs, Scalar(0.1), 0.7, [3, 50])
    for k in (3, 50):
        ref = gradient_matching(base, models, hs, Scalar(0.1), 0.7, solver=ConjugateGradient(max_iter=k, tol=0.0))
        for n in base:
            torch.testing.assert_close(solved.states[k][n], ref[n], rtol=0, atol=0)


def test_merge_objective_is_the_weighted_distance_and_minimised_by_the_solution(suite):
    base, models, fishers, grams, kfacs = suite
    obj = objective("RegMean", len(models), grams=grams)
    solution = regmean(models, grams)
    value = merge_objective(solution, models, obj.curvatures, obj.fallback)
    # by hand: 1/2 sum_m (x - theta_m)^T C_m (x - theta_m), C_m = I (x) G_m on the weight and I elsewhere
    by_hand = 0.0
    for m, g in zip(models, grams):
        d = solution["layer.weight"] - m["layer.weight"]
        by_hand += 0.5 * float((d @ g["layer.weight"].G * d).sum())
        by_hand += 0.5 * sum(float((solution[n] - m[n]).pow(2).sum()) for n in ("layer.bias", "emb.weight"))
    assert value == pytest.approx(by_hand, rel=1e-12)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        moved = {n: t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=F64) for n, t in solution.items()}
        assert merge_objective(moved, models, obj.curvatures, obj.fallback) > value


def test_choose_on_validation_takes_the_cheapest_best_and_reuses_converged_scores():
    base = {"w": torch.zeros(3)}
    states = {10: {"w": torch.ones(3)}, 20: {"w": torch.full((3,), 2.0)}, 30: {"w": torch.full((3,), 2.0)},
              40: {"w": torch.full((3,), 3.0)}}
    calls = []

    def score(s):
        calls.append(float(s["w"][0]))
        return {1.0: 0.5, 2.0: 0.7, 3.0: 0.7}[float(s["w"][0])]

    best, scores = choose_on_validation(states, score, base=base)
    assert best == 20 and scores == {10: 0.5, 20: 0.7, 30: 0.7, 40: 0.7}
    assert calls == [1.0, 2.0, 3.0]  # iterate 30 equals 20: not scored again


def test_scaled_update_is_ties_at_another_lambda(suite):
    base, models, *_ = suite
    for n, t in scaled_update(base, ties(base, models, 0.5, lam=1.0), 0.4).items():
        torch.testing.assert_close(t, ties(base, models, 0.5, lam=0.4)[n])


@pytest.mark.parametrize("d,k", [(4, 3), (6, 10)])
def test_flops_per_cg_iteration_match_counted_matrix_products(d, k):
    """App. E.1 counts an a x b by b x c product as a b c; torch's counter reports 2 a b c (multiply and add)."""
    gen = torch.Generator().manual_seed(1)
    M, x = 3, torch.randn(k, d, generator=gen)
    kfac = linear_combination([1.0] * M, [KFAC(spd(d, gen).float(), spd(k, gen).float()) for _ in range(M)])
    gram = linear_combination([1.0] * M, [Gram(spd(d, gen).float()) for _ in range(M)])
    for op, formula in ((kfac, flops_mats_kfac), (gram, flops_mats_regmean)):
        with FlopCounterMode(display=False) as counter:
            op.mv(x)
        per_iteration = formula(M, 0, 0, [(d, k)], 1) - formula(M, 0, 0, [(d, k)], 0)
        matmuls = per_iteration - (M - 1) * d * k * (op is kfac) - 12 * d * k  # the vector operations are not matmuls
        assert counter.get_total_flops() == 2 * matmuls


@pytest.mark.parametrize("in_axis", [1, 0])
def test_flops_per_preconditioner_application_match_counted_matrix_products(in_axis):
    """The Kronecker-factored preconditioner's four products into and out of the eigenbases, as flops_kfac_cg counts."""
    gen = torch.Generator().manual_seed(2)
    M, d, k = 3, 5, 7
    kfac = linear_combination([1.0] * M, [KFAC(spd(d, gen).float(), spd(k, gen).float(), in_axis=in_axis)
                                          for _ in range(M)])
    precondition = kfac.preconditioner()
    r = torch.randn((k, d) if in_axis == 1 else (d, k), generator=gen)
    precondition(r)  # the first call casts the eigenbases to r's dtype
    with FlopCounterMode(display=False) as counter:
        precondition(r)
    per_iteration = (flops_kfac_cg(M, [(d, k)], 1, preconditioned=True) - flops_kfac_cg(M, [(d, k)], 0, True)
                     - flops_kfac_cg(M, [(d, k)], 1))
    assert counter.get_total_flops() == 2 * (per_iteration - 4 * d * k)  # the vector operations are not matmuls


def test_measure_reports_the_memory_a_block_allocates():
    with measure() as m:
        x = torch.ones(25_000_000)  # 95 MiB
        x += 1
        del x
    assert m.seconds > 0 and 80 < m.peak_host_mb < 400
