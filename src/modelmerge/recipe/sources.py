"""Reading input models: a model folder (single or sharded safetensors), a bare .safetensors file, or a hub name;
checked against each other from their headers, no weights read."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from modelmerge.io import LazySafetensors, tensor_info
from modelmerge.recipe.config import RecipeError

#: the files of a model folder that are not weights: copied from the base into a merged folder
WEIGHT_FILE = re.compile(r"(^model(-\d+-of-\d+)?\.safetensors$)|(\.safetensors\.index\.json$)|(\.bin$)|(\.pt$)|(\.pth$)")


class ShardedSafetensors(Mapping):
    """A lazy state dict over a sharded checkpoint (``model.safetensors.index.json`` and its shards)."""

    def __init__(self, index: Path, reader=LazySafetensors):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise RecipeError(f"{index}: not a shard index with a weight_map ({type(err).__name__}: {err})") from None
        missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
        if missing:
            raise RecipeError(f"{index} points at shard {missing[0]!r}, which is not in {index.parent} "
                              f"({len(missing)} shard(s) missing)")
        self._files = {f: reader(index.parent / f) for f in sorted(set(weight_map.values()))}
        for name, f in weight_map.items():
            if name not in self._files[f]:
                raise RecipeError(f"{index} puts {name!r} in {f!r}, which does not hold it (a mismatched shard)")
        self._where = {k: self._files[f] for k, f in weight_map.items()}
        self.index = index
        self.shards = list(self._files.values())  # the shard readers, in file order

    def __getitem__(self, name: str) -> Tensor:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._where[name].info(name)


@dataclass
class ModelSource:
    """A resolved input model: its weights (lazy), and its folder and config when it has them."""

    label: str  # how messages name it: "base" or "models[i]"
    spec: str
    weights: Mapping[str, Tensor]
    folder: Path | None = None
    config: dict = field(default_factory=dict)

    def mapped(self) -> Mapping[str, Tensor]:
        """The same weights memory-mapped (``modelmerge.merge.fast.MappedSafetensors``): the fast path's reader."""
        from modelmerge.merge.fast import MappedSafetensors

        w = self.weights
        if isinstance(w, ShardedSafetensors):
            return ShardedSafetensors(w.index, reader=MappedSafetensors)
        if isinstance(w, LazySafetensors):
            return MappedSafetensors(w.path)
        return w

    def n_parameters(self) -> int:
        return sum(math.prod(tensor_info(self.weights, k)[1]) for k in self.weights)

    def largest_tensor_bytes(self) -> int:
        infos = (tensor_info(self.weights, k) for k in self.weights)
        return max(math.prod(shape) * dtype.itemsize for dtype, shape in infos)


def _looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.startswith((".", "/"))


def resolve_model(spec: str, label: str, root: Path) -> ModelSource:
    """A model folder (safetensors weights, config.json), a .safetensors file, or a hub name (downloaded)."""
    path = (root / spec).expanduser() if not Path(spec).is_absolute() else Path(spec)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise RecipeError(f"{label}: {spec} is not a .safetensors file (pickled checkpoints are not read: "
                              "convert them with save_pretrained(..., safe_serialization=True))")
        return ModelSource(label, spec, LazySafetensors(path))
    if not path.is_dir() and _looks_like_hub_name(spec):
        path = _download(spec, label)
    if not path.is_dir():
        raise RecipeError(f"{label}: no model folder, .safetensors file or hub model at {spec!r}")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if (path / "model.safetensors").is_file():
        weights: Mapping[str, Tensor] = LazySafetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").is_file():
        weights = ShardedSafetensors(path / "model.safetensors.index.json")
    elif any(path.glob("*.bin")):
        raise RecipeError(f"{label}: {spec} holds only pickled weights (*.bin), which are not read: convert them "
                          "to safetensors first")
    else:
        raise RecipeError(f"{label}: {spec} has no model.safetensors (or sharded index)")
    return ModelSource(label, spec, weights, path, config)


def _download(spec: str, label: str) -> Path:
    """A hub model's weights, config and tokenizer, cached by huggingface_hub; a clear error where unreachable."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.safetensors", "*.json", "*.txt", "*.model"]))
    except Exception as err:  # noqa: BLE001  (offline, unknown repo, gated: all end the same way)
        raise RecipeError(f"{label}: {spec!r} is not a local path and the hub could not provide it "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def check_compatible(base: ModelSource, models: list[ModelSource]) -> None:
    """Every model must have the base's architecture and the base's parameter names and shapes."""
    arch = {k: base.config.get(k) for k in ("architectures", "model_type")}
    for m in models:
        if base.config and m.config:
            other = {k: m.config.get(k) for k in ("architectures", "model_type")}
            if other != arch:
                raise RecipeError(f"{m.label}: architecture {other['architectures'] or other['model_type']} differs "
                                  f"from the base's {arch['architectures'] or arch['model_type']}")
        missing = [k for k in base.weights if k not in m.weights]
        extra = [k for k in m.weights if k not in base.weights]
        if missing or extra:
            name = (missing or extra)[0]
            raise RecipeError(f"{m.label}: parameter {name!r} is " + ("missing" if missing else "not in the base")
                              + f" ({len(missing)} missing, {len(extra)} extra)")
        for k in base.weights:
            if tensor_info(m.weights, k)[1] != tensor_info(base.weights, k)[1]:
                raise RecipeError(f"{m.label}: parameter {k!r} has shape {tensor_info(m.weights, k)[1]}, the base "
                                  f"{tensor_info(base.weights, k)[1]}")
