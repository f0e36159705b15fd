"""Paper (vision) side of the eight-task suite: hub-format image fixtures for all eight tasks, a tiny random CLIP
saved locally, and the mathematics of zero-shot heads, fine-tuned towers and CLIP-pooled classifiers (no network)."""

from __future__ import annotations

import copy
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from modelmerge.clip import (  # noqa: E402
    OpenClipVision,
    dataset_batches,
    image_batches,
    load_clip,
    load_clip_vision,
    load_finetuned_vision_state,
    zero_shot_head,
)
from modelmerge.data.vision import (  # noqa: E402
    CORRUPTIONS,
    VISION_TASKS,
    check_head,
    class_names,
    load_vision_task,
    templates,
    validation_split,
)
from modelmerge.heads import EncoderClassifier, LinearHead, encode  # noqa: E402

N_TRAIN, N_TEST = 30, 6

# where each task's parquet shards live in its hub repository (config name, folder)
HUB_LAYOUT = {name: (spec.config or "default", spec.config or "data") for name, spec in VISION_TASKS.items()}
HUB_LAYOUT["mnist"] = ("mnist", "mnist")  # ylecun/mnist: one config, named "mnist"


def _png(rng: np.random.Generator, mode: str = "RGB") -> bytes:
    shape = (6, 6) if mode == "L" else (6, 6, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(path, images: list[bytes], labels: list[int], with_features: bool, names: list[str]) -> None:
    """One parquet shard in the hub's image format: image = struct{bytes, path}, label = int64."""
    if with_features:  # as `datasets` writes it: Image / ClassLabel features in the schema metadata
        import datasets

        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                        features=feats)
        ds.to_parquet(str(path))
    else:
        table = pa.table({"image": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)]),
                          "label": pa.array(labels, pa.int64())})
        pq.write_table(table, path)


def _hub_repo(root, name: str, seed: int = 0, bad_label: bool = False):
    """A local folder laid out as the task's hub dataset repository: README configs + parquet shards per split."""
    config, folder = HUB_LAYOUT[name]
    spec = VISION_TASKS[name]
    names = class_names(name)
    rng = np.random.default_rng(seed)
    mode = "L" if name == "mnist" else "RGB"
    repo = root / name
    (repo / folder).mkdir(parents=True)
    splits = {"train": N_TRAIN, "test": N_TEST, **{c: N_TEST for c in spec.corruptions[:2]}}
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    files = {}
    for i, (split, n) in enumerate(splits.items()):
        labels = [int(x) for x in rng.integers(0, len(names), n)]
        if bad_label and split == "train":
            labels[3] = len(names)
        path = repo / folder / f"{split}-00000-of-00001.parquet"
        _write_split(path, [_png(rng, mode) for _ in range(n)], labels, with_features=(i + len(name)) % 2 == 0,
                     names=names)
        lines += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
        files[split] = str(path)
    (repo / "README.md").write_text("\n".join([*lines, "---", f"# {name} (test fixture)", ""]))
    return repo, files


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


# ---------------------------------------------------------------- registry, splits, loader


def test_registry_lists_the_eight_tasks_with_their_classes_and_templates():
    counts = {"sun397": 397, "stanford_cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
              "mnist": 10, "dtd": 47}
    assert set(VISION_TASKS) == set(counts)
    for name, n in counts.items():
        names, temps = class_names(name), templates(name)
        assert len(names) == len(set(names)) == n
        assert temps and all(t.count("{}") == 1 for t in temps)
        assert VISION_TASKS[name].finetuned.startswith("tanganke/clip-vit-base-patch32_")
    assert class_names("mnist") == [str(i) for i in range(10)] and class_names("gtsrb")[14] == "stop"
    assert templates("svhn") == ['a photo of the number: "{}".']
    assert VISION_TASKS["stanford_cars"].finetuned == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert VISION_TASKS["svhn"].config == "cropped_digits"


@pytest.mark.parametrize("call", [class_names, templates, load_vision_task])
def test_unknown_task_is_named_in_the_error(call):
    with pytest.raises(KeyError, match="imagenet"):
        call("imagenet")


def test_validation_split_is_fusionbench_random_split():
    n = 1000
    for seed in (0, 3):
        train, val = validation_split(n, 0.1, seed)
        ref_train, ref_val = torch.utils.data.random_split(range(n), [900, 100],
                                                           generator=torch.Generator().manual_seed(seed))
        assert val.tolist() == sorted(ref_val.indices) and train.tolist() == sorted(ref_train.indices)
        assert not set(train) & set(val) and len(train) + len(val) == n
    capped_train, capped_val = validation_split(n, 0.1, 0, max_size=50)  # Ilharco et al.: at most 5000
    assert len(capped_val) == 50 and len(capped_train) == 950
    assert not np.array_equal(validation_split(n, 0.1, 0)[1], validation_split(n, 0.1, 1)[1])
    with pytest.raises(ValueError):
        validation_split(5, 0.1)  # int(0.5) = 0 rows


@pytest.mark.parametrize("name", sorted(VISION_TASKS))
def test_loader_reads_each_task_from_its_hub_layout(tmp_path, name):
    repo, files = _hub_repo(tmp_path, name)
    cache = tmp_path / "cache"
    out = load_vision_task(name, source=repo, cache_dir=cache)
    assert list(out) == ["train", "validation", "test"]
    n_val = int(0.1 * N_TRAIN)
    assert (len(out["train"]), len(out["validation"]), len(out["test"])) == (N_TRAIN - n_val, n_val, N_TEST)
    for split in out.values():
        assert split.column_names == ["image", "label"]
        assert split.features["label"].names == class_names(name)
        assert isinstance(split[0]["image"], Image.Image)
    # validation: the seeded FusionBench rows of the hub's train split, disjoint from our train
    hub_train = pq.read_table(files["train"]).to_pydict()
    hub_pixels = [_pixels(Image.open(io.BytesIO(im["bytes"]))) for im in hub_train["image"]]
    train_idx, val_idx = validation_split(N_TRAIN, 0.1, 0)
    val_pixels = [_pixels(r["image"]) for r in out["validation"]]
    train_pixels = [_pixels(r["image"]) for r in out["train"]]
    assert val_pixels == [hub_pixels[i] for i in val_idx] and train_pixels == [hub_pixels[i] for i in train_idx]
    assert out["validation"]["label"] == [hub_train["label"][i] for i in val_idx]
    assert not set(val_pixels) & set(train_pixels)
    again = load_vision_task(name, source=repo, cache_dir=cache)
    assert [_pixels(r["image"]) for r in again["validation"]] == val_pixels
    other = load_vision_task(name, source=repo, cache_dir=cache, seed=1)
    assert [_pixels(r["image"]) for r in other["validation"]] != val_pixels


def test_loader_reads_data_files_and_corrupted_test_sets(tmp_path):
    _, files = _hub_repo(tmp_path, "gtsrb")
    out = load_vision_task("gtsrb", data_files=files, corruptions=["contrast"], cache_dir=tmp_path / "cache")
    assert list(out) == ["train", "validation", "test", "contrast"] and len(out["contrast"]) == N_TEST
    assert out["contrast"]["label"] == pq.read_table(files["contrast"])["label"].to_pylist()
    with pytest.raises(KeyError, match="spatter"):  # a corruption the fixture does not ship
        load_vision_task("gtsrb", data_files=files, corruptions=["spatter"], cache_dir=tmp_path / "cache")
    with pytest.raises(KeyError, match="fog"):
        load_vision_task("gtsrb", data_files=files, corruptions=["fog"])
    with pytest.raises(KeyError, match="contrast"):  # MNIST has no corrupted copies on the hub
        load_vision_task("mnist", data_files=files, corruptions=["contrast"])
    assert set(VISION_TASKS["gtsrb"].corruptions) == set(CORRUPTIONS)


def test_loader_rejects_labels_outside_the_class_list(tmp_path):
    repo, _ = _hub_repo(tmp_path, "eurosat", bad_label=True)
    with pytest.raises(ValueError, match="eurosat train: labels span"):
        load_vision_task("eurosat", source=repo, cache_dir=tmp_path / "cache")


def test_check_head_refuses_a_head_of_another_class_count(tmp_path):
    repo, _ = _hub_repo(tmp_path, "eurosat")
    test = load_vision_task("eurosat", source=repo, cache_dir=tmp_path / "cache")["test"]
    check_head(LinearHead(torch.eye(10)), test)
    with pytest.raises(ValueError, match="head has 9 classes but the data has 10"):
        check_head(LinearHead(torch.eye(10)[:9]), test)
    with pytest.raises(ValueError, match="labels span"):
        check_head(LinearHead(torch.eye(3)), [0, 1, 5])


# ---------------------------------------------------------------- tiny CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel with a byte-level CLIP tokenizer (no merges) and a CLIP image processor, saved locally."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {s: i for i, s in enumerate(symbols)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=8)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=8, logit_scale_init_value=2.0,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8)) for i in range(n)]


def _projected(vision, pixel_values):
    """Image embedding by hand: visual projection of the post-layer-normed CLS state."""
    tower = vision.vision_model
    norm = getattr(tower, "post_layernorm", None) or tower.vision_model.post_layernorm  # transformers 5 / 4
    hidden = tower(pixel_values=pixel_values).last_hidden_state
    return vision.visual_projection(norm(hidden[:, 0]))


@torch.no_grad()
def test_load_clip_vision_is_the_clip_image_tower(clip_dir):
    vision, processor = load_clip_vision(clip_dir)
    clip, _ = load_clip(clip_dir)
    assert set(vision.state_dict()) == {k for k in clip.state_dict() if k.startswith(("vision_model.", "visual_"))}
    for key, value in vision.state_dict().items():
        assert torch.equal(value, clip.state_dict()[key]), key
    pixels = processor(images=_images(3), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    torch.testing.assert_close(vision(pixel_values=pixels).image_embeds, _projected(vision, pixels))


@torch.no_grad()
def test_zero_shot_head_is_the_normalised_mean_of_normalised_prompt_embeddings(clip_dir):
    clip, tokenizer = load_clip(clip_dir)
    names, temps = ["annual crop land", "forest", "river"], templates("eurosat")
    head = zero_shot_head(clip_dir, names, temps)
    assert head.classes == names and head.weight.shape == (3, 8)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    assert head.scale == pytest.approx(float(np.exp(2.0)), rel=1e-6) and not head.bias.any()
    assert (head.weight @ head.weight.T - torch.eye(3)).abs().max() > 1e-3  # distinct classes, distinct rows
    for c, name in enumerate(names):
        embeds = []
        for t in temps:
            ids = tokenizer(t.format(name), return_tensors="pt")["input_ids"]
            assert ids[0, -1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids[0, 1:-1]
            hidden = clip.text_model(input_ids=ids).last_hidden_state[0, -1]  # the end-of-text state
            e = clip.text_projection(hidden)
            embeds.append(e / e.norm())
        mean = torch.stack(embeds).mean(0)
        torch.testing.assert_close(head.weight[c], mean / mean.norm(), atol=1e-5, rtol=1e-5)
    same = zero_shot_head(clip, names, [lambda c, t=t: t.format(c) for t in temps], tokenizer=tokenizer, batch_size=4)
    torch.testing.assert_close(same.weight, head.weight, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_zero_shot_classifier_reproduces_clip_logits_per_image(clip_dir):
    clip, tokenizer = load_clip(clip_dir)
    vision, processor = load_clip_vision(clip_dir)
    names, template = ["cat", "dog", "small red car", "x"], "a photo of a {}."
    model = EncoderClassifier(vision, {"pets": zero_shot_head(clip_dir, names, [template])}, pooling="clip")
    pixels = processor(images=_images(5), return_tensors="pt")["pixel_values"]
    text = tokenizer([template.format(n) for n in names], padding=True, return_tensors="pt")
    reference = clip(pixel_values=pixels, **text).logits_per_image
    torch.testing.assert_close(model(pixel_values=pixels).logits, reference, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_encoder_classifier_logits_are_scaled_cosines(clip_dir):
    vision, processor = load_clip_vision(clip_dir)
    gen = torch.Generator().manual_seed(1)
    w = F.normalize(torch.randn(5, 8, generator=gen), dim=-1)  # unit rows, as zero-shot heads have
    head = LinearHead(w, torch.zeros(5), scale=7.5)
    model = EncoderClassifier(vision, {"t": head}, pooling="clip")
    batches = image_batches(processor, _images(7), [0, 1, 2, 3, 4, 0, 1], batch_size=3)
    logits = torch.cat([model(pixel_values=b["pixel_values"]).logits for b in batches])
    f = torch.cat([_projected(vision, b["pixel_values"]) for b in batches])
    cos = (f @ w.T) / (f.norm(dim=1, keepdim=True) * w.norm(dim=1))
    torch.testing.assert_close(logits, 7.5 * cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode(model, batches), F.normalize(f, dim=-1), atol=1e-6, rtol=1e-6)


def _legacy_checkpoint(folder, vision_state: dict) -> None:
    """A transformers-4 CLIPVisionModel checkpoint as on the hub: vision_model.* keys and the position_ids buffer."""
    folder.mkdir(parents=True)
    state = {k: v.clone().contiguous() for k, v in vision_state.items() if k.startswith("vision_model.")}
    n_pos = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    state["vision_model.embeddings.position_ids"] = torch.arange(n_pos)[None]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "clip_vision_model"}')


@torch.no_grad()
def test_finetuned_state_takes_the_tower_and_keeps_the_pretrained_projection(clip_dir, tmp_path):
    vision, processor = load_clip_vision(clip_dir)
    pre = {k: v.clone() for k, v in vision.state_dict().items()}
    # fine-tuned weights equal to the pretrained ones reproduce the pretrained model exactly (both key layouts)
    _legacy_checkpoint(tmp_path / "legacy", pre)
    vision.vision_model.save_pretrained(tmp_path / "v5")  # transformers 5: keys without the vision_model. prefix
    for source in (tmp_path / "legacy", tmp_path / "v5", tmp_path / "legacy" / "model.safetensors"):
        state = load_finetuned_vision_state(source, vision)
        assert list(state) == list(pre) and all(torch.equal(state[k], pre[k]) for k in pre)
    pixels = processor(images=_images(2), return_tensors="pt")["pixel_values"]
    twin = copy.deepcopy(vision)
    twin.load_state_dict(load_finetuned_vision_state(tmp_path / "legacy", vision), strict=True)
    assert torch.equal(twin(pixel_values=pixels).image_embeds, vision(pixel_values=pixels).image_embeds)
    # a real fine-tune: the tower moves, the projection stays the pretrained one
    gen = torch.Generator().manual_seed(2)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if k.startswith("vision_model.") else v
             for k, v in pre.items()}
    _legacy_checkpoint(tmp_path / "tuned", tuned)
    state = load_finetuned_vision_state(tmp_path / "tuned", vision)
    assert all(torch.equal(state[k], tuned[k]) for k in pre)
    assert torch.equal(state["visual_projection.weight"], pre["visual_projection.weight"])
    assert all(torch.equal(vision.state_dict()[k], pre[k]) for k in pre)  # the encoder itself is untouched


def test_finetuned_state_names_missing_unexpected_and_foreign_keys(clip_dir, tmp_path):
    vision, _ = load_clip_vision(clip_dir)
    pre = vision.state_dict()
    state = {k: v.clone().contiguous() for k, v in pre.items() if k.startswith("vision_model.")}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "vision_model.post_layernorm.bias"},
                    "missing keys.*vision_model.post_layernorm.bias"),
        "unexpected": ({**state, "text_model.final_layer_norm.bias": torch.zeros(16)},
                       "unexpected keys.*text_model.final_layer_norm.bias"),
        "projection": ({**state, "visual_projection.weight": pre["visual_projection.weight"] + 1},
                       "visual projection"),
        "shape": ({**state, "vision_model.post_layernorm.bias": torch.zeros(3)}, "shapes differ"),
    }
    for case, (ckpt, message) in cases.items():
        save_file(ckpt, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_finetuned_vision_state(tmp_path / f"{case}.safetensors", vision)
    with pytest.raises(FileNotFoundError):
        (tmp_path / "empty").mkdir()
        load_finetuned_vision_state(tmp_path / "empty", vision)


def test_image_batches_decode_every_hub_image_format(clip_dir, tmp_path):
    _, processor = load_clip_vision(clip_dir)
    rng = np.random.default_rng(0)
    raw = [_png(rng), _png(rng, "L"), _png(rng), _png(rng), _png(rng)]
    as_pil = [Image.open(io.BytesIO(b)) for b in raw]
    forms = [raw[0], {"bytes": raw[1], "path": None}, as_pil[2], np.asarray(as_pil[3]), as_pil[4]]
    batches = image_batches(processor, forms, [4, 3, 2, 1, 0], batch_size=2)
    assert len(batches) == 3 and [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert batches[-1]["labels"].tolist() == [0] and batches[0]["labels"].dtype == torch.long
    pixels = torch.cat([b["pixel_values"] for b in batches])
    reference = processor(images=[im.convert("RGB") for im in as_pil], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (5, 3, 32, 32)
    torch.testing.assert_close(pixels, reference)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        image_batches(processor, forms[:2], [0, 1, 2], 2)
    # over a loaded split: images decoded batch by batch, labels from the ClassLabel column
    repo, _ = _hub_repo(tmp_path, "mnist")
    test = load_vision_task("mnist", source=repo, cache_dir=tmp_path / "cache")["test"]
    split_batches = dataset_batches(processor, test, batch_size=4)
    assert torch.cat([b["labels"] for b in split_batches]).tolist() == test["label"]
    assert split_batches[0]["pixel_values"].shape == (4, 3, 32, 32)  # grey digits become RGB


def test_open_clip_tower_feeds_the_clip_pooled_classifier():
    visual = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    head = LinearHead(torch.randn(3, 6), scale=2.0)
    model = EncoderClassifier(OpenClipVision(visual), {"t": head}, pooling="clip")
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, head(F.normalize(visual(x), dim=-1)))
    assert set(model.encoder_state()) == {"visual.1.weight", "visual.1.bias"}


def test_open_clip_loader_wraps_the_visual_tower():
    pytest.importorskip("open_clip")
    from modelmerge.clip import load_open_clip_vision

    tower, preprocess = load_open_clip_vision("ViT-B-32", pretrained=None)  # random weights: no download
    with torch.no_grad():
        out = tower(pixel_values=preprocess(_images(1)[0])[None])
    assert out.image_embeds.shape == (1, 512)
