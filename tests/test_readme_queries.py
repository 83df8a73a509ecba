"""The three DuckDB queries the README shows run on a real output and say what they claim, and give
the same answers on a copy of that output on S3 read through DuckDB's httpfs, set up as the README
tells users to."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest
from conftest import photo_samples, write_webdataset
from test_readers_s3 import upload_output

from schemas.config import CurateConfig
from tasks.runner import run
from tasks.storage import load_httpfs

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

README = Path(__file__).parents[1] / "README.md"


def readme_block(marker: str) -> str:
    """The README's SQL block that holds ``marker``."""
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), re.S)
    found = [b for b in blocks if marker in b]
    assert found, f"README.md has no ```sql block with {marker!r}"
    return found[0]


def readme_queries() -> list[str]:
    return [q.strip() for q in readme_block("FROM 'out/").split(";") if "SELECT" in q]


def readme_s3_secret(s3: S3Bucket) -> str:
    """The README's CREATE SECRET for an S3 output, with this server's keys and endpoint."""
    statement = re.search(r"CREATE SECRET \(.*?\)", readme_block("CREATE SECRET"), re.S).group(0)
    for name, value in (("KEY_ID", s3.access_key), ("SECRET", s3.secret_key), ("ENDPOINT", s3.endpoint),
                        ("REGION", s3.region)):
        statement = re.sub(rf"\b{name} '[^']*'", f"{name} '{value}'", statement)
    return statement


def run_queries(con: duckdb.DuckDBPyConnection, out: str) -> list[list[tuple]]:
    """The README's queries with its `out/` replaced by ``out`` (a folder or an s3:// URL)."""
    return [con.sql(q.replace("'out/", f"'{out}/")).fetchall() for q in readme_queries()]


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    write_webdataset(root / "src" / "0.tar", photo_samples())
    run(root / "src", root / "out", CurateConfig(), use_ray=False)
    return root / "out"


def test_readme_queries(curated):
    queries = run_queries(duckdb.connect(), str(curated))
    assert len(queries) == 3
    per_bucket, reasons, near_dupes = queries
    assert per_bucket and all(len(r[2]) == 3 for r in per_bucket)
    assert reasons and all(isinstance(r[0], str) and r[1] > 0 for r in reasons)
    keys = {k for pair in near_dupes for k in pair[:2]}
    assert {"000000008", "000000009"} <= keys  # img_pair_1.jpg and img_pair_2.jpg


def test_readme_queries_on_s3(curated, s3: S3Bucket):
    url = upload_output(curated, s3)
    con = duckdb.connect()
    con.execute(load_httpfs())  # the README's `LOAD httpfs`, from the duckdb-extension-httpfs wheel: no download
    con.execute(readme_s3_secret(s3))
    remote, local = run_queries(con, url), run_queries(duckdb.connect(), str(curated))
    assert all(local)
    assert [sorted(rows) for rows in remote] == [sorted(rows) for rows in local]  # ties may come in any order


def test_readme_queries_on_analyze_output(tmp_path):
    """`t2i analyze` rejects nothing decodable: each shard still writes an (empty) rejects part, so the
    rejects query reads zero rows instead of failing on a glob with no file."""
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    run(tmp_path / "src", tmp_path / "out", CurateConfig(), mode="analyze", use_ray=False)
    per_bucket, reasons, near_dupes = run_queries(duckdb.connect(), str(tmp_path / "out"))
    assert reasons == [] and per_bucket and near_dupes
    assert sum(n for _, n, _ in per_bucket) == len(list(photo_samples()))
