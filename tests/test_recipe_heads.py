"""Curvature for encoders and any head: the folder's own architecture gives the loss and the parameter names (a
masked LM's Fisher carries exactly the checkpoint's names and equals the library's estimate on the same masked
batches); a folder without a head, a head that is not the recipe's task, or a checkpoint that lacks or adds weights
is refused by the dry run, before anything is estimated."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

from modelmerge.cli import main
from modelmerge.io import LazySafetensors
from modelmerge.models import train_tokenizer
from modelmerge.train import masked_lm_batches

warnings.filterwarnings("ignore", message=".*token_id.*")
TEXTS = [f"word{i % 7} word{(3 * i) % 11} word{(5 * i) % 13} end" for i in range(40)]


def tokenizer():
    tok = train_tokenizer(TEXTS, vocab_size=64)
    tok.add_special_tokens({"mask_token": "[MASK]"})
    return tok


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory):
    """mlm_base/, mlm_a/, mlm_b/ (tiny BertForMaskedLM: the base and seeded task vectors), enc_a/, enc_b/ (headless
    BertModel, the MiniLM layout) and data.csv."""
    root = tmp_path_factory.mktemp("bert")
    tok = tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    for i, name in enumerate(["mlm_base", "mlm_a", "mlm_b"]):
        torch.manual_seed(0)
        model = transformers.BertForMaskedLM(config)
        if i:
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
    for i, name in enumerate(["enc_a", "enc_b"]):
        torch.manual_seed(i)
        transformers.BertModel(config).save_pretrained(root / name, safe_serialization=True)
        tok.save_pretrained(root / name)
    pd.DataFrame({"text": TEXTS}).to_csv(root / "data.csv", index=False)
    return root


def float_names(folder) -> set[str]:
    lazy = LazySafetensors(folder / "model.safetensors")
    return {k for k in lazy if lazy.info(k)[0].is_floating_point}


def test_masked_lm_batches_mask_only_real_tokens_seeded_at_least_one_per_text():
    tok = tokenizer()
    a = masked_lm_batches(tok, TEXTS, 8, 16, probability=0.3, seed=5)
    b = masked_lm_batches(tok, TEXTS, 8, 16, probability=0.3, seed=5)
    special = set(tok.all_special_ids)
    n_masked = n_real = 0
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)  # seeded
        masked = x["labels"] != -100
        assert masked.any(-1).all()  # at least one masked token per text
        assert (x["input_ids"][masked] == tok.mask_token_id).all()
        assert not any(int(t) in special for t in x["labels"][masked])  # never a special or padding token
        assert (x["attention_mask"][masked] == 1).all()
        n_masked += int(masked.sum())
        n_real += int(((x["attention_mask"] == 1) & ~torch.isin(x["labels"].where(masked, x["input_ids"]),
                                                                 torch.tensor(sorted(special)))).sum())
    assert 0.2 < n_masked / n_real < 0.45  # about the probability (plus the at-least-one rule)
    with pytest.raises(ValueError, match="mask token"):
        masked_lm_batches(train_tokenizer(TEXTS, vocab_size=64), TEXTS, 8, 16)


def test_a_masked_lm_fisher_carries_the_checkpoints_names_and_equals_the_library_estimate(bert_folders, tmp_path):
    from modelmerge.curvature.estimate import diagonal_fisher

    out = tmp_path / "a.fisher.safetensors"
    assert main(["curvature", str(bert_folders / "mlm_a"), str(bert_folders / "data.csv"), str(out), "--task", "masked_lm",
                 "--max-length", "16", "--batch-size", "8", "--device", "cpu"]) == 0
    estimated = load_file(out)
    assert set(estimated) == float_names(bert_folders / "mlm_a")  # no prefix added or lost, no tied alias
    model = transformers.BertForMaskedLM.from_pretrained(bert_folders / "mlm_a")
    batches = masked_lm_batches(tokenizer(), TEXTS, 8, 16, probability=0.15, seed=0)
    expected = diagonal_fisher(model, batches, task="masked_lm", progress=False, device="cpu").sum()
    for k, v in estimated.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-9)
    assert estimated["cls.predictions.transform.dense.weight"].abs().sum() > 0  # the head's curvature, from data


def test_a_recipe_estimates_masked_lm_fishers_and_merges_them_as_the_library_does(bert_folders, tmp_path):
    from modelmerge.curvature.estimate import diagonal_fisher
    from modelmerge.merge import fisher_average

    recipe = {"method": "fisher_average", "models": [{"model": "mlm_a", "data": "data.csv"}, {"model": "mlm_b", "data": "data.csv"}],
              "curvature": {"task": "masked_lm", "max_length": 16, "batch_size": 8}}
    path = bert_folders / "mlm_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "merged"
    assert main(["merge", str(path), str(out), "--device", "cpu"]) == 0
    merged = transformers.BertForMaskedLM.from_pretrained(out).state_dict()
    names = sorted(float_names(bert_folders / "mlm_a"))
    models, fishers = [], []
    for name in ("mlm_a", "mlm_b"):
        model = transformers.BertForMaskedLM.from_pretrained(bert_folders / name)
        batches = masked_lm_batches(tokenizer(), TEXTS, 8, 16, seed=0)
        f = diagonal_fisher(model, batches, task="masked_lm", progress=False, device="cpu").sum()
        fishers.append({k: f[k] for k in names})
        models.append({k: model.state_dict()[k] for k in names})
    expected = fisher_average(models, fishers)
    for k in names:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-5, atol=1e-6)


def _recipe(folder, models, task="causal_lm"):
    path = folder / f"recipe_{models[0]}_{task}.yaml"
    path.write_text(yaml.safe_dump({"method": "fisher_average", "curvature": {"task": task},
                                    "models": [{"model": m, "data": "data.csv"} for m in models]}))
    return path


def test_a_headless_encoder_with_data_is_refused_by_the_dry_run_naming_what_is_missing(bert_folders, tmp_path, capsys):
    path = _recipe(bert_folders, ["enc_a", "enc_b"])
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "models[0].data" in err and "BertModel" in err and "head" in err and "curvature: instead of data:" in err
    assert main(["curvature", str(bert_folders / "enc_a"), str(bert_folders / "data.csv"), str(tmp_path / "f.safetensors"),
                 "--dry-run"]) == 1
    assert "BertModel" in capsys.readouterr().err and not (tmp_path / "f.safetensors").exists()


def test_a_head_that_is_not_the_recipes_task_is_refused_naming_the_task_it_has(bert_folders, tmp_path, capsys):
    path = _recipe(bert_folders, ["mlm_a", "mlm_b"], task="causal_lm")
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "BertForMaskedLM" in err and "curvature.task: masked_lm" in err


@pytest.mark.parametrize("damage", ["drop the head's weight", "add a tensor"])
def test_a_checkpoint_missing_or_adding_weights_is_refused_before_estimation(bert_folders, tmp_path, capsys, damage):
    import shutil

    for name in ("mlm_a", "mlm_b"):
        shutil.copytree(bert_folders / name, tmp_path / name)
    shutil.copy(bert_folders / "data.csv", tmp_path / "data.csv")
    weights = load_file(tmp_path / "mlm_a" / "model.safetensors")
    if damage == "add a tensor":
        weights["extra.adapter.weight"] = torch.zeros(2, 2)
        expected = "extra.adapter.weight"
    else:
        del weights["cls.predictions.transform.dense.weight"]
        expected = "cls.predictions.transform.dense.weight"
    save_file(weights, tmp_path / "mlm_a" / "model.safetensors", metadata={"format": "pt"})
    path = _recipe(tmp_path, ["mlm_a", "mlm_a"], task="masked_lm")
    assert main(["merge", str(path), str(tmp_path / "out"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "models[0].data" in err
