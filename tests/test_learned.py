"""SuperMerge / AdaMerging: fixed weights are task arithmetic, gradients match finite differences, training
helps, and hierarchical merging with enough fan-in is the flat merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelmerge.merge import LayerwiseMerge, adamerging, hierarchical_merge, supermerge, task_arithmetic
from modelmerge.merge.learned import (
    forward_merged,
    merge_objective,
    similarity_groups,
    task_vector_similarity,
)

F64 = torch.float64


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


def task_data(task: int, n: int, seed: int):
    """Two tasks on separate input domains (x_2 = +-2): task 0 labels sign(x_0), task 1 labels sign(x_1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    x[:, 2] = 2.0 if task == 0 else -2.0
    return {"x": x, "labels": (x[:, task] > 0).long()}


def finetune(model: nn.Module, batch, steps=150, lr=0.03):
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch["x"]), batch["labels"]).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def two_tasks():
    torch.manual_seed(0)
    base = MLP().double()
    models = [finetune(base, task_data(t, 200, seed=t)) for t in (0, 1)]
    val = [[task_data(t, 64, seed=10 + t + 2 * i) for i in range(2)] for t in (0, 1)]
    sd = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    return base, sd(base), [sd(m) for m in models], val


def test_fixed_weights_reproduce_task_arithmetic(two_tasks):
    _, base, models, _ = two_tasks
    for activation in ("tanh", "identity"):
        merged = LayerwiseMerge(base, models, init=0.4, activation=activation).merged()
        expected = task_arithmetic(base, models, 0.4)
        for k in expected:
            torch.testing.assert_close(merged[k], expected[k], atol=1e-14, rtol=0)


def test_gradient_wrt_merge_weights_matches_finite_differences(two_tasks):
    module, base, models, val = two_tasks
    merger = LayerwiseMerge(base, models, init=0.3)
    with torch.no_grad():
        merger.W.add_(0.2 * torch.randn(merger.W.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    batch = val[0][0]

    def loss():
        return merge_objective("classification", forward_merged(module, merger.merged(), batch), batch)

    merger.W.grad = None
    loss().backward()
    analytic = merger.W.grad.clone()
    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    with torch.no_grad():
        for idx in torch.cartesian_prod(torch.arange(analytic.shape[0]), torch.arange(analytic.shape[1])).tolist():
            merger.W[tuple(idx)] += eps
            up = float(loss())
            merger.W[tuple(idx)] -= 2 * eps
            down = float(loss())
            merger.W[tuple(idx)] += eps
            numeric[tuple(idx)] = (up - down) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=1e-8, rtol=1e-6)


def mean_loss(module, state, batches, objective="classification"):
    with torch.no_grad():
        return sum(float(merge_objective(objective, forward_merged(module, state, b), b)) for b in batches) / len(batches)


def test_supermerge_training_lowers_validation_loss(two_tasks):
    module, base, models, val = two_tasks
    batches = val[0] + val[1]
    start = mean_loss(module, task_arithmetic(base, models, 0.3), batches)
    result = supermerge(base, models, module, batches, init=0.3, epochs=30, lr=0.05, progress=False)
    end = mean_loss(module, result.state, batches)
    assert end < 0.8 * start
    assert bool((result.coefficients.abs() < 1).all())  # tanh keeps them in (-1, 1)
    # the model passed in is only a skeleton: its own parameters are untouched
    assert all(torch.equal(v, base[k]) for k, v in module.state_dict().items())
    ablation = supermerge(base, models, module, batches, use_tanh=False, epochs=30, lr=0.05, progress=False)
    assert mean_loss(module, ablation.state, batches) < start


def test_adamerging_keeps_coefficients_in_unit_box_and_lowers_entropy(two_tasks):
    module, base, models, val = two_tasks
    unlabelled = [{"x": b["x"]} for b in val[0] + val[1]]
    start = mean_loss(module, task_arithmetic(base, models, 0.3), unlabelled, "entropy")
    result = adamerging(base, models, module, unlabelled, epochs=30, lr=0.05, progress=False)
    assert bool(((result.coefficients >= 0) & (result.coefficients <= 1)).all())
    assert mean_loss(module, result.state, unlabelled, "entropy") < start


def test_hierarchical_merge_with_full_fan_in_is_the_flat_merge(two_tasks):
    module, base, models, val = two_tasks
    four = models + [copy.deepcopy(m) for m in models]
    data = val + val

    def merge_group(b, group, batches):
        return supermerge(b, group, module, batches, epochs=3, lr=0.05, progress=False).state

    flat = merge_group(base, four, [x for d in data for x in d])
    hier, tree = hierarchical_merge(base, four, data, merge_group, fan_in=4)
    assert tree == [[[0, 1, 2, 3]]]
    assert all(torch.equal(hier[k], flat[k]) for k in flat)


def test_hierarchical_merge_groups_similar_tasks_and_bounds_fan_in(two_tasks):
    module, base, models, val = two_tasks
    # models 0 and 2 are copies of task 0's model (up to noise), 1 and 3 of task 1's
    gen = torch.Generator().manual_seed(2)
    noisy = lambda m: {k: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in m.items()}  # noqa: E731
    four = [models[0], models[1], noisy(models[0]), noisy(models[1])]
    assert similarity_groups(task_vector_similarity(base, four), 2) == [[0, 2], [1, 3]]
    seen = []

    def merge_group(b, group, batches):
        seen.append(len(group))
        return supermerge(b, group, module, batches, epochs=2, lr=0.05, progress=False).state

    _, tree = hierarchical_merge(base, four, val + val, merge_group, fan_in=2)
    assert tree == [[[0, 2], [1, 3]], [[0, 1]]]
    assert max(seen) <= 2 and len(seen) == 3


def test_low_memory_similarity_is_the_same_cosine(two_tasks):
    _, base, models, _ = two_tasks
    gen = torch.Generator().manual_seed(3)
    three = [*models, {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in models[0].items()}]
    torch.testing.assert_close(task_vector_similarity(base, three, low_memory=True), task_vector_similarity(base, three),
                               atol=1e-14, rtol=0)


def test_chained_batches_index_across_parts_lazily():
    from modelmerge.merge.learned import Chained

    reads = []

    class Part(list):
        def __getitem__(self, i):
            reads.append(i)
            return list.__getitem__(self, i)

    chained = Chained([Part([1, 2]), Part([]), Part([3]), Part([4, 5, 6])])
    assert len(chained) == 6 and reads == []
    assert [chained[i] for i in range(6)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(IndexError):
        chained[6]
