"""Safetensors I/O: lazy parameter-by-parameter reading, streaming writing, atomic replacement of outputs."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import torch
from torch import Tensor

from modelmerge.files import CorruptFileError, atomic_path, atomic_write_text, read_safetensors_header  # noqa: F401
from modelmerge.statedict import MergeInputError, StateDict

# safetensors dtype codes (https://github.com/huggingface/safetensors, format description)
_TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_TO_TORCH = {v: k for k, v in _TORCH_TO_ST.items()}


class LazySafetensors(Mapping):
    """A read-only state dict backed by a safetensors file; each tensor is read when it is indexed.

    Tensors are read with plain file reads into fresh buffers (no memory map), so a streaming merge's resident
    memory holds only the tensors in use, not every page of every input file it has touched.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no safetensors file at {self.path}")
        self.device = device
        header, self._data_start = read_safetensors_header(self.path)  # a cut file fails here, by name
        self._meta = header.pop("__metadata__", None) or {}
        self._header = header
        self._keys = list(header)

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._header:
            raise KeyError(name)
        info = self._header[name]
        dtype, shape = _ST_TO_TORCH[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype, device=self.device)
        buf = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + begin)
            if fh.readinto(buf) != len(buf):
                raise CorruptFileError(f"{self.path} is truncated at tensor {name!r}")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape).to(self.device)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._header

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor without reading its data."""
        info = self._header[name]
        return _ST_TO_TORCH[info["dtype"]], tuple(info["shape"])

    def metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` (string -> string)."""
        return dict(self._meta)


def tensor_info(state: StateDict, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) of ``state[name]``, without reading data when ``state`` is lazy."""
    if isinstance(state, LazySafetensors) or callable(getattr(state, "info", None)):
        return state.info(name)
    t = state[name]
    return t.dtype, tuple(t.shape)


class _Closing:
    """``with writer:`` closes it (every tensor written, renamed into place) or, on an exception, aborts it."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class SafetensorsWriter(_Closing, MutableMapping):
    """Streams tensors into a safetensors file whose layout (names, dtypes, shapes) is fixed up front.

    ``writer[name] = tensor`` writes the bytes at once, in any order, so a merge never holds the whole
    output. ``close()`` checks that every tensor was written and atomically renames the file into place; on
    an exception inside ``with`` nothing is left behind.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        self._layout = {k: (dt, tuple(int(s) for s in shape)) for k, (dt, shape) in layout.items()}
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._offsets: dict[str, int] = {}
        for name in sorted(self._layout):  # safetensors orders by name; keeps files byte-identical
            dtype, shape = self._layout[name]
            if dtype not in _TORCH_TO_ST:
                raise MergeInputError(name, f"dtype {dtype} cannot be stored in safetensors here")
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._fh.truncate(self._data_start + offset)
        self._written: set[str] = set()

    @classmethod
    def like(cls, state: StateDict, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
        """A writer for a file with the same names, dtypes and shapes as ``state``."""
        return cls(path, {k: tensor_info(state, k) for k in state.keys()}, metadata)

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        if name not in self._layout:
            raise MergeInputError(name, f"not in the layout of {self.path.name}")
        dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergeInputError(
                name, f"expected {dtype} {shape} for {self.path.name}, got {tensor.dtype} {tuple(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # no copy: a view
        self._fh.seek(self._data_start + self._offsets[name])
        self._fh.write(data)
        self._written.add(name)

    def __getitem__(self, name: str) -> Tensor:
        raise KeyError(f"{name}: SafetensorsWriter is write-only; open the file with LazySafetensors")

    def __delitem__(self, name: str) -> None:
        raise TypeError("SafetensorsWriter cannot delete tensors")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._written))

    def __len__(self) -> int:
        return len(self._written)

    def close(self) -> None:
        """Finish the file: every tensor must have been written; then rename it into place."""
        missing = sorted(set(self._layout) - self._written)
        if missing:
            self.abort()
            raise MergeInputError(missing[0], f"never written to {self.path.name} ({len(missing)} missing)")
        self._fh.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        """Discard the partial file."""
        if not self._fh.closed:
            self._fh.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)



#: transformers 5's ``save_pretrained(max_shard_size="50GB")``: below it, one model.safetensors
DEFAULT_SHARD_SIZE = "50GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an integer or as "5GB", "500MB", "2GiB" (transformers' and huggingface_hub's units)."""
    if isinstance(size, int):
        value = size
    else:
        import re

        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"shard size {size!r}: give bytes or a number with a unit (KB, MB, GB, GiB, ...)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"shard size must be positive, got {size!r}")
    return value


def shard_names(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """The layout's names, in order, cut into shards of at most ``max_bytes`` (a new shard when the next tensor would
    not fit, as ``save_pretrained`` cuts); a tensor larger than ``max_bytes`` is refused."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, (dtype, shape) in layout.items():
        nbytes = _numel(tuple(shape)) * torch.empty((), dtype=dtype).element_size()
        if nbytes > max_bytes:
            raise MergeInputError(name, f"{nbytes:,} bytes, larger than the shard size {max_bytes:,}: raise --shard-size")
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


class ShardedSafetensorsWriter(_Closing, MutableMapping):
    """Streams a model into ``folder`` in the Hugging Face layout: ``model.safetensors`` when it fits one shard of
    ``max_shard_size``, else ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` (what
    ``from_pretrained`` reads). Each shard is a ``SafetensorsWriter`` (written in place, renamed when complete); the
    index is written last."""

    def __init__(self, folder: str | os.PathLike, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_size: int | str = DEFAULT_SHARD_SIZE, metadata: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        shards = shard_names(layout, parse_size(max_shard_size))
        n = len(shards)
        files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._writers = [SafetensorsWriter(self.folder / f, {k: layout[k] for k in names}, metadata)
                         for f, names in zip(files, shards)]
        self._where = {k: w for w, names in zip(self._writers, shards) for k in names}
        self._index = None if n == 1 else {
            "metadata": {"total_size": sum(_numel(tuple(s)) * torch.empty((), dtype=d).element_size()
                                           for d, s in layout.values())},
            "weight_map": {k: f for f, names in zip(files, shards) for k in sorted(names)},
        }

    @classmethod
    def like(cls, state: StateDict, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_SHARD_SIZE,
             metadata: Mapping[str, str] | None = None) -> ShardedSafetensorsWriter:
        """A writer for a model with the same names (in the same order), dtypes and shapes as ``state``."""
        return cls(folder, {k: tensor_info(state, k) for k in state.keys()}, max_shard_size, metadata)

    @property
    def files(self) -> list[str]:
        """The shard file names (one: model.safetensors)."""
        return [w.path.name for w in self._writers]

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        if name not in self._where:
            raise MergeInputError(name, f"not in the layout of {self.folder}")
        self._where[name][name] = tensor

    def __getitem__(self, name: str) -> Tensor:
        raise KeyError(f"{name}: the writer is write-only; load the folder with from_pretrained or LazySafetensors")

    def __delitem__(self, name: str) -> None:
        raise TypeError("the writer cannot delete tensors")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(k for w in self._writers for k in w))

    def __len__(self) -> int:
        return sum(len(w) for w in self._writers)

    def close(self) -> None:
        """Finish every shard (each must be complete), then write the index."""
        try:
            for w in self._writers:
                w.close()
        except BaseException:
            self.abort()
            raise
        if self._index is not None:
            atomic_write_text(self.folder / "model.safetensors.index.json", json.dumps(self._index, indent=2) + "\n")

    def abort(self) -> None:
        """Discard every shard not yet finished."""
        for w in self._writers:
            if not w._fh.closed:
                w.abort()



def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def save_state_dict(state: StateDict, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict to ``path`` as safetensors, atomically."""
    with SafetensorsWriter.like(state, path, metadata) as writer:
        for name in state.keys():
            writer[name] = state[name]


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a whole safetensors file into memory (never unpickles)."""
    lazy = LazySafetensors(path)
    return {k: lazy[k] for k in lazy}
