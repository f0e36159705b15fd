"""Curvature estimators: per-example hooks against a batch-size-1 loop, analytic Fishers, K-FAC, Grams, files."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from modelmerge.curvature import KFAC
from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors, diagonal_fisher, fisher_and_kfac, layer_factors

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id must be.*")


def tiny_bert(num_labels=3):
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def tiny_llama(tie=False):
    cfg = transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def padded_batch(n=6, s=10, vocab=40, labels=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, s), generator=gen)
    lengths = torch.tensor([s, 7, s, 3, 9, 5][:n])
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids = ids * mask
    batch = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.randint(0, labels, (n,), generator=gen)
    return batch


def unpadded_singles(batch):
    """The same examples one by one, each cut to its own length (no padding at all)."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        one = {k: v[i : i + 1, :length] if v.ndim == 2 else v[i : i + 1] for k, v in batch.items()}
        out.append(one)
    return out


def assert_fisher_close(a: dict, b: dict, rtol=1e-5):
    """Per tensor ||a - b|| <= rtol ||b||; tensors whose true value is round-off (e.g. attention key biases,
    which get no gradient through softmax) must be round-off in both."""
    assert a.keys() == b.keys()
    scale = max(float(v.norm()) for v in b.values())
    for k in b:
        if float(b[k].norm()) > 1e-9 * scale:
            assert float((a[k] - b[k]).norm()) <= rtol * float(b[k].norm()), k
        else:
            assert float(a[k].norm()) <= 1e-8 * scale, k


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_bert_hooks_equal_batch_size_one_loop(fisher):
    model, batch = tiny_bert(), padded_batch(vocab=50, labels=3)
    hooks = diagonal_fisher(model, [batch], fisher=fisher, progress=False, device="cpu")
    loop = diagonal_fisher(model, [batch], fisher=fisher, method="loop", progress=False, device="cpu")
    assert hooks.n == loop.n == 6
    assert_fisher_close(hooks.f_sum, loop.f_sum)
    # with padding in the batch = without padding, one example at a time
    singles = diagonal_fisher(model, unpadded_singles(batch), fisher=fisher, method="loop", progress=False, device="cpu")
    assert_fisher_close(hooks.f_sum, singles.f_sum)


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2], ids=["llama", "llama-tied", "gpt2"])
def test_causal_lm_per_sequence_fisher_equals_loop_with_and_without_padding(make):
    model, batch = make(), padded_batch()
    hooks = diagonal_fisher(model, [batch], task="causal_lm", progress=False, device="cpu")
    loop = diagonal_fisher(model, unpadded_singles(batch), task="causal_lm", method="loop", progress=False, device="cpu")
    assert_fisher_close(hooks.f_sum, loop.f_sum)
    assert set(hooks.f_sum) == {n for n, _ in model.named_parameters(remove_duplicate=False)}


def test_tied_head_fisher_block_by_block_equals_loop(monkeypatch):
    """The CPU path in blocks of one weight row at a time (embedding rows scattered into each block) = the loop."""
    import modelmerge.curvature.hooks as hooks

    monkeypatch.setattr(hooks, "CPU_BLOCK_BYTES", 1)  # one row per block: every scatter crosses block bounds
    model, batch = tiny_llama(tie=True), padded_batch()
    blocked = diagonal_fisher(model, [batch], task="causal_lm", progress=False, device="cpu")
    loop = diagonal_fisher(model, unpadded_singles(batch), task="causal_lm", method="loop", progress=False, device="cpu")
    assert_fisher_close(blocked.f_sum, loop.f_sum)


class SoftmaxRegression(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        self.linear = nn.Linear(d, c)

    def forward(self, x):
        return self.linear(x)


def softmax_problem(n=40, d=4, c=3, seed=2):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SoftmaxRegression(d, c).double()
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return model, {"x": x, "labels": torch.randint(0, c, (n,), generator=gen)}


def test_exact_fisher_of_softmax_regression_is_analytic():
    """diag F = sum_n p_nc (1 - p_nc) x_ni^2 for W_ci, and sum_n p_nc (1 - p_nc) for b_c."""
    model, batch = softmax_problem()
    f = diagonal_fisher(model, [batch], fisher="exact", progress=False, device="cpu")
    p = torch.softmax(model(batch["x"]), -1).detach()
    v = p * (1 - p)
    torch.testing.assert_close(f.f_sum["linear.weight"].double(), v.T @ batch["x"] ** 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(f.f_sum["linear.bias"].double(), v.sum(0), rtol=1e-5, atol=0)


def test_sampled_fisher_is_seeded_and_averages_to_the_exact_fisher():
    model, batch = softmax_problem(n=10)
    one = diagonal_fisher(model, [batch], fisher="sampled", seed=3, progress=False, device="cpu").f_sum
    again = diagonal_fisher(model, [batch], fisher="sampled", seed=3, progress=False, device="cpu").f_sum
    other = diagonal_fisher(model, [batch], fisher="sampled", seed=4, progress=False, device="cpu").f_sum
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    exact = diagonal_fisher(model, [batch], fisher="exact", progress=False, device="cpu").f_sum["linear.weight"]
    mc = diagonal_fisher(model, [batch] * 2000, fisher="sampled", seed=5, progress=False, device="cpu")
    torch.testing.assert_close(mc.mean()["linear.weight"] * 10, exact, rtol=0.1, atol=0)


def test_kfac_is_the_exact_fisher_of_a_linear_layer_on_one_example():
    model, batch = softmax_problem(n=1, d=5, c=4)
    factors = layer_factors(model, [batch], kind="kfac", progress=False, device="cpu")
    (h,) = factors.curvature().values()
    assert isinstance(h, KFAC)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch["x"]), batch["labels"]).backward()
    g = model.linear.weight.grad.reshape(-1)  # row-major vec of the out x in weight
    torch.testing.assert_close(h.to_dense(model.linear.weight).double(), torch.outer(g, g), rtol=1e-6, atol=1e-12)


class EmbedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.proj(self.embed(input_ids)).mean(1)


def test_gram_is_input_covariance_over_unpadded_tokens_divided_by_n():
    torch.manual_seed(3)
    model, batch = EmbedLinear(), padded_batch(vocab=30)
    grams = layer_factors(model, [batch, batch], kind="gram", progress=False, device="cpu")
    z = model.embed(batch["input_ids"]).detach()[batch["attention_mask"].bool()]
    torch.testing.assert_close(grams.A["proj.weight"], 2 * z.T @ z / 12)
    assert grams.n == 12 and grams.in_axis == {"proj.weight": 1}


def test_curvature_files_round_trip_with_metadata(tmp_path):
    model, batch = tiny_gpt2(), padded_batch()
    f = diagonal_fisher(model, [batch], task="causal_lm", progress=False, device="cpu", data="fixture")
    f.save(tmp_path / "fisher.safetensors")
    g = DiagonalFisher.load(tmp_path / "fisher.safetensors")
    assert g.n == 6 and g.meta["data"] == "fixture" and g.meta["estimator"] == "diagonal empirical Fisher"
    assert all(torch.equal(f.f_sum[k], g.f_sum[k]) for k in f.f_sum)
    torch.testing.assert_close(g.mean()["lm_head.weight"], f.f_sum["lm_head.weight"] / 6)
    k = layer_factors(model, [batch], kind="kfac", task="causal_lm", progress=False, device="cpu")
    k.save(tmp_path / "kfac.safetensors")
    k2 = LayerFactors.load(tmp_path / "kfac.safetensors")
    assert k2.kind == "kfac" and k2.in_axis == k.in_axis and k2.in_axis["transformer.h.0.attn.c_attn.weight"] == 0
    assert all(torch.equal(k.A[n], k2.A[n]) and torch.equal(k.B[n], k2.B[n]) for n in k.A)
    with pytest.raises(ValueError, match="does not hold Gram or K-FAC"):
        LayerFactors.load(tmp_path / "fisher.safetensors")


@pytest.mark.parametrize("chunk,block_rows", [(1, 3), (1, None), (4, None), (3, 5)])
def test_square_sum_of_factored_and_scattered_per_example_gradients_equals_dense(chunk, block_rows):
    """sum_n (L_n R_n + L'_n R'_n + scatter_n)^2 formed block by block equals the dense per-example reference."""
    from modelmerge.curvature.hooks import square_sum_into

    gen = torch.Generator().manual_seed(0)
    n, rows, cols, t = 7, 11, 4, 3
    mm = [("mm", torch.randn(n, rows, t, generator=gen, dtype=torch.float64),
           torch.randn(n, t, cols, generator=gen, dtype=torch.float64)) for _ in range(2)]
    ids = torch.randint(0, rows, (n, 5), generator=gen)  # repeated ids within an example add up
    values = torch.randn(n, 5, cols, generator=gen, dtype=torch.float64)
    dense = sum(torch.bmm(left, right) for _, left, right in mm)
    for e in range(n):
        dense[e].index_add_(0, ids[e], values[e])
    keys = (torch.arange(n)[:, None] * rows + ids).reshape(-1)
    order = torch.argsort(keys)
    acc = torch.ones(rows, cols, dtype=torch.float64)  # adds to what is there
    square_sum_into(acc, [mm[0], ("rows", keys[order], values.reshape(-1, cols)[order]), mm[1]], n, chunk, block_rows)
    torch.testing.assert_close(acc, 1 + (dense * dense).sum(0))


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
@pytest.mark.parametrize("model_kind", ["bert", "llama-tied"])
def test_one_pass_fisher_and_kfac_equal_the_two_separate_estimators(fisher, model_kind):
    """One forward/backward feeding both hooks = diagonal_fisher and layer_factors(kfac), same seed and labels."""
    if model_kind == "bert":
        model, task, batches = tiny_bert(), "classification", [padded_batch(labels=3), padded_batch(labels=3, seed=2)]
    else:
        model, task, batches = tiny_llama(tie=True), "causal_lm", [padded_batch(), padded_batch(seed=2)]
    joint_f, joint_k = fisher_and_kfac(model, batches, task=task, fisher=fisher, seed=5, progress=False, device="cpu")
    alone_f = diagonal_fisher(model, batches, task=task, fisher=fisher, seed=5, progress=False, device="cpu")
    alone_k = layer_factors(model, batches, kind="kfac", task=task, fisher=fisher, seed=5, progress=False, device="cpu")
    assert joint_f.n == alone_f.n == joint_k.n == alone_k.n == 12
    assert set(joint_f.f_sum) == set(alone_f.f_sum) and set(joint_k.A) == set(alone_k.A) == set(alone_k.B)
    for k in alone_f.f_sum:
        torch.testing.assert_close(joint_f.f_sum[k], alone_f.f_sum[k], rtol=1e-6, atol=0)
    for k in alone_k.A:
        torch.testing.assert_close(joint_k.A[k], alone_k.A[k], rtol=1e-6, atol=0)
        torch.testing.assert_close(joint_k.B[k], alone_k.B[k], rtol=1e-6, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # both hooks restored the model


@pytest.mark.parametrize("kind", ["gram", "kfac"])
def test_layers_fed_one_tensor_share_its_input_sum_and_each_keeps_its_own(kind):
    # llama's query/key/value (and gate/up) projections read the same tensor: the hooks compute its z z^T once;
    # every layer's A must still be the sum over its own unpadded inputs (reference: plain forward hooks)
    from modelmerge.models import tiny_model

    model = tiny_model("llama", 40, task="causal_lm", seed=2)
    batches = [padded_batch(seed=1), padded_batch(seed=4)]
    ref, tokens = {}, {}
    handles = [m.register_forward_hook(lambda m, a, o, name=name: ref.setdefault(name, []).append(a[0].detach()))
               for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    sums = {}
    for name, xs in ref.items():
        z = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches)])
        sums[f"{name}.weight"], tokens[f"{name}.weight"] = z.T @ z, z.shape[0]
    factors = layer_factors(model, batches, kind=kind, task="causal_lm", progress=False, device="cpu")
    assert set(factors.A) == set(sums)
    for name, s in sums.items():
        norm = factors.n if kind == "gram" else tokens[name]
        torch.testing.assert_close(factors.A[name], s / norm, rtol=1e-5, atol=1e-6)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(factors.A[q], factors.A[q.replace("q_proj", "v_proj")]) and not torch.allclose(factors.A[q], factors.A[o])


def test_kfac_on_every_kth_batch_is_layer_factors_of_those_batches_and_the_fisher_of_all():
    model = tiny_llama(tie=True)
    batches = [padded_batch(seed=s) for s in (2, 3, 4)]
    f, k = fisher_and_kfac(model, batches, task="causal_lm", progress=False, device="cpu", kfac_every=2)
    alone_f = diagonal_fisher(model, batches, task="causal_lm", progress=False, device="cpu")
    alone_k = layer_factors(model, batches[::2], kind="kfac", task="causal_lm", progress=False, device="cpu")
    assert f.n == 18 and k.n == alone_k.n == 12 and k.meta["subsample"] == "batches 0, 2, 4, ..."
    for name in alone_f.f_sum:
        torch.testing.assert_close(f.f_sum[name], alone_f.f_sum[name], rtol=1e-6, atol=0)
    for name in alone_k.A:
        torch.testing.assert_close(k.A[name], alone_k.A[name], rtol=1e-6, atol=0)
        torch.testing.assert_close(k.B[name], alone_k.B[name], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="kfac_every"):
        fisher_and_kfac(model, batches, task="causal_lm", progress=False, device="cpu", kfac_every=0)
    # sampled labels are drawn for every batch, recorded or not: the Fisher is still diagonal_fisher's
    f, _ = fisher_and_kfac(model, batches, task="causal_lm", fisher="sampled", seed=3, progress=False, device="cpu",
                           kfac_every=2)
    alone_f = diagonal_fisher(model, batches, task="causal_lm", fisher="sampled", seed=3, progress=False, device="cpu")
    for name in alone_f.f_sum:
        torch.testing.assert_close(f.f_sum[name], alone_f.f_sum[name], rtol=1e-6, atol=0)


def test_an_input_changed_in_place_between_two_layers_gets_its_own_input_sum():
    class TwoReads(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask=None):
            x = input_ids.float()
            a = self.first(x)
            x.mul_(2.0)  # same tensor object, new version: the cached z z^T must not be reused
            return torch.cat([a, self.second(x)], -1)

    batch = {"input_ids": torch.arange(12).reshape(3, 4) % 5}
    grams = layer_factors(TwoReads(), [batch], kind="gram", progress=False, device="cpu")
    z = batch["input_ids"].float()
    torch.testing.assert_close(grams.A["first.weight"], z.T @ z / 3)
    torch.testing.assert_close(grams.A["second.weight"], 4 * z.T @ z / 3)
