"""The paper suite (DESIGN.md section 7) end to end on a tiny random CLIP and a few tiny images of three real tasks.

Data are prepared by ``prepare_suite_data`` itself, with the hub loader pointed at local hub-format parquet files;
then pretrained tower, zero-shot heads, released and trained fine-tunes, scoring, merging and curvature run as the
workflow runs them, and each is checked against the mathematics it claims (no network).
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from modelmerge.clip import ImageBatches, load_clip, zero_shot_head  # noqa: E402
from modelmerge.data.vision import class_names, templates, validation_split  # noqa: E402
from modelmerge.experiments.suite import (  # noqa: E402
    SuiteEvaluator,
    accuracies,
    batches_of,
    fit_heads,
    load_encoder,
    load_suite_model,
    prepare_suite_data,
    read_classes,
    read_predictions,
    split_frame_of,
    suite_curvature,
    suite_finetune,
    suite_modality,
    suite_pretrained,
)
from modelmerge.heads import EncoderClassifier, LinearHead, encode  # noqa: E402
from modelmerge.io import load_state_dict  # noqa: E402
from modelmerge.merge import task_arithmetic  # noqa: E402

# the hub-format fixtures of the vision tests (tests/ is not a package: load the module by path)
_spec = importlib.util.spec_from_file_location("_vision_suite_fixtures", Path(__file__).with_name("test_vision_suite.py"))
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

TASKS = ["mnist", "eurosat", "dtd"]
CAPS = {"train": 12, "validation": 6, "test": 6}
VALIDATION = 0.2  # of the fixture's 30 hub training rows: 6 validation, 24 train capped to 12
MAX_LENGTH = 16  # unused by images, passed as the workflow passes it
TRAIN = {"epochs": 1, "lr": 1e-3, "batch_size": 6, "warmup_steps": 0}


def _tiny_clip(folder: Path) -> Path:
    """A random CLIPModel with a byte-level CLIP tokenizer and a CLIP image processor (as test_vision_suite's)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {s: i for i, s in enumerate(symbols)}
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=8)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=8, logit_scale_init_value=2.0,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _image_features(clip, pixel_values):
    """CLIPModel.get_image_features as a tensor (transformers 4 returns one; 5 an output with pooler_output)."""
    out = clip.get_image_features(pixel_values=pixel_values)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Prepared data (through prepare_suite_data), the pretrained tower and the zero-shot heads of three tasks."""
    import modelmerge.data.vision as vision

    root = tmp_path_factory.mktemp("paper-suite")
    clip_dir = _tiny_clip(root / "clip")
    hub = {t: vs._hub_repo(root / "hub", t, seed=i)[1] for i, t in enumerate(TASKS)}
    real_loader = vision.load_vision_task
    calls = []

    def offline_loader(name, *, seed, validation_fraction):  # the hub loader, reading the local hub-format files
        calls.append(name)
        return real_loader(name, data_files=hub[name], seed=seed, validation_fraction=validation_fraction,
                           cache_dir=str(root / "cache"))

    data = root / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vision, "load_vision_task", offline_loader)
        splits, classes = prepare_suite_data(TASKS, "unused", str(data), seed=0, validation=VALIDATION, caps=CAPS,
                                             min_condition=1)
    assert calls == TASKS
    pretrained, heads = root / "models" / "pretrained", root / "heads"
    suite_pretrained(str(clip_dir), str(pretrained), "", str(data), seed=0)
    table = fit_heads(str(pretrained), str(data), str(heads), TASKS, max_length=MAX_LENGTH, l2=1e-3,
                      clip_source=str(clip_dir))
    return {"root": root, "clip": clip_dir, "hub": hub, "data": data, "splits": splits, "classes": classes,
            "pretrained": pretrained, "heads": heads, "models": root / "models", "table": table}


def _evaluator(s) -> SuiteEvaluator:
    return SuiteEvaluator(str(s["pretrained"]), str(s["heads"]), str(s["data"]), TASKS, max_length=MAX_LENGTH)


def _tuned_tower(pretrained_state: dict, seed: int = 3) -> dict:
    """A 'published fine-tune': every vision_model.* weight moved, the projection left pretrained."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=gen) if k.startswith("vision_model.") else v.clone()
            for k, v in pretrained_state.items()}


@pytest.fixture(scope="module")
def released(suite):
    """The mnist model from a released tower (hub legacy layout), and the eurosat model trained with frozen heads."""
    s = suite
    theta0 = load_state_dict(s["pretrained"] / "model.safetensors")
    tuned = _tuned_tower(theta0)
    vs._legacy_checkpoint(s["root"] / "hub-model" / "legacy", tuned)
    ret = suite_finetune("mnist", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["data"]),
                         str(s["models"] / "mnist"), train=TRAIN, max_length=MAX_LENGTH,
                         released=str(s["root"] / "hub-model" / "legacy"))
    trained = suite_finetune("eurosat", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["data"]),
                             str(s["models"] / "eurosat"), train=TRAIN, max_length=MAX_LENGTH)
    return {"theta0": theta0, "tuned": tuned, "released": ret, "trained": trained}


# ---------------------------------------------------------------- data


def test_prepared_data_has_the_layout_of_prepare_suite_data(suite):
    s = suite
    assert read_classes(s["data"]) == {t: class_names(t) for t in TASKS} == s["classes"]
    assert json.loads((s["data"] / "classes.json").read_text()) == s["classes"]
    for t in TASKS:
        assert sorted(p.name for p in (s["data"] / t).iterdir()) == ["test.parquet", "train.parquet",
                                                                      "validation.parquet"]
        hub_train = pq.read_table(s["hub"][t]["train"]).to_pydict()
        hub_test = pq.read_table(s["hub"][t]["test"]).to_pydict()
        frames = {sp: split_frame_of(s["data"], t, sp) for sp in ("train", "validation", "test")}
        for sp, f in frames.items():
            assert list(f.columns) == ["image", "label"]
            pd.testing.assert_frame_equal(f, s["splits"][t][sp])
            assert f["label"].between(0, len(class_names(t)) - 1).all()
            for im in f["image"]:  # hub image structs with the encoded PNG
                assert set(im) == {"bytes", "path"} and im["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
                Image.open(io.BytesIO(im["bytes"])).load()
        assert [len(frames[sp]) for sp in ("train", "validation", "test")] == [12, 6, 6]
        # validation is FusionBench's seeded slice of the hub train split; train comes from the rest; test is the hub's
        train_idx, val_idx = validation_split(vs.N_TRAIN, VALIDATION, 0)
        hub_bytes = [im["bytes"] for im in hub_train["image"]]
        assert [im["bytes"] for im in frames["validation"]["image"]] == [hub_bytes[i] for i in val_idx]
        assert frames["validation"]["label"].tolist() == [hub_train["label"][i] for i in val_idx]
        rest = {hub_bytes[i]: hub_train["label"][i] for i in train_idx}
        assert all(rest.get(im["bytes"]) == y for im, y in zip(frames["train"]["image"], frames["train"]["label"]))
        assert [im["bytes"] for im in frames["test"]["image"]] == [im["bytes"] for im in hub_test["image"]]
        assert frames["test"]["label"].tolist() == hub_test["label"]


def test_suite_modality_of_paper_offline_unknown_and_mixed_tasks():
    assert suite_modality(TASKS) == "image"
    assert suite_modality(["airline", "drug_polarity"]) == "text"
    with pytest.raises(KeyError, match="imagenet"):
        suite_modality(["mnist", "imagenet"])
    with pytest.raises(ValueError, match="mix"):
        suite_modality(["mnist", "airline"])


def test_image_batches_of_a_split_frame_are_lazy_and_shuffle_by_seed(suite):
    s = suite
    _, processor = load_encoder(s["pretrained"])
    frame = split_frame_of(s["data"], "mnist", "train")
    batches = batches_of(processor, frame, 5, MAX_LENGTH)
    assert isinstance(batches, ImageBatches) and len(batches) == 3
    assert torch.cat([b["labels"] for b in batches]).tolist() == frame["label"].tolist()
    pixels = torch.cat([b["pixel_values"] for b in batches])
    reference = processor(images=[Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in frame["image"]],
                          return_tensors="pt")["pixel_values"]
    assert pixels.shape == (12, 3, 32, 32) and torch.equal(pixels, reference)  # grey digits become RGB
    shuffled = batches_of(processor, frame, 5, MAX_LENGTH, shuffle=True, seed=4)
    perm = np.random.default_rng(4).permutation(len(frame))
    assert torch.cat([b["labels"] for b in shuffled]).tolist() == frame["label"].to_numpy()[perm].tolist()
    assert torch.equal(torch.cat([b["pixel_values"] for b in shuffled]), reference[perm])


# ---------------------------------------------------------------- pretrained tower and zero-shot heads


@torch.no_grad()
def test_pretrained_tower_gives_clip_image_features_exactly(suite):
    s = suite
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    vision, processor = load_encoder(s["pretrained"])
    clip, _ = load_clip(s["clip"])
    assert isinstance(vision, CLIPVisionModelWithProjection) and isinstance(processor, CLIPImageProcessor)
    assert json.loads((s["pretrained"] / "config.json").read_text())["model_type"] == "clip_vision_model"
    assert json.loads((s["pretrained"] / "metrics.json").read_text()) == {"source": str(s["clip"])}
    clip_state = clip.state_dict()
    assert set(vision.state_dict()) == {k for k in clip_state if k.startswith(("vision_model.", "visual_projection."))}
    assert all(torch.equal(v, clip_state[k]) for k, v in vision.state_dict().items())
    for t in TASKS:
        for b in batches_of(processor, split_frame_of(s["data"], t, "test"), 4, MAX_LENGTH):
            assert torch.equal(vision(pixel_values=b["pixel_values"]).image_embeds,
                               _image_features(clip, b["pixel_values"]))


@torch.no_grad()
def test_fit_heads_writes_the_zero_shot_heads_bit_for_bit(suite):
    s = suite
    vision, processor = load_encoder(s["pretrained"])
    table = s["table"]
    assert table["task"].tolist() == TASKS
    assert table["classes"].tolist() == [len(class_names(t)) for t in TASKS] == [10, 10, 47]
    assert table["train examples"].tolist() == [12, 12, 12]
    for t in TASKS:
        head = LinearHead.load(s["heads"] / f"{t}.safetensors")
        ref = zero_shot_head(str(s["clip"]), class_names(t), templates(t))
        assert torch.equal(head.weight, ref.weight) and torch.equal(head.bias, ref.bias) and not head.bias.any()
        assert head.scale == ref.scale == pytest.approx(math.exp(2.0), rel=1e-6)
        assert head.classes == class_names(t)
        # the reported validation accuracy: argmax of the head on the pretrained tower's unit-norm image embeddings
        val = split_frame_of(s["data"], t, "validation")
        model = EncoderClassifier(vision, {t: head}, pooling="clip")
        f = encode(model, batches_of(processor, val, 64, MAX_LENGTH))
        emb = torch.cat([vision(pixel_values=b["pixel_values"]).image_embeds
                         for b in batches_of(processor, val, 64, MAX_LENGTH)])
        torch.testing.assert_close(f, F.normalize(emb, dim=-1), rtol=0, atol=0)
        acc = float((head(f).argmax(-1).numpy() == val["label"].to_numpy()).mean())
        assert table.set_index("task").loc[t, "validation accuracy, zero-shot head"] == acc
    # the same accuracies as the evaluator scores the pretrained state with
    ev = _evaluator(s)
    pre = ev.accuracy(load_state_dict(s["pretrained"] / "model.safetensors"), "validation")
    assert {t: pre[t] for t in TASKS} == dict(zip(table["task"], table["validation accuracy, zero-shot head"]))


def test_fit_heads_of_an_image_encoder_needs_the_clip_source(suite, tmp_path):
    s = suite
    with pytest.raises(ValueError, match="clip_source"):
        fit_heads(str(s["pretrained"]), str(s["data"]), str(tmp_path), ["mnist"], max_length=MAX_LENGTH, l2=1e-3)
    assert not (tmp_path / "mnist.safetensors").exists()


def test_fit_heads_refuses_a_clip_source_whose_tower_is_not_the_encoder(suite, tmp_path):
    """Zero-shot heads of another CLIP would not fit the encoder: refused before any head is written."""
    import torch
    from transformers import CLIPModel

    s = suite
    other = CLIPModel.from_pretrained(str(s["clip"]))
    with torch.no_grad():
        other.visual_projection.weight.mul_(1.5)
    other.save_pretrained(tmp_path / "other")
    for f in s["clip"].iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            (tmp_path / "other" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="is not the pretrained encoder"):
        fit_heads(str(s["pretrained"]), str(s["data"]), str(tmp_path / "heads"), ["mnist"], max_length=MAX_LENGTH,
                  l2=1e-3, clip_source=str(tmp_path / "other"))
    assert not (tmp_path / "heads" / "mnist.safetensors").exists()


# ---------------------------------------------------------------- fine-tunes


def test_released_tower_is_saved_with_the_pretrained_projection_and_scored_as_the_evaluator_scores_it(suite, released):
    s, r = suite, released
    theta0, tuned = r["theta0"], r["tuned"]
    saved = load_state_dict(s["models"] / "mnist" / "model.safetensors")
    assert set(saved) == set(theta0)
    assert all(torch.equal(saved[k], tuned[k]) for k in saved), "saved encoder is not the released tower"
    assert torch.equal(saved["visual_projection.weight"], theta0["visual_projection.weight"])
    assert any(not torch.equal(saved[k], theta0[k]) for k in saved if k.startswith("vision_model."))
    assert r["released"]["steps"] == 0 and r["released"]["seconds"] == 0.0
    metrics = json.loads((s["models"] / "mnist" / "metrics.json").read_text())
    assert metrics["released"].endswith("legacy") and metrics["tasks"] == ["mnist"]
    ev = _evaluator(s)
    for split, scored in (("validation", ["mnist"]), ("test", TASKS)):  # validation: its own task only
        preds = read_predictions(s["models"], "mnist", split)
        logits = ev.logits(saved, split)
        assert set(preds) == set(scored)
        for t in scored:
            assert preds[t].shape == (len(ev.labels[split][t]), len(class_names(t)))
            torch.testing.assert_close(preds[t], logits[t], rtol=1e-6, atol=1e-6)
        acc = accuracies(preds, {t: ev.labels[split][t] for t in scored})
        assert acc == accuracies({t: logits[t] for t in scored}, {t: ev.labels[split][t] for t in scored})
        assert {t: acc[t] for t in scored} == {t: metrics["accuracy"][f"{split}/{t}"] for t in scored}
        assert {t: acc[t] for t in scored} == {t: r["released"]["accuracy"][f"{split}/{t}"] for t in scored}


def test_released_tower_in_the_transformers_save_pretrained_layout_gives_the_same_model(suite, released, tmp_path):
    from transformers import CLIPVisionModel

    s, r = suite, released
    vision, _ = load_encoder(s["pretrained"])
    plain = CLIPVisionModel(vision.config)
    keys = set(plain.state_dict())  # vision_model.* (transformers 4) or the same keys without the prefix (5)
    plain.load_state_dict({k if k in keys else k[len("vision_model."):]: v for k, v in r["tuned"].items()
                           if k.startswith("vision_model.")}, strict=True)
    plain.save_pretrained(tmp_path / "plain")
    suite_finetune("mnist", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["data"]), str(tmp_path / "mnist"),
                   train=TRAIN, max_length=MAX_LENGTH, released=str(tmp_path / "plain"))
    a = load_state_dict(tmp_path / "mnist" / "model.safetensors")
    b = load_state_dict(s["models"] / "mnist" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    for split in ("validation", "test"):
        pa_, pb = read_predictions(tmp_path, "mnist", split), read_predictions(s["models"], "mnist", split)
        assert pa_.keys() == pb.keys() and all(torch.equal(pa_[t], pb[t]) for t in pa_)


def test_training_with_frozen_zero_shot_heads_changes_only_the_encoder(suite, released):
    s, r = suite, released
    theta0 = r["theta0"]
    for t in TASKS:  # the heads on disk are still the zero-shot heads, bit for bit
        head = LinearHead.load(s["heads"] / f"{t}.safetensors")
        ref = zero_shot_head(str(s["clip"]), class_names(t), templates(t))
        assert torch.equal(head.weight, ref.weight) and torch.equal(head.bias, ref.bias) and head.scale == ref.scale
    trained = load_state_dict(s["models"] / "eurosat" / "model.safetensors")
    assert set(trained) == set(theta0)
    assert any(not torch.equal(trained[k], theta0[k]) for k in trained)
    assert not torch.equal(trained["visual_projection.weight"], theta0["visual_projection.weight"])
    assert r["trained"]["steps"] == math.ceil(CAPS["train"] / TRAIN["batch_size"])
    metrics = json.loads((s["models"] / "eurosat" / "metrics.json").read_text())
    assert all(math.isfinite(x) for x in metrics["loss_first_last"])
    ev = _evaluator(s)
    acc = accuracies(read_predictions(s["models"], "eurosat", "test"), ev.labels["test"])
    assert acc == ev.accuracy(trained, "test")


def test_multitask_model_trains_over_every_task_with_its_own_head(suite, tmp_path):
    s = suite
    out = suite_finetune("multitask", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["data"]),
                         str(tmp_path / "multitask"), train=TRAIN, max_length=MAX_LENGTH)
    assert out["steps"] == len(TASKS) * math.ceil(CAPS["train"] / TRAIN["batch_size"])
    assert json.loads((tmp_path / "multitask" / "metrics.json").read_text())["tasks"] == TASKS
    with pytest.raises(KeyError, match="svhn"):
        suite_finetune("svhn", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["data"]), str(tmp_path / "x"),
                       train=TRAIN, max_length=MAX_LENGTH)


# ---------------------------------------------------------------- merging and scoring


@torch.no_grad()
def test_alpha_zero_merge_scores_exactly_the_pretrained_logits(suite, released):
    s, r = suite, released
    theta0 = r["theta0"]
    thetas = [load_state_dict(s["models"] / t / "model.safetensors") for t in ("mnist", "eurosat")]
    ev = _evaluator(s)
    merged = task_arithmetic(theta0, thetas, 0.0)
    for split in ("validation", "test"):
        pre, zero = ev.logits(theta0, split), ev.logits(merged, split)
        assert all(torch.equal(pre[t], zero[t]) for t in TASKS)
        assert ev.accuracy(merged, split) == ev.accuracy(theta0, split)
    # pretrained logits by hand: scale * cos(CLIP image features, zero-shot class embedding)
    clip, _ = load_clip(s["clip"])
    pre = ev.logits(theta0, "test")
    for t in TASKS:
        head = ev.model.heads[t]
        emb = torch.cat([_image_features(clip, b["pixel_values"]) for b in ev.batches["test"][t]])
        torch.testing.assert_close(pre[t], head.scale * F.normalize(emb, dim=-1) @ head.weight.T)
    # alpha = 1 with one task model is that model
    one = ev.logits(task_arithmetic(theta0, thetas[:1], 1.0), "test")
    saved = read_predictions(s["models"], "mnist", "test")
    for t in TASKS:
        torch.testing.assert_close(one[t], saved[t], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- curvature


def test_curvature_of_a_clip_task_model(suite, released):
    from modelmerge.curvature.estimate import DiagonalFisher, LayerFactors, diagonal_fisher

    s = suite
    out = s["root"] / "curvature" / "mnist"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = suite_curvature("mnist", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["models"] / "mnist"),
                               str(s["data"]), str(out), max_length=MAX_LENGTH, max_examples=4, batch_size=2)
    assert line.startswith("mnist: fisher_train: N = 4")
    loops = [str(w.message) for w in caught if "per-example loop" in str(w.message)]
    # the conv patch embedding and the bare class embedding are not hooked: they take the per-example loop
    assert loops and all("patch_embedding.weight" in m and "class_embedding" in m for m in loops)
    model, processor = load_suite_model(str(s["pretrained"]), str(s["heads"]), TASKS,
                                        s["models"] / "mnist" / "model.safetensors")
    params = {k[len("encoder."):]: p for k, p in model.named_parameters()}
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in params)  # heads are buffers
    state = load_state_dict(s["models"] / "mnist" / "model.safetensors")
    assert set(params) == {k for k, v in state.items() if v.is_floating_point()}
    fishers = {kind: DiagonalFisher.load(out / f"{kind}.safetensors")
               for kind in ("fisher_train", "fisher_validation", "fisher_sampled")}
    for kind, f in fishers.items():
        assert set(f.f_sum) == set(params), kind
        assert f.n == 4
        assert all(v.shape == params[k].shape and torch.isfinite(v).all() and (v >= 0).all()
                   for k, v in f.f_sum.items())
        assert any(v.abs().sum() > 0 for v in f.f_sum.values())
    # the hooked estimate (and its loop fallback) is the batch-size-1 reference
    model.set_task("mnist")
    train = batches_of(processor, split_frame_of(s["data"], "mnist", "train", 4, 0), 2, MAX_LENGTH)
    ref = diagonal_fisher(model, train, method="loop", progress=False, device="cpu")
    for k, v in ref.f_sum.items():
        torch.testing.assert_close(fishers["fisher_train"].f_sum[k[len("encoder."):]], v, rtol=1e-3, atol=1e-8)
    # Grams and K-FAC factors cover every linear layer of the tower, the projection among them
    gram, kfac = LayerFactors.load(out / "gram.safetensors"), LayerFactors.load(out / "kfac_sampled.safetensors")
    linear = {f"{n[len('encoder.'):]}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(gram.A) == set(kfac.A) == set(kfac.B) == linear and "visual_projection.weight" in linear
    assert gram.n == kfac.n == 4
    with torch.no_grad():  # RegMean's Gram of the projection: X^T X / N over the pooled (post-layernorm CLS) states
        pooled = torch.cat([model.encoder.vision_model(pixel_values=b["pixel_values"]).pooler_output for b in train])
    torch.testing.assert_close(gram.A["visual_projection.weight"], pooled.T @ pooled / 4, rtol=1e-5, atol=1e-6)
    # a kind estimated alone (the workflow's mats_full-only K-FAC Fishers) equals the same kind estimated with the
    # others: each estimate draws from its own seeded generator
    alone = s["root"] / "curvature_alone"
    suite_curvature("mnist", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["models"] / "mnist"), str(s["data"]),
                    str(alone), max_length=MAX_LENGTH, max_examples=4, batch_size=2, kinds=["kfac_sampled"])
    assert sorted(p.name for p in alone.iterdir()) == ["kfac_sampled.safetensors"]
    kfac_alone = LayerFactors.load(alone / "kfac_sampled.safetensors")
    for k in kfac.A:
        assert torch.equal(kfac_alone.A[k], kfac.A[k]) and torch.equal(kfac_alone.B[k], kfac.B[k]), k
    with pytest.raises(ValueError, match="unknown curvature kind"):
        suite_curvature("mnist", TASKS, str(s["pretrained"]), str(s["heads"]), str(s["models"] / "mnist"),
                        str(s["data"]), str(alone), max_length=MAX_LENGTH, max_examples=4, kinds=["kfac_test"])
