"""Attempts at one shard racing each other and the sweep (tasks/attempts.py): on the real S3 server
(no rename: parts in place under attempt-unique names) and locally (parts staged, renamed into
place after the commit). Nothing is deleted under a live attempt, a commit never lists a missing
part, and locally no part is visible before its commit."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest
from conftest import photo_samples, write_webdataset

import tasks.attempts as attempts
from schemas.config import Bounds, CurateConfig, StorageConfig
from tasks.attempts import Attempt, AttemptExpired, PartsMissing, clear_partial, settle, sweep_uncommitted
from tasks.process import process_shard
from tasks.runner import run
from tasks.shards import Manifest, committed_files
from tasks.sources import discover
from tasks.storage import LocalStore, Store, open_store

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

# 12 photos a tar, at most 4 kept rows a part: a shard writes several parts, as img2dataset's tars do.
CFG = CurateConfig(signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}},
                   rules={"sharpness": Bounds(min=300)},
                   output={"max_rows_per_shard": 4, "row_group_rows": 2})


def store_of(s3: S3Bucket, prefix: str) -> Store:
    return open_store(s3.uri(prefix), StorageConfig(endpoint_url=s3.endpoint_url, region=s3.region,
                                                    access_key_id=s3.access_key, secret_access_key=s3.secret_key))


def one_shard(root: Path):
    write_webdataset(root / "00000.tar", photo_samples("a"))
    [shard] = discover(root, CFG.source)
    return shard


def rows_read(store: Store, kind: str, files: list[str] | None = None) -> int:
    """Rows a reader gets: the given parts, or every part a glob of the folder sees."""
    names = files if files is not None else [e.rel for e in store.list(kind, ".parquet")]
    if not names:
        return 0
    return duckdb.execute(f"SELECT count(*) FROM read_parquet({[store.path(n) for n in names]!r})").fetchone()[0] \
        if store.renames else sum(_count(store, n) for n in names)


def _count(store: Store, rel: str) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(store.open_input_file(rel)).num_rows


class Gate:
    """Holds chosen attempts just before their commit until the test lets them go."""

    def __init__(self, monkeypatch):
        self.arrived: dict[int, threading.Event] = {}
        self.release: dict[int, threading.Event] = {}
        self.order: list[int] = []
        real = Attempt.commit
        local = threading.local()

        def commit(attempt: Attempt, entry: dict) -> dict:
            n = getattr(local, "n", None)
            if n is not None:
                self.arrived[n].set()
                assert self.release[n].wait(120)
                self.order.append(n)
            return real(attempt, entry)

        monkeypatch.setattr(Attempt, "commit", commit)
        self.local = local

    def run(self, n: int, work) -> threading.Thread:
        self.arrived[n], self.release[n] = threading.Event(), threading.Event()
        out: dict = {}

        def target():
            self.local.n = n
            try:
                out["result"] = work()
            except BaseException as exc:
                out["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.out = out  # type: ignore[attr-defined]
        thread.start()
        return thread


def test_two_live_attempts_on_s3_the_first_committing_last_lose_no_part(tmp_path, s3: S3Bucket, monkeypatch):
    """The filing's reproduction: attempt 1 writes its three parts and waits; attempt 2 starts (and
    clears what is over: nothing of attempt 1's), writes and commits; attempt 1 commits last and
    loses. The entry lists attempt 2's parts, every one of them exists, rows are there once."""
    shard, store = one_shard(tmp_path / "src"), store_of(s3, "out")
    gate = Gate(monkeypatch)
    first = gate.run(1, lambda: process_shard(shard, CFG, store))
    assert gate.arrived[1].wait(120)
    first_parts = {e.rel for e in store.list("shards")}
    assert len(first_parts) >= 2  # a multi-part shard, waiting to commit

    second = gate.run(2, lambda: process_shard(shard, CFG, store))
    assert gate.arrived[2].wait(120)
    assert first_parts <= {e.rel for e in store.list("shards")}  # attempt 2's start deleted nothing live
    gate.release[2].set()
    second.join(120)
    gate.release[1].set()
    first.join(120)
    assert "error" not in first.out and "error" not in second.out, (first.out, second.out)

    entry = Manifest(store).entry(shard.shard_id)
    assert gate.order == [2, 1] and first.out["result"].files == second.out["result"].files == entry["files"]
    assert all(store.exists(f) for f in entry["files"])
    kept = [f for f in entry["files"] if f.startswith("shards/")]
    assert rows_read(store, "shards", kept) == entry["kept"] == second.out["result"].kept > 4
    assert {e.rel for e in store.list("shards")} == set(kept)  # the loser removed its parts
    assert store.list("_attempts", recursive=True) == []


def test_the_sweep_leaves_a_late_live_attempt_alone_and_it_commits_whole(tmp_path, s3: S3Bucket, monkeypatch):
    """The end-of-run sweep racing an attempt on a cut-off node that is still writing: its parts
    stay, its commit lists parts that exist."""
    shard, store = one_shard(tmp_path / "src"), store_of(s3, "out")
    gate = Gate(monkeypatch)
    late = gate.run(1, lambda: process_shard(shard, CFG, store))
    assert gate.arrived[1].wait(120)
    before = {e.rel for e in store.list("shards")}
    assert sweep_uncommitted(store) == 0
    assert {e.rel for e in store.list("shards")} == before
    gate.release[1].set()
    late.join(120)
    entry = Manifest(store).entry(shard.shard_id)
    assert "error" not in late.out and all(store.exists(f) for f in entry["files"])
    assert rows_read(store, "shards", [f for f in entry["files"] if f.startswith("shards/")]) == entry["kept"]


def test_an_attempt_whose_heartbeat_lapsed_is_cleared_and_may_not_commit(tmp_path, s3: S3Bucket):
    """Another host's attempt (so its pid says nothing) whose record went unrenewed past its ttl is
    over: a new attempt removes its parts; should it wake up, its commit is refused, not a manifest
    entry listing deleted parts."""
    import pyarrow as pa

    from tasks.parts import PartWriter

    store = store_of(s3, "out")
    schema = pa.schema([("key", pa.string())])
    stalled = Attempt(store, "s1", ttl_s=2)
    writer = PartWriter(store, "shards", "s1", schema, 2, 1 << 20, 2, attempt=stalled)
    writer.add(pa.record_batch([pa.array(["a", "b", "c"])], schema=schema))
    writer.flush()
    assert len(writer.files) == 2 and all(store.exists(f) for f in writer.files)
    body = store.read_bytes(stalled.record).replace(b'"host": "', b'"host": "elsewhere-')
    store.write_bytes(stalled.record, body)  # as written from another machine

    assert settle(store, "s1") == 0  # fresh: left alone
    time.sleep(4)  # past its ttl by the server's clock (whole-second dates)
    assert settle(store, "s1") == 1
    assert not any(store.exists(f) for f in writer.files) and not store.exists(stalled.record)
    with pytest.raises(AttemptExpired, match="unrenewed"):
        stalled.commit({"shard_id": "s1", "kept": 3, "files": writer.files})
    assert not store.exists("_manifest/s1.json")


def test_a_commit_refuses_to_list_a_missing_part(tmp_path):
    import pyarrow as pa

    from tasks.parts import PartWriter

    store = LocalStore(tmp_path / "out")
    schema = pa.schema([("key", pa.string())])
    attempt = Attempt(store, "s1")
    writer = PartWriter(store, "shards", "s1", schema, 2, 1 << 20, 2, attempt=attempt)
    writer.add(pa.record_batch([pa.array(["a", "b", "c"])], schema=schema))
    writer.flush()
    store.delete(attempt.staged(writer.files[1]))
    with pytest.raises(PartsMissing, match=writer.files[1]):
        attempt.commit({"shard_id": "s1", "kept": 3, "files": writer.files})
    assert not store.exists("_manifest/s1.json") and store.list("shards") == []


def test_local_parts_stay_invisible_when_the_entry_write_fails(tmp_path, monkeypatch):
    """ENOSPC on the manifest entry: nothing reaches shards/ or rejects/ (the filing's 'manifest
    says 12, readers read 24'); the retry commits once and readers read what the entry says."""
    shard, store = one_shard(tmp_path / "src"), LocalStore(tmp_path / "out")
    real = LocalStore.create

    def full(self, rel, data):
        if rel.startswith("_manifest/"):
            raise OSError(errno.ENOSPC, "No space left on device", self.path(rel))
        return real(self, rel, data)

    monkeypatch.setattr(LocalStore, "create", full)
    with pytest.raises(OSError, match="No space"):
        process_shard(shard, CFG, store)
    assert store.list("shards") == [] and store.list("rejects") == [] and not store.exists("_manifest")
    assert not (tmp_path / "out" / "_tmp").exists() or not any((tmp_path / "out" / "_tmp").rglob("*.parquet"))
    monkeypatch.setattr(LocalStore, "create", real)
    result = process_shard(shard, CFG, store)
    assert rows_read(store, "shards") == result.kept == Manifest(store).entry(shard.shard_id)["kept"]
    assert rows_read(store, "rejects") == result.rejected


def test_a_kill_between_the_commit_and_the_renames_is_rolled_forward(tmp_path, monkeypatch):
    """Killed after the entry and before the parts are renamed into place: readers see none of the
    shard's parts (never uncommitted ones), and the next run publishes them: the output equals an
    uninterrupted one."""
    src = tmp_path / "src"
    for t in range(2):
        write_webdataset(src / f"{t:05d}.tar", photo_samples(f"{t}"))
    run(src, tmp_path / "ref", CFG, use_ray=False)

    def killed(*args):
        raise SystemExit("killed between the commit and the renames")

    monkeypatch.setattr(attempts, "publish", killed)
    with pytest.raises(SystemExit):
        run(src, tmp_path / "out", CFG, use_ray=False)
    out = LocalStore(tmp_path / "out")
    [victim] = Manifest(out).done_ids()
    assert not any(e.rel.startswith(victim) for kind in ("shards", "rejects") for e in out.list(kind))
    monkeypatch.undo()
    summary = run(src, tmp_path / "out", CFG, use_ray=False)
    assert summary.shards_skipped == 1 and summary.shards_done == 1

    def keys(root: Path, kind: str) -> list[tuple]:
        return duckdb.execute(f"SELECT key FROM '{root}/{kind}/*.parquet' ORDER BY key").fetchall()

    for kind in ("shards", "rejects"):
        assert keys(tmp_path / "out", kind) == keys(tmp_path / "ref", kind)
    assert committed_files(out, "shards") == [out.url(e.rel) for e in out.list("shards", ".parquet")]
    assert not (tmp_path / "out" / "_tmp").exists() and out.list("_attempts", recursive=True) == []


def test_a_failed_attempt_removes_its_own_parts(tmp_path, monkeypatch):
    """A shard failing mid-way (after parts were closed) leaves nothing for the retry to wait out."""
    shard, store = one_shard(tmp_path / "src"), LocalStore(tmp_path / "out")
    import tasks.process as process

    real = process.read_shard

    def breaks_late(*args, **kwargs):
        batches = list(real(*args, **kwargs))
        yield from batches
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(process, "read_shard", breaks_late)
    with pytest.raises(OSError, match="Input/output"):
        process_shard(shard, CFG, store)
    assert not store.list("_attempts", recursive=True)
    assert not (tmp_path / "out" / "_tmp").exists() or not any((tmp_path / "out" / "_tmp").rglob("*"))
    clear_partial(store, shard.shard_id)  # nothing left to settle
    assert store.list("shards") == []
