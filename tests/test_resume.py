"""Atomic parts, resume after a crash (a real kill -9), and the cross-shard key pass."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import yaml
from conftest import photo_samples, write_webdataset

from schemas.config import Bounds, CurateConfig, OutputConfig
from tasks.dedupe import dedupe_keys
from tasks.runner import run
from tasks.shards import Manifest
from tasks.sources import discover

CONFIG = "signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}}\nrules: {sharpness: {min: 300}}\n"


def outcome(out: Path) -> tuple[list[tuple], list[tuple]]:
    kept = duckdb.sql(f"SELECT key, sharpness, bucket_width FROM read_parquet('{out}/shards/*.parquet') ORDER BY key")
    rejected = duckdb.sql(f"SELECT key, reason FROM read_parquet('{out}/rejects/*.parquet') ORDER BY key")
    return kept.fetchall(), rejected.fetchall()


def make_source(root: Path, tars: int) -> Path:
    for t in range(tars):
        write_webdataset(root / f"{t:05d}.tar", photo_samples(f"{t:03d}"))
    return root


def test_parts_are_cut_by_rows_and_the_run_is_idempotent(tmp_path):
    src = make_source(tmp_path / "src", 2)
    cfg = CurateConfig(output=OutputConfig(max_rows_per_shard=5, row_group_rows=2),
                       rules={"sharpness": Bounds(min=300)})
    first = run(src, tmp_path / "out", cfg, use_ray=False)
    parts = sorted((tmp_path / "out" / "shards").glob("*.parquet"))
    assert all(pq.read_metadata(p).num_rows <= 5 for p in parts) and len(parts) >= 2
    metas = [pq.read_metadata(p) for p in parts]
    groups = [m.row_group(i).num_rows for m in metas for i in range(m.num_row_groups)]
    assert max(groups) == 2 and sum(groups) == sum(m.num_rows for m in metas)  # small row groups for readers
    assert not list((tmp_path / "out").rglob("*.tmp-*"))
    before = outcome(tmp_path / "out")
    again = run(src, tmp_path / "out", cfg, use_ray=False)
    assert again.shards_skipped == 2 and again.shards_done == 0
    assert outcome(tmp_path / "out") == before
    assert first.kept == len(before[0]) and first.rejected == len(before[1])


def test_leftovers_of_a_crashed_attempt_are_cleared(tmp_path):
    src = make_source(tmp_path / "src", 2)
    cfg = CurateConfig(rules={"sharpness": Bounds(min=300)})
    run(src, tmp_path / "ref", cfg, use_ray=False)
    run(src, tmp_path / "out", cfg, use_ray=False)
    victim = sorted(Manifest(tmp_path / "out").done_ids())[0]
    (tmp_path / "out" / "_manifest" / f"{victim}.json").unlink()  # as if killed before the manifest write
    (tmp_path / "out" / "_tmp" / victim).mkdir(parents=True)
    (tmp_path / "out" / "_tmp" / victim / "shards-x.parquet").write_bytes(b"half a file")
    summary = run(src, tmp_path / "out", cfg, use_ray=False)
    assert summary.shards_done == 1 and summary.shards_skipped == 1
    assert outcome(tmp_path / "out") == outcome(tmp_path / "ref")
    assert not (tmp_path / "out" / "_tmp" / victim).exists()


def test_kill_dash_nine_then_resume_loses_and_duplicates_nothing(tmp_path):
    src = make_source(tmp_path / "src", 24)
    (tmp_path / "c.yaml").write_text(CONFIG)
    cmd = [sys.executable, "-m", "t2i.cli", "curate", "--source", str(src), "--config", str(tmp_path / "c.yaml")]
    subprocess.run([*cmd, "--out", str(tmp_path / "ref"), "--no-ray"], check=True, capture_output=True)

    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "out"), "--no-ray"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(Manifest(tmp_path / "out").done_ids()) < 3 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(Manifest(tmp_path / "out").done_ids())
    assert 3 <= done_at_kill < 24, "the kill must land mid-run"

    resumed = subprocess.run([*cmd, "--out", str(tmp_path / "out"), "--no-ray"], check=True, capture_output=True,
                             text=True)
    assert f'"shards_skipped": {done_at_kill}' in resumed.stdout
    assert outcome(tmp_path / "out") == outcome(tmp_path / "ref")


def test_another_config_on_the_same_output_is_refused(tmp_path):
    src = make_source(tmp_path / "src", 1)
    run(src, tmp_path / "out", CurateConfig(), use_ray=False)
    result = subprocess.run([sys.executable, "-m", "t2i.cli", "curate", "--source", str(src), "--out",
                             str(tmp_path / "out"), "--config", str(_write(tmp_path, CONFIG)), "--no-ray"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "rules.sharpness.min" in result.stderr
    assert "signals.faces" in result.stderr  # the settings, by their paths (faces: on by default, not here)


def test_resume_accepts_new_defaults_and_other_output_or_run_settings(tmp_path):
    """A run stamped by older code (a setting added since, with its default) or resumed with other
    part sizes or worker counts is the same curation: it resumes instead of being refused."""
    src = make_source(tmp_path / "src", 2)
    cfg = CurateConfig.model_validate(yaml.safe_load(CONFIG))
    first = run(src, tmp_path / "out", cfg, use_ray=False, shards=discover(src, cfg.source)[:1])
    stamp = tmp_path / "out" / "_run.json"
    old = json.loads(stamp.read_text())
    del old["config"]["output"]["row_group_rows"], old["config"]["decode"]["max_file_bytes"]  # "older code"
    stamp.write_text(json.dumps(old))
    other = cfg.model_copy(update={"output": OutputConfig(max_rows_per_shard=3)})
    second = run(src, tmp_path / "out", other, use_ray=False)
    assert (first.shards_done, second.shards_skipped, second.shards_done) == (1, 1, 1)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return path


def test_duplicate_keys_across_shards_keep_the_first(tmp_path):
    src = tmp_path / "src"
    write_webdataset(src / "a.tar", photo_samples())
    write_webdataset(src / "b.tar", photo_samples())  # the same keys again
    cfg = CurateConfig(rules={})
    summary = run(src, tmp_path / "out", cfg, use_ray=False)
    kept, rejected = outcome(tmp_path / "out")
    n = len(list(photo_samples()))
    assert len(kept) == n and len({k for k, *_ in kept}) == n
    assert [r for _, r in rejected] == ["duplicate_key"] * n
    assert summary.duplicates_moved == n and summary.kept == n and summary.rejected == n
    sources = duckdb.sql(f"SELECT DISTINCT source FROM read_parquet('{tmp_path}/out/shards/*.parquet')").fetchall()
    assert sources == [(str(src / "a.tar"),)]
    assert dedupe_keys(tmp_path / "out") == 0  # idempotent
    assert outcome(tmp_path / "out") == (kept, rejected)


def test_a_later_dedupe_pass_keeps_the_rows_an_earlier_pass_moved(tmp_path):
    """Pass 1 moves ccc's k1 (bbb has it first); a shard that sorts first (aaa, with k2) finishes in a
    later run, so pass 2 moves ccc's k2 too: both moved rows stay in rejects/, none is overwritten."""
    import pyarrow as pa

    from schemas.arrow import KEPT_BASE

    def part(name: str, keys: list[str]) -> None:
        (tmp_path / "out" / "shards").mkdir(parents=True, exist_ok=True)
        cols = {f.name: pa.array([None] * len(keys), f.type) for f in KEPT_BASE}
        cols |= {"key": pa.array(keys), "image": pa.array([b"x"] * len(keys)), "source": pa.array([name] * len(keys))}
        pq.write_table(pa.table(cols, schema=pa.schema(KEPT_BASE)), tmp_path / "out" / "shards" / f"{name}.parquet")

    part("bbb", ["k1"])
    part("ccc", ["k1", "k2"])
    assert dedupe_keys(tmp_path / "out") == 1
    part("aaa", ["k2"])
    assert dedupe_keys(tmp_path / "out") == 1
    shards = duckdb.sql(f"SELECT source, key FROM '{tmp_path}/out/shards/*.parquet' ORDER BY ALL").fetchall()
    rejects = duckdb.sql(f"SELECT source, key, reason FROM '{tmp_path}/out/rejects/*.parquet' ORDER BY ALL").fetchall()
    assert shards == [("aaa", "k2"), ("bbb", "k1")]
    assert rejects == [("ccc", "k1", "duplicate_key"), ("ccc", "k2", "duplicate_key")]
