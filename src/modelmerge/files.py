"""Files without torch: atomic writes, and a safetensors file checked whole before anything reads it.

Kept free of heavy imports so that the workflow (which imports the library while Snakemake parses it) stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path


class CorruptFileError(OSError):
    """A checkpoint or curvature file that cannot be read whole (truncated, empty, or not safetensors)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers see the old file or the new one, never half)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header, data start) of a safetensors file whose size matches its header: ``8 + n + max(end offset)``.

    Raises CorruptFileError naming the file when it is shorter (an interrupted copy, a full disk) or longer than its
    header says, or when the header itself is cut or not JSON; ``FileNotFoundError`` when there is no file.
    """
    path = Path(path)
    size = path.stat().st_size
    advice = "delete it and rerun the rule (or command) that writes it"
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors file; {advice}")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CorruptFileError(f"{path}: truncated inside its header ({size} bytes, the header alone needs "
                                   f"{8 + n}); {advice}")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptFileError(f"{path}: not a safetensors file (its header is not JSON: {err}); {advice}") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: not a safetensors file (its header is not a JSON object); {advice}")
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise CorruptFileError(f"{path}: {what} ({size} bytes, its header describes {expected}); {advice}")
    return header, 8 + n


def check_safetensors(*paths: str | os.PathLike) -> None:
    """Check every ``*.safetensors`` among ``paths``: files, or folders such as a ``save_pretrained`` checkpoint.

    A path that does not exist is skipped (a hub name; the loader reports it if it is neither).
    """
    for path in map(Path, paths):
        if not path.exists():
            continue
        for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
            read_safetensors_header(file)
