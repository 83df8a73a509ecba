"""gs:// against a real GCS emulator (fake-gcs-server on 127.0.0.1, tests/gcs_server.py): the store
through pyarrow's GcsFileSystem, the output's lease through the JSON API's generation preconditions
(one holder, takeover of a killed holder's lease after its ttl, racing takers), and `t2i curate`
from gs:// to gs:// giving what a local curation gives."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_lease import holder, race_for_stale_leases, take_when_free
from test_s3_curate import CONFIG, cli, make_source

from schemas.config import StorageConfig
from tasks.lease import GcsObject, Lease
from tasks.lock import OutputLocked, lock_lost, output_lock
from tasks.storage import StorageError, Store, open_store

if TYPE_CHECKING:
    from gcs_server import GcsBucket

pytest_plugins = ["gcs_server"]  # the fixtures gcs_server, gcs


def storage(gcs: GcsBucket) -> StorageConfig:
    return StorageConfig(endpoint_url=gcs.endpoint_url)


def lease_body(gcs: GcsBucket, key: str = "out/_lock") -> dict | None:
    got = gcs.get(key)
    return json.loads(got.body) if got.status == 200 else None


# --------------------------------------------------------------------------------------------- the store


def test_store_round_trip_on_gs_lists_reads_writes_and_deletes(gcs: GcsBucket):
    store = open_store(gcs.uri("data/"), storage(gcs))
    store.check()
    big = os.urandom(3_000_000)  # past one upload chunk
    table = pa.table({"key": [f"k{i}" for i in range(5)], "n": list(range(5))})
    store.write_bytes("a/big.bin", big)
    store.write_bytes("top.txt", b"top")
    store.write_parquet("t/part.parquet", table, row_group_rows=2)
    with store.open_writer("a/streamed.bin") as fh:
        for _ in range(3):
            fh.write(b"x" * 1000)
    assert gcs.names("data/") == ["data/a/big.bin", "data/a/streamed.bin", "data/t/part.parquet", "data/top.txt"]

    assert [e.rel for e in store.list()] == ["top.txt"]
    assert [(e.rel, e.size) for e in store.list(recursive=True)] == [
        ("a/big.bin", len(big)), ("a/streamed.bin", 3000), ("t/part.parquet", store.info("t/part.parquet").size),
        ("top.txt", 3)]
    assert [e.rel for e in store.list("t", suffix=".parquet")] == ["t/part.parquet"]
    assert store.list("no-such-folder") == [] and store.info("nothing") is None and not store.exists("a")
    assert store.info("a/big.bin").size == len(big) and store.info("a/big.bin").mtime_ns > 0

    assert store.read_bytes("a/big.bin") == big
    with store.open_input_stream("a/big.bin") as fh:
        assert fh.read(10) == big[:10] and fh.read(10) == big[10:20]
    with store.open_input_file("a/big.bin") as fh:
        fh.seek(len(big) - 7)
        assert fh.read() == big[-7:] and fh.size() == len(big)
    assert pq.read_table(store.open_input_file("t/part.parquet")).equals(table)
    assert pq.ParquetFile(store.open_input_file("t/part.parquet")).metadata.num_row_groups == 3
    assert store.child("a").read_bytes("streamed.bin") == b"x" * 3000

    store.delete("top.txt")
    store.delete("never-written")  # nothing there: no error
    store.delete_tree("a")
    assert gcs.names("data/") == ["data/t/part.parquet"]
    with pytest.raises(StorageError, match=r"the bucket .*-missing does not exist"):
        open_store(f"gs://{gcs.bucket}-missing/data", storage(gcs)).check()


def test_the_emulator_is_found_through_storage_emulator_host(gcs: GcsBucket, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint_url)
    open_store(gcs.uri("x"), StorageConfig()).write_bytes("one", b"1")
    assert gcs.get("x/one").body == b"1"
    with Lease(gcs.uri("x"), "run") as lease:
        assert lease_body(gcs, "x/_lock")["token"] == lease.info["token"]
    assert lease_body(gcs, "x/_lock") is None


# --------------------------------------------------------------------------------------------- the lease


def test_one_holder_at_a_time_named_in_the_refusal_and_a_released_lease_is_free(gcs: GcsBucket):
    url = gcs.uri("out")
    proc = holder(gcs, url, 0, "t2i curate --source gs://src")
    try:
        with pytest.raises(OutputLocked) as refused, output_lock(url, "t2i curate again", storage=storage(gcs)):
            pass
        text = str(refused.value)
        assert text.startswith(f"{url} is in use by pid {proc.pid} on {socket.gethostname()}, running since ")
        assert "(t2i curate --source gs://src); wait for that run to end or stop it, or use another --out" in text
        assert "if that run is dead, its lease expires in " in text
        assert lease_body(gcs)["pid"] == proc.pid  # refusing wrote nothing
    finally:
        proc.communicate("", timeout=30)  # stdin closed: the holder leaves its block and releases
    assert proc.returncode == 0
    assert lease_body(gcs) is None
    with output_lock(url, "the next run", storage=storage(gcs)):
        assert lease_body(gcs)["command"] == "the next run"
    assert lease_body(gcs) is None


def test_reentrant_in_one_process_and_exclusive_between_leases(gcs: GcsBucket):
    url, cfg = gcs.uri("out"), storage(gcs)
    with output_lock(url, "flow", storage=cfg) as outer:
        with output_lock(url + "/", "runner", storage=cfg) as inner:
            assert inner is outer and not lock_lost(url)
        assert lease_body(gcs)["command"] == "flow"
        with pytest.raises(OutputLocked, match=rf"in use by pid {os.getpid()} on .*\(flow\)"):
            Lease(url, "another lease", cfg).acquire()
    assert lease_body(gcs) is None


def test_a_killed_holders_lease_is_taken_over_after_its_ttl_and_not_before(gcs: GcsBucket):
    url, cfg = gcs.uri("out"), storage(gcs)
    proc = holder(gcs, url, 2, "killed run")
    try:
        time.sleep(3.1)  # past its ttl and the second of the dates: only its renewals keep it
        with pytest.raises(OutputLocked, match=rf"pid {proc.pid} .*\(killed run\)"):
            Lease(url, "too early", cfg, ttl_s=2).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with pytest.raises(OutputLocked, match=r"if that run is dead, its lease expires in \d+ s"):
            Lease(url, "too early", cfg, ttl_s=2).acquire()  # dead, but not yet expired
        lease = take_when_free(url, "next run", cfg)
    finally:
        proc.kill()
        proc.communicate()
    assert lease.previous["pid"] == proc.pid and lease.previous["command"] == "killed run"
    assert lease_body(gcs)["command"] == "next run"
    lease.release()
    assert lease_body(gcs) is None


def test_racing_takers_of_a_stale_lease_one_wins(gcs: GcsBucket):
    race_for_stale_leases(gcs.uri, storage(gcs), ["a", "b"], lambda key, data: gcs.put(key, data).status,
                          lambda key: lease_body(gcs, key))


def test_a_holder_whose_lease_was_overwritten_or_deleted_notices_and_leaves_the_others(gcs: GcsBucket):
    lost = threading.Event()
    lease = Lease(gcs.uri("out"), "first", storage(gcs), ttl_s=30, on_lost=lambda reason: lost.set()).acquire()
    other = {"host": "elsewhere", "pid": 4242, "started": "now", "command": "intruder", "ttl_s": 60}
    assert gcs.put("out/_lock", json.dumps(other).encode()).status == 200
    lease.renew()  # what the renewal thread does every ttl/3: ifGenerationMatch on our generation fails
    assert lost.is_set() and lease.lost and "taken by pid 4242 on elsewhere" in lease.lost_reason
    lease.release()
    assert lease_body(gcs) == other  # not deleted: it is the intruder's

    with output_lock(gcs.uri("next"), "run", storage=storage(gcs)) as held:
        held.lease.renew()
        assert not held.lost
        assert gcs.delete("next/_lock").status in (200, 204)  # fake-gcs-server says 200, GCS 204
        held.lease.renew()
        assert held.lost and lock_lost(gcs.uri("next")) and "deleted" in held.lease.lost_reason


def test_a_missing_bucket_is_a_storage_error_before_anything_is_written(gcs: GcsBucket):
    with pytest.raises(StorageError, match=r"cannot take the lease gs://.*-missing/out/_lock: the bucket does not"):
        Lease(f"gs://{gcs.bucket}-missing/out", "run", storage(gcs)).acquire()
    assert gcs.names() == []


@pytest.mark.xfail(strict=True, reason="fake-gcs-server 1.54 ignores ifGenerationMatch on DELETE (its deleteObject "
                   "reads no precondition), so a release's 'only my generation' is not checked by this emulator")
def test_a_delete_conditional_on_a_replaced_generation_is_refused(gcs: GcsBucket):
    lock = GcsObject(gcs.bucket, "out/_lock", storage(gcs))
    first = lock.put(b"{}", None)
    lock.put(b'{"later": 1}', first)
    with pytest.raises(lock.errors) as refused:
        lock.delete(first)
    assert lock.conflict(refused.value)


# --------------------------------------------------------------------------------------------- t2i curate


def upload(local: Path, gcs: GcsBucket, prefix: str) -> str:
    store = open_store(gcs.uri(prefix), storage(gcs))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
    return store.url()


def outcome(out: Store) -> tuple[list[tuple], list[tuple]]:
    """Kept keys with a signal, reject keys with reasons, read with pyarrow (DuckDB's httpfs cannot
    reach an emulator on gs://)."""

    def rows(folder: str, columns: list[str]) -> list[tuple]:
        tables = [pq.read_table(io.BytesIO(out.read_bytes(e.rel)), columns=columns)
                  for e in out.list(folder, suffix=".parquet")]
        return sorted(tuple(r.values()) for t in tables for r in t.to_pylist())

    return rows("shards", ["key", "sharpness", "bucket_width"]), rows("rejects", ["key", "reason"])


def test_curating_from_gs_to_gs_equals_curating_locally(tmp_path: Path, gcs: GcsBucket):
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    src = make_source(tmp_path / "src", 2)
    src_url = upload(src, gcs, "laion")
    local = cli("curate", "--source", str(src), "--out", str(tmp_path / "out"), "--config", str(config), "--no-ray",
                env={})
    assert local.returncode == 0, local.stderr
    remote = cli("curate", "--source", src_url, "--out", gcs.uri("curated"), "--config", str(config), "--no-ray",
                 env=gcs.env)
    assert remote.returncode == 0, remote.stderr
    kept, rejected = outcome(open_store(gcs.uri("curated"), storage(gcs)))
    assert (kept, rejected) == outcome(open_store(tmp_path / "out"))
    assert kept and {r for _, r in rejected} == {"sharpness_below_min"}
    names = gcs.names("curated/")
    assert "curated/_lock" not in names and not any("/_attempts/" in n or "/_tmp/" in n for n in names)

    stats = cli("stats", "--json", gcs.uri("curated"), env=gcs.env)
    assert stats.returncode == 0, stats.stderr
    assert f'"kept": {len(kept)}' in stats.stdout and f'"rejected": {len(rejected)}' in stats.stdout
    again = cli("curate", "--source", src_url, "--out", gcs.uri("curated"), "--config", str(config), "--no-ray",
                env=gcs.env)
    assert again.returncode == 0 and '"shards_skipped": 2' in again.stdout, again.stdout + again.stderr
    assert gcs.names("curated/") == names
