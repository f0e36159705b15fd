"""Curvature forms: products and solves agree with explicit matrices; sums promote; bad curvature is named."""

from __future__ import annotations

import pytest
import torch

from modelmerge import Dense, Diagonal, Identity, MergeInputError, Scalar
from modelmerge.curvature import curvature_for, linear_combination


@pytest.fixture
def param():
    return torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def forms(param):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    return [Scalar(2.5), Diagonal(torch.rand(3, 2, generator=gen, dtype=torch.float64) + 0.2), Dense(a @ a.T + torch.eye(6, dtype=torch.float64))]


def test_mv_and_solve_match_the_explicit_matrix(param):
    for h in forms(param):
        m = h.to_dense(param)
        torch.testing.assert_close(h.mv(param).reshape(-1), m @ param.reshape(-1))
        torch.testing.assert_close(h.solve(param).reshape(-1), torch.linalg.solve(m, param.reshape(-1)))


def test_sums_promote_and_equal_the_sum_of_matrices(param):
    fs = forms(param)
    for a in fs:
        for b in fs:
            s = linear_combination([0.5, 2.0], [a, b])
            assert type(s) is (type(a) if isinstance(a, Dense) or isinstance(b, Scalar) else type(b))
            torch.testing.assert_close(s.to_dense(param), 0.5 * a.to_dense(param) + 2.0 * b.to_dense(param))


def test_solve_is_pseudo_inverse_on_exact_zeros_only():
    d = Diagonal(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(d.solve(torch.tensor([0.0, 4.0])), torch.tensor([0.0, 2.0]))
    with pytest.raises(MergeInputError, match="w.*<= 0 at 1 entries"):
        d.solve(torch.tensor([1.0, 4.0]), "w")
    with pytest.raises(MergeInputError, match="not positive"):
        Scalar(0).solve(torch.ones(2), "w")


@pytest.mark.parametrize(
    "spec,problem",
    [
        ({"w": -torch.ones(3, 2, dtype=torch.float64)}, "negative"),
        ({"w": torch.ones(2, 3, dtype=torch.float64)}, "shape mismatch"),
        ({"w": torch.full((3, 2), float("nan"), dtype=torch.float64)}, "non-finite"),
        ({"v": torch.ones(3, 2, dtype=torch.float64)}, "no entry"),
        ({"w": Dense(-torch.eye(6, dtype=torch.float64))}, "negative diagonal"),
        ({"w": Dense(torch.eye(6, dtype=torch.float64) + 2 * torch.eye(6, dtype=torch.float64).roll(1, 0) + 2 * torch.eye(6, dtype=torch.float64).roll(-1, 0))}, "negative eigenvalue"),
        ({"w": Dense(torch.triu(torch.ones(6, 6, dtype=torch.float64)))}, "not symmetric"),
        (Scalar(-1.0), "non-negative"),
        (Diagonal(torch.ones(3, 2)), "per parameter"),
    ],
)
def test_bad_curvature_raises_naming_the_parameter(param, spec, problem):
    with pytest.raises(MergeInputError, match=problem) as err:
        curvature_for(spec, "w", param)
    assert err.value.parameter == "w"


def test_identity_is_scalar_one(param):
    torch.testing.assert_close(Identity().to_dense(param), torch.eye(6, dtype=torch.float64))


def test_a_checked_factor_changed_in_place_is_checked_again():
    """A factor that passed the PSD check once is not re-checked on every read, but an in-place change is."""
    from modelmerge.curvature import KFAC

    w = torch.zeros(3, 4, dtype=torch.float64)
    A, B = torch.eye(4, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    h = KFAC(A, B)
    curvature_for({"w": h}, "w", w)
    curvature_for({"w": h}, "w", w)  # cached: still valid
    A[0, 1] = 5.0  # now asymmetric
    with pytest.raises(MergeInputError, match="not symmetric"):
        curvature_for({"w": h}, "w", w)
    A[1, 0] = 5.0  # symmetric again
    curvature_for({"w": h}, "w", w)
    A[2, 2] = -1.0
    with pytest.raises(MergeInputError, match="negative diagonal"):
        curvature_for({"w": h}, "w", w)
