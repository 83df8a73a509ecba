"""The three DuckDB queries the README shows run on a real output and say what they claim."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
from conftest import photo_samples, write_webdataset

from schemas.config import CurateConfig
from tasks.runner import run

README = Path(__file__).parents[1] / "README.md"


def readme_queries() -> list[str]:
    block = re.search(r"```sql\n(.*?)```", README.read_text(), re.S).group(1)
    return [q.strip() for q in block.split(";") if "SELECT" in q]


def test_readme_queries(tmp_path):
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    run(tmp_path / "src", tmp_path / "out", CurateConfig(), use_ray=False)
    queries = [q.replace("'out/", f"'{tmp_path}/out/") for q in readme_queries()]
    assert len(queries) == 3
    per_bucket, reasons, near_dupes = (duckdb.sql(q).fetchall() for q in queries)
    assert per_bucket and all(len(r[2]) == 3 for r in per_bucket)
    assert reasons and all(isinstance(r[0], str) and r[1] > 0 for r in reasons)
    keys = {k for pair in near_dupes for k in pair[:2]}
    assert {"000000008", "000000009"} <= keys  # img_pair_1.jpg and img_pair_2.jpg
