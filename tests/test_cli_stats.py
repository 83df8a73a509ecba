"""`t2i curate | analyze | stats` as a user runs them, on a real Ray runtime and DuckDB."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
from conftest import photo_samples, write_webdataset


def t2i(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], capture_output=True, text=True, timeout=300)


def test_curate_then_stats(tmp_path):
    for t in range(3):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t}-"))
    (tmp_path / "c.yaml").write_text("rules:\n  short_side: {min: 400}\n  sharpness: {min: 200}\n")
    result = t2i("curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "c.yaml"), "--workers", "2")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["shards_done"] == 3 and summary["failed"] == {}

    stats = json.loads(t2i("stats", str(tmp_path / "out"), "--json").stdout)
    shards = f"read_parquet('{tmp_path}/out/shards/*.parquet')"
    assert stats["kept"] == summary["kept"] == duckdb.sql(f"SELECT count(*) FROM {shards}").fetchall()[0][0]
    assert stats["rejected"] == summary["rejected"] == 3 * 12 - summary["kept"]
    assert set(stats["reasons"]) <= {"short_side_below_min", "sharpness_below_min"}
    assert stats["signals"]["short_side"]["min"] >= 400 and stats["signals"]["sharpness"]["min"] >= 200
    median = duckdb.sql(f"SELECT quantile_cont(sharpness, 0.5) FROM {shards}").fetchall()[0][0]
    assert abs(stats["signals"]["sharpness"]["p50"] - median) < 1e-3
    assert sum(b["rows"] for b in stats["buckets"]) == stats["kept"]
    assert stats["duplicate_keys"] == 0

    table = t2i("stats", str(tmp_path / "out")).stdout
    assert "reject reasons" in table and "sharpness" in table and "buckets" in table


def test_bad_config_fails_before_any_work(tmp_path):
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    (tmp_path / "c.yaml").write_text("rules:\n  sharpnes: {min: 1}\n")
    result = t2i("curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "sharpnes" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_source_and_output(tmp_path):
    result = t2i("curate", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "source not found" in result.stderr
    result = t2i("stats", str(tmp_path / "nope"))
    assert result.returncode == 2 and "no such output folder" in result.stderr
