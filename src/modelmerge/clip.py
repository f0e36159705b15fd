"""CLIP for the paper suite (DESIGN.md section 7): the encoder, zero-shot heads, fine-tuned towers and image batches.

The encoder is transformers' ``CLIPVisionModelWithProjection`` of ``openai/clip-vit-base-patch32`` (vision tower +
visual projection, so ``image_embeds`` is the input of every head); task vectors cover exactly its state dict. The
open_clip ``ViT-B-32``/``openai`` tower (the same OpenAI weights, used by 001 and 002) is offered behind the same
interface by ``OpenClipVision``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelmerge.heads import LinearHead

PRETRAINED_CLIP = "openai/clip-vit-base-patch32"


def load_clip_vision(source: str | os.PathLike = PRETRAINED_CLIP):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) from a hub name or a local ``save_pretrained`` folder.

    ``source`` may hold a full ``CLIPModel`` (its text tower is left out) or a vision model with projection; every
    vision weight must be present (raises ValueError naming the missing ones otherwise).
    """
    from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    from modelmerge.files import check_safetensors

    check_safetensors(source)
    config = AutoConfig.from_pretrained(str(source))
    if config.model_type == "clip":  # the vision config of a CLIPModel does not always carry the projection size
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    else:
        vision_config = config
    model, info = CLIPVisionModelWithProjection.from_pretrained(str(source), config=vision_config,
                                                                output_loading_info=True)
    bad = sorted(set(info.get("missing_keys", ())) | set(info.get("mismatched_keys", ())))
    if bad:
        raise ValueError(f"{source} lacks vision weights (or has them in another shape): {bad}")
    return model.eval(), CLIPImageProcessor.from_pretrained(str(source))


def load_clip(source: str | os.PathLike = PRETRAINED_CLIP):
    """(CLIPModel, tokenizer) from a hub name or a local folder: the text tower the zero-shot heads need."""
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(str(source)).eval(), AutoTokenizer.from_pretrained(str(source))


def _fill(template: str | Callable[[str], str], classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


@torch.no_grad()
def zero_shot_head(
    clip_model_or_source,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: str | torch.device | None = None,
    tokenizer=None,
    batch_size: int = 256,
) -> LinearHead:
    """Ilharco et al.'s zero-shot head: w_c = normalise(mean_t normalise(P_text g(template_t(c)))), scale exp(s).

    g is the text tower's pooled (end-of-text) state, P_text the text projection and s CLIP's ``logit_scale``; the
    bias is 0. ``clip_model_or_source`` is a ``CLIPModel`` (then ``tokenizer`` defaults to its ``name_or_path``'s) or
    a hub name / local folder. A model given with ``device`` is moved there.
    """
    from transformers import AutoTokenizer

    if isinstance(clip_model_or_source, (str, os.PathLike)):
        model, loaded = load_clip(clip_model_or_source)
        tokenizer = tokenizer or loaded
    else:
        model = clip_model_or_source
        if not hasattr(model, "text_model") or not hasattr(model, "text_projection"):
            raise TypeError(f"a zero-shot head needs a CLIPModel with its text tower, got {type(model).__name__}")
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    texts = [_fill(t, c) for c in classnames for t in templates]
    max_length = model.config.text_config.max_position_embeddings
    chunks = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        pooled = model.text_model(input_ids=enc["input_ids"].to(device),
                                  attention_mask=enc["attention_mask"].to(device)).pooler_output
        chunks.append(F.normalize(model.text_projection(pooled).float(), dim=-1))
    per_template = torch.cat(chunks).view(len(classnames), len(templates), -1)
    weight = F.normalize(per_template.mean(1), dim=-1).cpu()
    return LinearHead(weight, None, float(model.logit_scale.exp()), list(classnames))


def _checkpoint_files(source: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: a file, a local folder, or a hub model (only weights and configs)."""
    path = Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(source), allow_patterns=["*.safetensors", "*.json"]))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    return files


def load_finetuned_vision_state(source: str | os.PathLike, pretrained_encoder: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``pretrained_encoder`` (a CLIPVisionModelWithProjection) with the fine-tuned vision tower.

    ``source`` (hub name, folder or safetensors file) holds a ``CLIPVisionModel``, as FusionBench's
    ``tanganke/clip-vit-base-patch32_<task>`` do: keys ``vision_model.*`` (transformers 4) or the same keys without
    the prefix (transformers 5). The visual projection is not fine-tuned there, so it is the pretrained one; a
    checkpoint that carries a different projection is refused. Tensors take the pretrained dtypes. Raises ValueError
    naming missing, unexpected or misshapen keys.
    """
    from safetensors.torch import load_file

    from modelmerge.files import read_safetensors_header

    target = pretrained_encoder.state_dict()
    raw: dict[str, Tensor] = {}
    for f in _checkpoint_files(source):
        read_safetensors_header(f)  # a cut file is named here, not deep inside safetensors
        raw.update(load_file(str(f)))
    ckpt = {}
    for key, value in raw.items():
        ours = key if key in target or f"vision_model.{key}" not in target else f"vision_model.{key}"
        if ours not in target and ours.endswith("position_ids"):
            continue  # a constant buffer older transformers saved; not a weight
        ckpt[ours] = value
    projection = {k for k in target if k.startswith("visual_projection.")}
    missing = sorted(set(target) - projection - set(ckpt))
    unexpected = sorted(set(ckpt) - set(target))
    if missing or unexpected:
        raise ValueError(f"{source} is not a CLIP vision tower for this encoder: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    misshapen = sorted(k for k in ckpt if ckpt[k].shape != target[k].shape)
    if misshapen:
        raise ValueError(f"{source}: shapes differ from the encoder's for {misshapen}")
    changed = sorted(k for k in projection & set(ckpt) if not torch.equal(ckpt[k].to(target[k].dtype), target[k]))
    if changed:
        raise ValueError(f"{source} carries a visual projection different from the pretrained one: {changed}")
    return {k: (ckpt[k] if k in ckpt else v).detach().to(dtype=v.dtype, copy=True) for k, v in target.items()}


def to_rgb(image):
    """A PIL RGB image from a PIL image, encoded bytes, a hub image struct {"bytes", "path"} or an H x W (x C) array."""
    import numpy as np
    from PIL import Image

    if isinstance(image, Mapping):
        image = image["bytes"] if image.get("bytes") is not None else image["path"]
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, os.PathLike)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.convert("RGB")


class ImageBatches(Sequence):
    """Batches {pixel_values, labels} of images and labels, preprocessed lazily when indexed (nothing is cached)."""

    def __init__(self, processor, images: Sequence, labels: Sequence[int], batch_size: int):
        if hasattr(images, "iloc"):
            images = images.tolist()
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.processor, self.images, self.labels, self.batch_size = processor, images, labels, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.labels))
        images = [to_rgb(self.images[j]) for j in range(lo, hi)]
        if hasattr(self.processor, "model_input_names"):  # a transformers image processor
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        else:  # a per-image transform, e.g. open_clip's preprocess
            pixels = torch.stack([self.processor(im) for im in images])
        return {"pixel_values": pixels.float(), "labels": self.labels[lo:hi]}


def image_batches(processor, images: Sequence, labels: Sequence[int], batch_size: int) -> ImageBatches:
    """A sequence of {pixel_values, labels} batches (``list(...)`` materialises it; indexing preprocesses one batch)."""
    return ImageBatches(processor, images, labels, batch_size)


def dataset_batches(processor, dataset, batch_size: int) -> ImageBatches:
    """``image_batches`` over a split of ``load_vision_task`` (images decoded one batch at a time)."""
    return ImageBatches(processor, dataset["image"], dataset.with_format("numpy")["label"], batch_size)


class OpenClipVision(nn.Module):
    """An open_clip visual tower behind the transformers interface: forward(pixel_values=x).image_embeds = visual(x)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: Tensor):
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        return CLIPVisionModelOutput(image_embeds=self.visual(pixel_values))


def load_open_clip_vision(name: str = "ViT-B-32", pretrained: str | None = "openai"):
    """(OpenClipVision, preprocess) of an open_clip model (extra ``paper``); its text tower is dropped."""
    from modelmerge.models import load_open_clip

    model, preprocess = load_open_clip(name, pretrained)
    return OpenClipVision(model.visual).eval(), preprocess
