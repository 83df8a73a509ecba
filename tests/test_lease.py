"""The output's lease on an object store (tasks/lease.py, and output_lock on s3://), against a real S3
(SeaweedFS on 127.0.0.1): holders in other processes, a holder killed with SIGKILL, racing takers."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from schemas.config import StorageConfig
from tasks.lease import Lease
from tasks.lock import OutputLocked, lock_lost, note_ray, output_lock
from tasks.storage import StorageError

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]  # the fixtures s3_server, s3 (tests/s3_server.py); not imported above, so that
# pytest rewrites its asserts

ROOT = Path(__file__).resolve().parents[1]

# A holder in a process of its own: takes the lease, says so, then waits (for stdin to close, or a kill).
HOLDER = """
import sys
from tasks.lease import Lease
from tasks.lock import output_lock

url, ttl, command = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if ttl:
    Lease(url, command, ttl_s=ttl).acquire()
    print("held", flush=True)
    sys.stdin.read()
else:
    with output_lock(url, command):
        print("held", flush=True)
        sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def _no_aws_files(monkeypatch):
    """Nothing from the machine's ~/.aws or instance metadata: the test says where and who."""
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def storage(s3: S3Bucket, **changes) -> StorageConfig:
    fields = {"endpoint_url": s3.endpoint_url, "region": s3.region, "access_key_id": s3.access_key,
              "secret_access_key": s3.secret_key}
    return StorageConfig(**(fields | changes))


def body(s3: S3Bucket, key: str) -> dict | None:
    got = s3.request("GET", key)
    return json.loads(got.body) if got.status == 200 else None


def holder(s3: S3Bucket, url: str, ttl_s: float, command: str) -> subprocess.Popen:
    """A process holding ``url``'s lease (``ttl_s`` 0: through output_lock, its default ttl), with its
    settings from the environment."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(ttl_s), command], cwd=ROOT,
                            env=os.environ | s3.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        pytest.fail(f"the holder did not take the lease: {proc.communicate()[1]}")
    return proc


def take_when_free(url: str, command: str, cfg: StorageConfig, deadline_s: float = 20) -> Lease:
    """Acquire, retrying every quarter second while it is refused."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return Lease(url, command, cfg, ttl_s=2).acquire()
        except OutputLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def test_one_holder_at_a_time_named_in_the_refusal_and_a_released_lease_is_free(s3: S3Bucket):
    url = s3.uri("out")
    proc = holder(s3, url, 0, "t2i curate --source s3://src")
    try:
        with pytest.raises(OutputLocked) as refused, output_lock(url, "t2i curate again", storage=storage(s3)):
            pass
        text = str(refused.value)
        assert text.startswith(f"{url} is in use by pid {proc.pid} on {socket.gethostname()}, running since ")
        assert "(t2i curate --source s3://src); wait for that run to end or stop it, or use another --out" in text
        assert "if that run is dead, its lease expires in " in text
        assert body(s3, "out/_lock")["pid"] == proc.pid  # refusing wrote nothing
    finally:
        proc.communicate("", timeout=30)  # stdin closed: the holder leaves its block and releases
    assert proc.returncode == 0
    assert body(s3, "out/_lock") is None  # deleted on release
    with output_lock(url, "the next run", storage=storage(s3)):
        assert body(s3, "out/_lock")["command"] == "the next run"
    assert body(s3, "out/_lock") is None


def test_reentrant_in_one_process_and_exclusive_between_leases(s3: S3Bucket):
    url, cfg = s3.uri("out"), storage(s3)
    with output_lock(url, "flow", storage=cfg) as outer:
        with output_lock(url + "/", "runner", storage=cfg) as inner:  # the same store URL
            assert inner is outer and not lock_lost(url)
        assert body(s3, "out/_lock")["command"] == "flow"  # the inner exit did not release
        with pytest.raises(OutputLocked, match=rf"in use by pid {os.getpid()} on .*\(flow\)"):
            Lease(url, "another lease", cfg).acquire()
    assert body(s3, "out/_lock") is None
    with Lease(url, "again", cfg) as lease:
        assert body(s3, "out/_lock")["token"] == lease.info["token"]


def test_a_killed_holders_lease_is_taken_over_after_its_ttl_and_not_before(s3: S3Bucket):
    url, cfg = s3.uri("out"), storage(s3)
    proc = holder(s3, url, 2, "killed run")
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
    assert body(s3, "out/_lock")["command"] == "next run"
    lease.release()
    assert body(s3, "out/_lock") is None


def test_racing_takers_of_a_stale_lease_one_wins(s3: S3Bucket):
    race_for_stale_leases(s3.uri, storage(s3), ["a", "b", "c"],
                          lambda key, data: s3.request("PUT", key, body=data).status, lambda key: body(s3, key))


def test_a_holder_whose_lease_was_overwritten_notices_and_leaves_the_others(s3: S3Bucket, caplog):
    caplog.set_level(logging.WARNING, logger="tasks.lease")
    cfg = storage(s3)
    lost = threading.Event()
    lease = Lease(s3.uri("out"), "first", cfg, ttl_s=1.5, on_lost=lambda reason: lost.set()).acquire()
    other = {"host": "elsewhere", "pid": 4242, "started": "now", "command": "intruder", "ttl_s": 60}
    assert s3.request("PUT", "out/_lock", body=json.dumps(other).encode()).status == 200
    assert lost.wait(10), "the renewal thread did not notice"
    assert lease.lost and "taken by pid 4242 on elsewhere" in lease.lost_reason
    lease.release()
    assert body(s3, "out/_lock") == other  # not deleted: it is the intruder's
    assert "lost the lease s3://" in caplog.text and s3.secret_key not in caplog.text


def test_lock_lost_reports_a_deleted_lease_at_the_next_renewal(s3: S3Bucket):
    url = s3.uri("out")
    with output_lock(url, "run", storage=storage(s3)) as held:
        held.lease.renew()
        assert not held.lost and not lock_lost(url)
        assert s3.request("DELETE", "out/_lock").status == 204
        held.lease.renew()  # what the renewal thread does every ttl/3
        assert held.lost and lock_lost(url)
        assert "deleted" in held.lease.lost_reason
        other = {"command": "the next run"}
        assert s3.request("PUT", "out/_lock", body=json.dumps(other).encode()).status == 200
    assert body(s3, "out/_lock") == other
    assert not lock_lost(url)  # not held any more


def test_the_lease_body_says_who_holds_it_and_holds_no_secret(s3: S3Bucket, monkeypatch):
    monkeypatch.setenv("T2I_RAY_TAG", "host-1-2")
    url = s3.uri("deep/out")
    with output_lock(url, "t2i curate", storage=storage(s3)):
        note_ray(url)
        raw = s3.request("GET", "deep/out/_lock").body.decode()
    info = json.loads(raw)
    assert {"host", "pid", "started", "command", "renewed", "ttl_s", "token", "ray_tag", "ray"} == set(info)
    expected = (os.getpid(), "t2i curate", 120, "host-1-2")
    assert (info["pid"], info["command"], info["ttl_s"], info["ray_tag"]) == expected
    assert s3.secret_key not in raw


def test_wrong_secret_missing_bucket_and_gcs_are_storage_errors_before_anything_is_written(s3: S3Bucket):
    wrong = storage(s3, secret_access_key="not-the-secret-at-all")
    with pytest.raises(StorageError, match=r"cannot take the lease s3://.*/out/_lock: wrong secret key") as bad:
        output_lock(s3.uri("out"), "run", storage=wrong).__enter__()
    assert "not-the-secret-at-all" not in str(bad.value) and s3.secret_key not in str(bad.value)
    assert b"<Key>" not in s3.request("GET", "", query={"list-type": "2"}).body  # the bucket is still empty
    with pytest.raises(StorageError, match="the bucket does not exist"):
        Lease(f"s3://{s3.bucket}-missing/out", "run", storage(s3)).acquire()
    with pytest.raises(StorageError, match="needs s3:// or gs://"):
        Lease("ftp://bucket/out", "run")
    with pytest.raises(StorageError, match="gs://"), output_lock("gs://bucket/out", "run"):
        pass


def race_for_stale_leases(url, cfg, rounds: list[str], put, body_of) -> None:
    """Per round, six takers race for a lease its dead holder left stale: exactly one wins, the
    others are refused naming it. ``put(key, data) -> status`` and ``body_of(key)`` reach the store
    as another client would (S3 or GCS)."""
    dead = {"host": "elsewhere", "pid": 1, "started": "then", "command": "dead run", "ttl_s": 0}
    for name in rounds:
        assert put(f"{name}/_lock", json.dumps(dead).encode()) == 200
    while (seen := Lease(url(rounds[-1]), "look", cfg).read()).expires_in(0) > 0:  # stale by the server's clock
        time.sleep(seen.expires_in(0) / 2)
    for name in rounds:
        takers = [Lease(url(name), f"taker {i}", cfg, ttl_s=10) for i in range(6)]
        start = threading.Barrier(len(takers))
        won: list[Lease] = []
        refused: list[str] = []

        def take(lease: Lease, won=won, refused=refused, start=start) -> None:
            start.wait()
            try:
                won.append(lease.acquire())
            except OutputLocked as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=take, args=(lease,)) for lease in takers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 5, (won, refused)
        winner = won[0]
        assert winner.previous["command"] == "dead run"
        assert all(f"({winner.info['command']})" in text for text in refused), refused
        assert body_of(f"{name}/_lock")["token"] == winner.info["token"]
        winner.release()
