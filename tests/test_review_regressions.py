"""Edge cases found in review: non-batch-first embeddings (T5), torch's RMSNorm, K-FAC scaling, tied weights in
learned merges, generation side effects, low-precision TIES thresholds, file permissions, empty DPP MAP."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

from modelmerge.curvature.estimate import diagonal_fisher, layer_factors
from modelmerge.io import save_state_dict
from modelmerge.merge import supermerge, ties
from modelmerge.merge.ties import _kth_largest, ties_thresholds
from modelmerge.models import tiny_model, train_tokenizer
from modelmerge.select import dpp_kernel, greedy_map, quality_scores, similarity_matrix
from modelmerge.train import text_batches

warnings.filterwarnings("ignore", message=".*token_id.*")
TEXTS = [f"word{i % 7} word{(3 * i) % 11} word{(5 * i) % 13} end" for i in range(40)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=64)


def close(a, b, rtol=1e-5):
    scale = max(float(v.norm()) for v in b.values())
    for k in b:
        if float(b[k].norm()) > 1e-9 * scale:
            assert float((a[k] - b[k]).norm()) <= rtol * float(b[k].norm()), k


@pytest.mark.parametrize("n", [4, 6])  # 4 = the sequence length: the case a shape check cannot tell apart
def test_t5_relative_attention_bias_falls_back_to_the_loop(tok, n):
    model = tiny_model("t5", tok.vocab_size, task="classification")
    batch = text_batches(tok, TEXTS[:n], [i % 2 for i in range(n)], n, 16)[0]
    batch["input_ids"][:, -1] = tok.eos_token_id  # T5's classifier reads the <eos> position
    assert batch["input_ids"].shape[1] == 4 and model.config.eos_token_id == tok.eos_token_id
    with pytest.warns(UserWarning, match="per-example loop"):
        hooks = diagonal_fisher(model, [batch], progress=False, device="cpu").f_sum
    loop = diagonal_fisher(model, [batch], method="loop", progress=False, device="cpu").f_sum
    close(hooks, loop)


class RMSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.RMSNorm(8)  # eps=None by default
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.norm(self.emb(input_ids))).mean(1)


def test_torch_rmsnorm_with_default_eps():
    torch.manual_seed(0)
    model = RMSNet()
    batch = {"input_ids": torch.randint(0, 20, (5, 6)), "labels": torch.randint(0, 3, (5,))}
    close(diagonal_fisher(model, [batch], progress=False, device="cpu").f_sum,
          diagonal_fisher(model, [batch], method="loop", progress=False, device="cpu").f_sum)


def test_kfac_input_factor_is_per_token_and_output_factor_per_example():
    torch.manual_seed(1)
    model = RMSNet()
    ids = torch.randint(0, 20, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 3:] = 0
    f = layer_factors(model, [{"input_ids": ids, "attention_mask": mask, "labels": torch.arange(5) % 3}],
                      kind="kfac", progress=False, device="cpu")
    z = model.norm(model.emb(ids)).detach()[mask.bool()]
    torch.testing.assert_close(f.A["head.weight"], z.T @ z / 27)  # 27 unpadded tokens
    g = layer_factors(model, [{"input_ids": ids, "attention_mask": mask}], kind="gram", progress=False, device="cpu")
    torch.testing.assert_close(g.A["head.weight"], z.T @ z / 5)  # RegMean's Gram: per example


def test_tied_lm_head_gets_no_factors_and_supermerge_handles_tied_weights(tok):
    model = tiny_model("llama", tok.vocab_size, task="causal_lm")
    batches = text_batches(tok, TEXTS, None, 20, 16, task="causal_lm")
    f = layer_factors(model, batches, kind="kfac", task="causal_lm", progress=False, device="cpu")
    assert "lm_head.weight" not in f.A and "model.layers.0.mlp.down_proj.weight" in f.A
    from modelmerge.curvature.hooks import LayerHooks

    # never accumulated either: for a real vocabulary the head's output factor would be V x V (49,152^2 for SmolLM2)
    assert "lm_head" not in LayerHooks(model, "kfac").modules and "lm_head" in LayerHooks(model, "sq_grad").modules
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tasks = [{k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()} for _ in range(2)]
    for t in tasks:
        t["lm_head.weight"] = t["model.embed_tokens.weight"]
    result = supermerge(base, tasks, model, batches, objective="causal_lm", epochs=2, lr=0.05, progress=False)
    assert torch.equal(result.state["lm_head.weight"], result.state["model.embed_tokens.weight"])
    assert result.coefficients.shape[1] == sum(1 for k, v in base.items() if v.is_floating_point()) - 1


def test_generate_leaves_the_tokenizer_as_it_was(tok):
    from modelmerge.evaluate import generate

    model = tiny_model("llama", tok.vocab_size, task="causal_lm")
    side = tok.padding_side
    a = generate(model, tok, ["word1 word2", "word3"], prefix="", max_new_tokens=3, seed=7)
    assert tok.padding_side == side
    assert a == generate(model, tok, ["word1 word2", "word3"], prefix="", max_new_tokens=3, seed=7)


def test_ties_threshold_uses_the_compute_dtype_for_low_precision_models():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4000, generator=gen).to(torch.bfloat16)}
    model = {"w": (base["w"].float() + torch.randn(4000, generator=gen)).to(torch.bfloat16)}
    diff = (model["w"].float() - base["w"].float()).abs()
    assert ties_thresholds(base, [model], 0.2) == [_kth_largest(diff, 0.2)]
    kept = (ties(base, [model], k=0.2)["w"].float() != base["w"].float()).float().mean()
    assert abs(float(kept) - 0.2) < 0.005


def test_written_files_get_the_usual_permissions(tmp_path):
    save_state_dict({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_unconstrained_map_with_unit_quality_is_empty_and_says_so():
    reps = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    L = dpp_kernel(quality_scores([0.9, 0.8, 0.85, 0.7], 0.5), similarity_matrix(reps))
    with pytest.warns(UserWarning, match="empty set"):
        assert greedy_map(L) == []
    assert len(greedy_map(L, k=2)) == 2
