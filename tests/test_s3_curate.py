"""`t2i curate` from and to a real S3 server (SeaweedFS on 127.0.0.1, tests/s3_server.py): the same
result as a local curation, a kill -9 and a rerun, and clear errors before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow.fs as pafs
import pytest
from conftest import photo_samples, write_webdataset

from schemas.config import StorageConfig
from tasks.shards import Manifest
from tasks.storage import Store, open_store

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

CONFIG = """signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}}
rules: {sharpness: {min: 300}}
output: {max_rows_per_shard: 4, row_group_rows: 2}
"""


def upload(local: Path, s3: S3Bucket, prefix: str) -> str:
    """Copy a local folder into the bucket under ``prefix``; returns its s3:// URL."""
    fs = s3.filesystem()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(s3.path(f"{prefix}/{path.relative_to(local).as_posix()}")) as fh:
            fh.write(path.read_bytes())
    return s3.uri(prefix)


def store_of(s3: S3Bucket, prefix: str) -> Store:
    """The bucket's prefix as a store, with its keys given explicitly (this process's environment
    stays without them)."""
    return open_store(s3.uri(prefix), StorageConfig(endpoint_url=s3.endpoint_url, region=s3.region,
                                                    access_key_id=s3.access_key, secret_access_key=s3.secret_key))


def make_source(root: Path, tars: int) -> Path:
    """img2dataset's webdataset layout: NNNNN.tar of KEY.jpg + KEY.txt + KEY.json."""
    for t in range(tars):
        write_webdataset(root / f"{t:05d}.tar", photo_samples(f"{t:03d}"))
    return root


def connect(s3: S3Bucket | None) -> duckdb.DuckDBPyConnection:
    """DuckDB as the README tells users to set it up for S3: httpfs, one secret, path-style URLs."""
    con = duckdb.connect()
    if s3 is not None:
        from tasks.storage import duckdb_setup

        con.execute(duckdb_setup(store_of(s3, ""))[0])  # LOAD httpfs from its wheel
        con.execute(f"CREATE SECRET (TYPE s3, KEY_ID '{s3.access_key}', SECRET '{s3.secret_key}', "
                    f"ENDPOINT '{s3.endpoint}', URL_STYLE 'path', USE_SSL false, REGION '{s3.region}')")
    return con


def outcome(out: str, s3: S3Bucket | None = None) -> tuple[list[tuple], list[tuple]]:
    """Kept keys with a signal, reject keys with reasons: what two curations must agree on."""
    con = connect(s3)
    kept = con.sql(f"SELECT key, sharpness, bucket_width FROM '{out}/shards/*.parquet' ORDER BY key").fetchall()
    rejected = con.sql(f"SELECT key, reason FROM '{out}/rejects/*.parquet' ORDER BY key").fetchall()
    return kept, rejected


def cli(*args: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, **kwargs)


def objects(s3: S3Bucket, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix`` with its bytes; one deleted between the listing and its read
    (an attempt's record, by a run still going) is left out."""
    fs = s3.filesystem()
    found = fs.get_file_info(pafs.FileSelector(s3.path(prefix), recursive=True, allow_not_found=True))
    read = {}
    for f in found:
        if f.type == pafs.FileType.File:
            try:
                read[f.path] = fs.open_input_stream(f.path).read()
            except FileNotFoundError:
                continue
    return read


def sixteen_tars_with_a_short_lease(tmp_path: Path, s3: S3Bucket, config: Path) -> str:
    """16 tars uploaded (enough for a run to be stopped mid-way), a 3 s lease in ``config``, and
    the local curation of the same tars in ``tmp_path/ref``; returns the source's URL."""
    src = make_source(tmp_path / "src", 16)
    with config.open("a") as fh:
        fh.write("storage: {lease_ttl_s: 3}\n")
    ref = cli("curate", "--source", str(src), "--out", str(tmp_path / "ref"), "--config", str(config), "--no-ray",
              env={})
    assert ref.returncode == 0, ref.stderr
    return upload(src, s3, "laion")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def test_curating_from_s3_to_s3_equals_curating_locally(tmp_path: Path, s3: S3Bucket, config: Path):
    src = make_source(tmp_path / "src", 3)
    src_url = upload(src, s3, "laion")
    local = cli("curate", "--source", str(src), "--out", str(tmp_path / "out"), "--config", str(config), "--no-ray",
                env={})
    assert local.returncode == 0, local.stderr
    remote = cli("curate", "--source", src_url, "--out", s3.uri("curated"), "--config", str(config), "--no-ray",
                 env=s3.env)
    assert remote.returncode == 0, remote.stderr
    kept, rejected = outcome(s3.uri("curated"), s3)
    assert (kept, rejected) == outcome(str(tmp_path / "out"))
    assert kept and rejected  # both sides of the rule are exercised
    assert {r for _, r in rejected} == {"sharpness_below_min"}
    stored = objects(s3, "curated")
    assert not any("/_attempts/" in k or "/_tmp/" in k for k in stored)  # nothing uncommitted left
    assert all(s3.secret_key.encode() not in data for data in stored.values())  # no secret in any output
    assert s3.secret_key not in remote.stdout + remote.stderr
    entries = Manifest(store_of(s3, "curated")).entries()
    assert {e["source"] for e in entries} == {f"{src_url}/{t:05d}.tar" for t in range(3)}
    assert sorted(f for e in entries for f in e["files"]) == sorted(
        k.removeprefix(s3.path("curated") + "/") for k in stored if "/shards/" in k or "/rejects/" in k)

    stats = cli("stats", "--json", s3.uri("curated"), env=s3.env)
    assert stats.returncode == 0, stats.stderr
    assert f'"kept": {len(kept)}' in stats.stdout and f'"rejected": {len(rejected)}' in stats.stdout
    again = cli("curate", "--source", src_url, "--out", s3.uri("curated"), "--config", str(config), "--no-ray",
                env=s3.env)
    assert again.returncode == 0 and '"shards_skipped": 3' in again.stdout
    assert objects(s3, "curated").keys() == stored.keys()


def test_kill_dash_nine_on_s3_then_rerun_gives_the_uninterrupted_result(tmp_path: Path, s3: S3Bucket,
                                                                        config: Path):
    src_url = sixteen_tars_with_a_short_lease(tmp_path, s3, config)
    out = s3.uri("curated")
    args = [sys.executable, "-m", "t2i.cli", "curate", "--source", src_url, "--out", out, "--config", str(config),
            "--no-ray"]
    proc = subprocess.Popen(args, env={**os.environ, **s3.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = Manifest(store_of(s3, "curated"))
    deadline = time.monotonic() + 120
    while len(manifest.done_ids()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # mid-shard: a part of the next shard written, its manifest entry not
    while not any("/_attempts/" in k for k in objects(s3, "curated")) and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(manifest.done_ids())
    assert 3 <= done_at_kill < 16, "the kill must land mid-run"

    refused = cli(*args[3:], env=s3.env)  # the killed run's lease has not expired yet
    assert refused.returncode == 2 and "is in use by pid" in refused.stderr, refused.stderr
    for _ in range(60):  # after the lease's ttl (3 s) a rerun takes over
        resumed = cli(*args[3:], env=s3.env)
        if resumed.returncode != 2 or "is in use" not in resumed.stderr:
            break
        time.sleep(1)
    assert resumed.returncode == 0, resumed.stderr
    assert f'"shards_skipped": {done_at_kill}' in resumed.stdout
    assert outcome(out, s3) == outcome(str(tmp_path / "ref"))
    assert not any("/_attempts/" in k for k in objects(s3, "curated"))


@pytest.mark.parametrize("what", ["wrong secret", "missing output bucket", "missing source bucket",
                                  "missing source prefix"])
def test_bad_credentials_or_buckets_fail_before_any_work(tmp_path: Path, s3: S3Bucket, config: Path, what: str):
    src_url = upload(make_source(tmp_path / "src", 1), s3, "laion")
    env, source, out = dict(s3.env), src_url, s3.uri("curated")
    if what == "wrong secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    elif what == "missing output bucket":
        out = f"s3://{s3.bucket}-missing/curated"
    elif what == "missing source bucket":
        source = f"s3://{s3.bucket}-missing/laion"
    else:
        source = s3.uri("no-such-prefix")
    result = cli("curate", "--source", source, "--out", out, "--config", str(config), "--no-ray", env=env,
                 timeout=60)
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    expected = {"wrong secret": "wrong secret key", "missing output bucket": "does not exist",
                "missing source bucket": "does not exist", "missing source prefix": "no-such-prefix"}[what]
    assert error.startswith("error: ") and expected in error, result.stderr
    assert "not-the-secret" not in result.stderr and s3.secret_key not in result.stderr
    assert objects(s3, "curated") == {}  # nothing written: not a stamp, not a lock


def test_a_run_whose_lease_is_taken_stops_and_a_rerun_completes_it(tmp_path: Path, s3: S3Bucket, config: Path):
    """Someone else's lease in place of ours (the store unreachable for a ttl, then another run took
    over): the run stops handing out shards, exits 2 naming the lost lock; a later run resumes."""
    src_url = sixteen_tars_with_a_short_lease(tmp_path, s3, config)
    args = ["curate", "--source", src_url, "--out", s3.uri("curated"), "--config", str(config), "--no-ray"]
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **s3.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest = Manifest(store_of(s3, "curated"))
    while len(manifest.done_ids()) < 2 and proc.poll() is None:
        time.sleep(0.05)
    store_of(s3, "curated").write_bytes("_lock", b'{"pid": 1, "host": "elsewhere", "command": "another run"}')
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: the lock on s3://" in stderr and "was lost" in stderr, stderr
    assert len(manifest.done_ids()) < 16
    assert store_of(s3, "curated").read_bytes("_lock").startswith(b'{"pid": 1')  # the other's lease stays
    store_of(s3, "curated").delete("_lock")  # that other run ended
    resumed = cli(*args, env=s3.env)
    assert resumed.returncode == 0, resumed.stderr
    assert outcome(s3.uri("curated"), s3) == outcome(str(tmp_path / "ref"))


def test_two_attempts_at_one_shard_commit_once_and_the_loser_leaves_nothing(s3: S3Bucket):
    """An attempt on a lost node that went on writing, and its retry elsewhere, both finish: the
    first commit stands, the second deletes its parts; a sweep then leaves only committed parts."""
    import pyarrow as pa

    from tasks.attempts import Attempt, sweep_uncommitted
    from tasks.parts import PartWriter
    from tasks.shards import committed_files

    store = store_of(s3, "out")
    schema = pa.schema([("key", pa.string())])

    def attempt_writing(keys: list[str]) -> tuple[Attempt, dict]:
        attempt = Attempt(store, "s1")
        writer = PartWriter(store, "shards", "s1", schema, 2, 1 << 20, 2, attempt=attempt)
        writer.add(pa.record_batch([pa.array(keys)], schema=schema))
        writer.flush()
        return attempt, {"shard_id": "s1", "kept": len(keys), "files": writer.files}

    first, first_entry = attempt_writing(["a", "b", "c"])
    second, second_entry = attempt_writing(["a", "b", "c"])
    standing = first.commit(first_entry)
    assert standing == first_entry | {"attempt": first.token}
    assert second.commit(second_entry) == standing  # the loser learns what stands
    assert committed_files(store, "shards") == [store.url(f) for f in first_entry["files"]]
    assert {e.rel for e in store.list("shards")} == set(first_entry["files"])
    assert store.list("_attempts", recursive=True) == []
    again, _ = attempt_writing(["x"])  # killed before its commit, record lost: an orphan part
    store.delete(again.record)
    assert sweep_uncommitted(store) == 1
    assert {e.rel for e in store.list("shards")} == set(first_entry["files"])
