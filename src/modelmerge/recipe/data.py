"""Reading a recipe's local data files (.txt, .csv, .jsonl/.json, .parquet): the texts curvature is estimated on
and the texts DPP selection compares models on."""

from __future__ import annotations

from pathlib import Path

from modelmerge.recipe.config import RecipeError


def read_texts(path: Path, column: str, label_column: str | None, examples: int | None, seed: int):
    """Texts (and labels) of a local .txt (one text per line), .csv, .jsonl/.json or .parquet file."""
    import pandas as pd

    if not path.is_file():
        raise RecipeError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        df = pd.DataFrame({column: [line for line in path.read_text().splitlines() if line.strip()]})
    elif suffix == ".csv":
        df = pd.read_csv(path)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl")
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise RecipeError(f"{path.name}: data must be .txt, .csv, .jsonl, .json or .parquet")
    for col in (column, label_column):
        if col is not None and col not in df.columns:
            raise RecipeError(f"{path.name} has no column {col!r} (it has {', '.join(map(str, df.columns))})")
    if examples is not None and examples < len(df):
        df = df.sample(n=examples, random_state=seed).sort_index()
    texts = df[column].astype(str).tolist()
    labels = df[label_column].astype(int).tolist() if label_column else None
    return texts, labels



def check_columns(path: Path, label: str, column: str, label_column: str | None) -> None:
    """A data file exists, is readable, and has the columns the recipe names (read before any weight)."""
    if not path.is_file():
        raise RecipeError(f"{label}: no data file at {path}")
    try:
        read_texts(path, column, label_column, None, 0)
    except RecipeError as err:
        raise RecipeError(f"{label}: {err}") from None
