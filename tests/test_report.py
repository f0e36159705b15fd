"""Tracked tables: integers stay integers, pipes in text do not split columns, floats keep full precision in csv."""

from __future__ import annotations

import pandas as pd

from modelmerge.report import save_table


def test_markdown_and_csv_tables(tmp_path):
    df = pd.DataFrame({"d": [2, 128], "rule": ["a|b", "c"], "err": [1.2345e-15, 0.5]})
    save_table(df, tmp_path / "t", floatfmt=".2e", caption="cap")
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0] == "cap"
    body = [line for line in md[2:] if line.startswith("|")]
    assert body[2].split("|")[1].strip() == "2"  # not 2.00e+00
    assert "a\\|b" in body[2] and body[2].count(" | ") == body[0].count(" | ")
    back = pd.read_csv(tmp_path / "t.csv")
    assert back["err"].tolist() == df["err"].tolist() and back["d"].dtype.kind == "i"
