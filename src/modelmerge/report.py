"""Tracked outputs: figures (.png + .svg) and tables (.md + .csv), written atomically and byte-reproducibly."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from modelmerge.files import atomic_path, atomic_write_text  # noqa: E402

#: one look for every figure in the repository
STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.frameon": False,
    "svg.hashsalt": "modelmerge",  # fixed ids inside SVGs so reruns give identical bytes
    "svg.fonttype": "path",
}

#: colours per method, shared by all figures so a method looks the same everywhere
METHOD_COLORS = {
    "task arithmetic": "#d95f02",
    "gradient matching": "#1b9e77",
    "gradient matching (diag.)": "#7570b3",
    "Cook's formula": "#e7298a",
    "averaging": "#666666",
    "Fisher averaging": "#e6ab02",
}


def use_style() -> None:
    """Apply the repository's matplotlib style."""
    plt.rcParams.update(STYLE)


def save_figure(fig: plt.Figure, stem: str | os.PathLike) -> list[Path]:
    """Write ``stem.png`` and ``stem.svg`` without timestamps or version strings (identical bytes on rerun)."""
    stem = Path(stem)
    paths = []
    for ext, metadata in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, metadata=metadata, bbox_inches="tight")
        paths.append(path)
    return paths


def save_table(df: pd.DataFrame, stem: str | os.PathLike, floatfmt: str = ".3g", caption: str | None = None) -> list[Path]:
    """Write ``stem.csv`` (full precision) and ``stem.md`` (rounded, with an optional caption line)."""
    stem = Path(stem)
    csv, md = stem.with_suffix(".csv"), stem.with_suffix(".md")
    atomic_write_text(csv, df.to_csv(index=False, float_format="%.17g", lineterminator="\n"))
    # escape pipes in text cells; object dtype keeps integer columns integers (.values would upcast them)
    cells = df.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v).astype(object)
    text = cells.to_markdown(index=False, floatfmt=floatfmt) + "\n"
    if caption:
        text = f"{caption}\n\n{text}"
    atomic_write_text(md, text)
    return [csv, md]
