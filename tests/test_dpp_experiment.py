"""The DPP experiment's pieces (003): kernel from accuracies and representations, selections, random subsets,
exact probabilities, seeded text perturbations."""

import itertools
import math

import pytest
import torch

from modelmerge.experiments.dpp import PERTURBATIONS, Kernel, build_kernel, perturb, rank_among, subsets_of_size


def three_model_kernel():
    """Models a, b, c: gains 0.1, 0.2, 0.2 over a pretrained accuracy of 0.5; a's and b's representations agree
    on the first input and are orthogonal on the second, c's are orthogonal to both on both inputs."""
    e1, e2, e3 = torch.eye(3)
    reps = torch.stack([torch.stack([e1, e1]), torch.stack([e1, e2]), torch.stack([e3, e3])])
    return build_kernel(["a", "b", "c"], [0.55, 0.6, 0.6], [0.5, 0.5, 0.5], reps)


def test_kernel_of_three_models_matches_hand_computation():
    K = three_model_kernel()
    q = torch.tensor([0.1, 0.2, 0.2], dtype=torch.float64) / 0.3  # relative gains 0.1, 0.2, 0.2; ||.|| = 0.3
    S = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # mean cosines
    assert torch.allclose(K.q, q) and torch.allclose(K.S, S)
    assert torch.allclose(K.L, q[:, None] * S * q[None, :])
    # det L_{ij} = q_i^2 q_j^2 (1 - S_ij^2): {a,b} 3/4 * 4/81, {a,c} 4/81, {b,c} 16/81 -> b, c
    assert K.dpp(2) == ("b", "c") and K.dpp(1) in (("b",), ("c",))
    assert K.quality_only(2) == ("b", "c")
    assert K.diversity_only(2) in (("a", "c"), ("b", "c"))  # S alone cannot tell a from b against c


def test_exact_probabilities_sum_to_one_and_match_the_sampler():
    K = three_model_kernel()
    subsets = [tuple(s) for k in range(4) for s in itertools.combinations(K.pool, k)]
    probs = {s: K.probability(s) for s in subsets}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-12)  # sum_Y det(L_Y) = det(L + I)
    assert probs[()] == pytest.approx(1 / float(torch.det(K.L + torch.eye(3, dtype=K.L.dtype))))
    n = 20000
    counts = K.samples(n, seed=0)
    assert counts == K.samples(n, seed=0)  # seeded
    for s, p in probs.items():
        assert abs(counts.get(s, 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_selections_coincide_in_their_special_cases():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    S = x @ x.T
    S = S / torch.outer(S.diagonal().sqrt(), S.diagonal().sqrt())
    q = torch.rand(6, generator=gen, dtype=torch.float64)
    pool = list("uvwxyz")
    for k in range(1, 7):
        # S = I: det L_Y = prod q_i^2, the top-k qualities
        assert Kernel(pool, q / q.norm(), torch.eye(6, dtype=torch.float64)).dpp(k) == \
            Kernel(pool, q / q.norm(), S).quality_only(k)
        # equal qualities: det L_Y = c^k det S_Y, the most diverse
        flat = torch.full((6,), 6 ** -0.5, dtype=torch.float64)
        assert Kernel(pool, flat, S).dpp(k) == Kernel(pool, q, S).diversity_only(k)


def test_a_model_without_gain_is_never_selected_and_caps_the_size():
    K = build_kernel(["a", "b", "c"], [0.4, 0.6, 0.7], [0.5, 0.5, 0.5], torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0)))
    assert K.q[0] == 0 and K.max_size == 2
    assert "a" not in K.dpp(1) + K.dpp(2)
    with pytest.raises(ValueError, match="det\\(L_Y\\) = 0"):
        K.dpp(3)


def test_random_subsets_are_all_of_them_or_seeded_distinct_draws():
    pool = list("abcdefgh")
    assert subsets_of_size(pool, 2, draws=30, seed=0) == list(itertools.combinations(pool, 2))  # 28 <= 30: all
    draws = subsets_of_size(pool, 4, draws=20, seed=3)  # 70 > 20
    assert len(draws) == len(set(draws)) == 20 and all(len(s) == 4 and list(s) == sorted(s) for s in draws)
    assert draws == subsets_of_size(pool, 4, draws=20, seed=3) != subsets_of_size(pool, 4, draws=20, seed=4)


def test_rank_among_counts_strictly_better_others():
    assert rank_among(0.7, [0.5, 0.7, 0.9]) == "2 of 3" and rank_among(1.0, []) == "1 of 0"


@pytest.mark.parametrize("corruption", list(PERTURBATIONS))
def test_perturbations_are_seeded_change_the_text_and_leave_global_generators_alone(corruption):
    import random

    import numpy as np

    texts = ["the flight was delayed for three hours and nobody told us anything at all",
             "great service friendly crew and the best legroom I have had in years"]
    state, py_state, np_state = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()
    a = perturb(texts, corruption, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert random.getstate() == py_state and np.random.get_state()[1].tolist() == np_state
    assert a == perturb(texts, corruption, seed=0)
    assert len(a) == len(texts) and all(x != t for x, t in zip(a, texts))
    assert any(x != y for x, y in zip(a, perturb(texts, corruption, seed=1)))


@pytest.mark.parametrize("corruption", list(PERTURBATIONS))
def test_image_corruptions_are_seeded_and_change_the_image(corruption):
    import importlib.util

    import numpy as np

    if importlib.util.find_spec("imagecorruptions") is None:
        pytest.skip("imagecorruptions is not installed (the test and paper extras install it)")

    from modelmerge.experiments.dpp import corrupt_images

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(2)]
    state = np.random.get_state()
    a = corrupt_images(images, corruption, seed=0)
    assert np.random.get_state()[1].tolist() == state[1].tolist()
    assert all(x.shape == im.shape and x.dtype == np.uint8 for x, im in zip(a, images))
    assert all(np.array_equal(x, y) for x, y in zip(a, corrupt_images(images, corruption, seed=0)))
    assert all(not np.array_equal(x, im) for x, im in zip(a, images))


class _FakeModel(torch.nn.Module):
    """One scalar "encoder" weight w; class 0 scores w * x, class 1 scores 0.5."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(1, 1)
        self.w = torch.zeros(())

    def set_task(self, task):
        return self

    def load_encoder_state(self, state):
        self.w = state["w"].clone()

    def forward(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.stack([self.w * x, torch.full_like(x, 0.5)], -1))


def test_subset_scores_tune_lambda_on_tuning_data_only_and_score_once():
    from types import SimpleNamespace

    from modelmerge.experiments.dpp import SubsetScores

    def batches(label):
        return [{"x": torch.ones(4), "labels": torch.full((4,), label)}]

    # theta = lam * 1: tuning data wants class 1 (w <= 0.5), test data class 0 (w > 0.5)
    evaluator = SimpleNamespace(model=_FakeModel(), tasks=["t"], sorted_batches=lambda split: {"t": batches(0)})
    merges = []
    scores = SubsetScores({"w": torch.zeros(())}, {"a": {"w": torch.ones(())}}, evaluator, [0.2, 0.4, 0.7, 1.0],
                          tune={"t": batches(1)}, extra={"shifted": {"t": batches(1)}},
                          on_merge=lambda m, s: merges.append(s))
    tuned = scores("task arithmetic", ("a",), extra=False)
    assert tuned["lambda"] == 0.2 and tuned["tuning validation Avg."] == 1.0  # first best of 0.2, 0.4
    assert tuned["test/t"] == 0.0 and "shifted/t" not in tuned  # test scored at the tuned lambda, never used to choose
    row = scores("task arithmetic", ("a",))  # the extra set: the merge rebuilt once at the chosen lambda
    assert row["shifted/t"] == 1.0 and row["lambda"] == 0.2
    assert scores("task arithmetic", ("a",)) is row and len(merges) == 2
    assert scores.correct[("task arithmetic", ("a",))]["shifted/t"].tolist() == [1.0] * 4


def test_subset_scores_paired_differences_match_the_per_example_scores():
    from types import SimpleNamespace

    from modelmerge.evaluate import claim_verdict
    from modelmerge.experiments.dpp import SubsetScores

    # class 0 scores w * x, class 1 scores 0.5: with lam = 1, example x is called 0 iff w x > 0.5
    x = torch.tensor([0.1, 0.3, 0.6, 0.9, 1.2, 2.0, 3.0, 5.0])
    test = {"t": [{"x": x[:5], "labels": torch.zeros(5, dtype=torch.long)},
                  {"x": x[5:], "labels": torch.zeros(3, dtype=torch.long)}]}
    evaluator = SimpleNamespace(model=_FakeModel(), tasks=["t"], sorted_batches=lambda split: test)
    models = {"a": {"w": torch.tensor(1.0)}, "b": {"w": torch.tensor(0.2)}, "c": {"w": torch.tensor(0.5)}}
    scores = SubsetScores({"w": torch.zeros(())}, models, evaluator, [1.0], tune={"t": test["t"][:1]})
    rows = {m: scores("task arithmetic", (m,)) for m in models}
    correct = {m: (models[m]["w"] * x > 0.5).double().numpy() for m in models}  # by hand
    for m in models:
        assert scores.correct[("task arithmetic", (m,))]["test/t"].tolist() == correct[m].tolist()
        assert rows[m]["test/t"] == pytest.approx(correct[m].mean())
    a, b, c = (("task arithmetic", (m,)) for m in "abc")
    assert scores.paired(a, a, "test", ["t"]) == (0.0, 0.0, 0.0)
    d, lo, hi = scores.paired(a, b, "test", ["t"])
    assert d == pytest.approx(correct["a"].mean() - correct["b"].mean()) and lo <= d <= hi
    d2, _, _ = scores.paired(a, [b, c], "test", ["t"])  # against the mean of several merges
    assert d2 == pytest.approx(correct["a"].mean() - (correct["b"].mean() + correct["c"].mean()) / 2)
    assert claim_verdict(lo, hi) == ("supported" if lo > 0 else "inside noise")
    assert claim_verdict(0.1, 0.3) == "supported" and claim_verdict(-0.3, -0.1) == "not supported (reversed)"
    assert claim_verdict(-0.1, 0.2) == "inside noise"
    with pytest.raises(ValueError, match="above"):
        claim_verdict(0.2, 0.1)


def test_accuracy_quality_is_the_normalised_accuracy():
    K = build_kernel(["a", "b"], [0.3, 0.4], [0.5, 0.5], torch.randn(2, 3, 4), quality="accuracy")
    assert torch.allclose(K.q, torch.tensor([0.6, 0.8], dtype=torch.float64))
    with pytest.raises(ValueError, match="quality"):
        build_kernel(["a"], [0.3], [0.5], torch.randn(1, 3, 4), quality="loss")


def test_kernel_saved_and_loaded_selects_the_same(tmp_path):
    from modelmerge.experiments.dpp import Kernel

    K = build_kernel(["a", "b", "c", "d"], [0.9, 0.8, 0.85, 0.7], [0.5, 0.6, 0.5, 0.6], torch.randn(4, 6, 5))
    K.save(tmp_path / "kernel.json")
    back = Kernel.load(tmp_path / "kernel.json")
    assert back.pool == K.pool and torch.equal(back.q, K.q.double()) and torch.equal(back.S, K.S.double())
    assert [back.dpp(k) for k in range(1, 5)] == [K.dpp(k) for k in range(1, 5)]
    (tmp_path / "bad.json").write_text('{"pool": ["a"], "q": [1.0, 0.5], "S": [[1.0]]}')
    with pytest.raises(ValueError, match="pool of 1"):
        Kernel.load(tmp_path / "bad.json")
