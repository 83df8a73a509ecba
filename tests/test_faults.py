"""Faults a cluster gives every day: model actors killed from outside, a model that fails on
most rows, two runs on one output, a source that changes, an output that cannot be written."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
import ray
from conftest import photo, photo_samples, write_webdataset

from schemas.config import CurateConfig
from tasks.actors import pool_specs, start_pools, stop_pools
from tasks.dispatch import _process_guarded
from tasks.process import SourceChanged, process_shard
from tasks.runner import RunAborted, run
from tasks.shards import Manifest
from tasks.signals import build_signals, registry
from tasks.signals.base import ModelParams, ModelSignal, Sample
from tasks.sources import discover

CHEAP = "signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}}\nrules: {sharpness: {min: 300}}\n"


class SlowParams(ModelParams):
    delay_s: float = 0.0
    fail: str = ""  # captions containing this raise in the model


class Slow(ModelSignal):
    """A model that takes its time (so a kill lands mid-shard), raising on captions with ``fail``."""

    name = "slow"
    cost = 150
    Params = SlowParams
    fields = (pa.field("caption_chars", pa.int32()),)

    def prepare(self, sample: Sample) -> str:
        return sample.caption or ""

    def infer(self, inputs: list[str]) -> list[dict[str, Any]]:
        time.sleep(self.params.delay_s * len(inputs))
        if self.params.fail and any(self.params.fail in c for c in inputs):
            raise ValueError(f"cannot caption {next(c for c in inputs if self.params.fail in c)!r}")
        return [{"caption_chars": len(c)} for c in inputs]


@pytest.fixture
def slow_signal(monkeypatch):
    monkeypatch.setitem(registry(), "slow", Slow)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def rows(out: Path, kind: str, columns: str) -> list[tuple]:
    files = sorted(str(f) for f in (out / kind).glob("*.parquet"))
    return duckdb.sql(f"SELECT key, {columns} FROM read_parquet({files}) ORDER BY key").fetchall() if files else []


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_an_actor_killed_from_outside_costs_no_row(tmp_path: Path, ray_runtime, slow_signal) -> None:
    """Killed three times mid-shard (as an OOM kill or a preempted node would): every row kept."""
    lena = photo("lena.jpg")
    write_webdataset(tmp_path / "src" / "0.tar", [(f"a{i:02d}", lena, "x" * (i + 1), "jpg") for i in range(40)])
    cfg = CurateConfig(signals={"slow": {"batch_size": 4, "delay_s": 0.05}}, rules={})
    pools = start_pools(pool_specs(build_signals(cfg.signals)))
    pid = ray.get(pools["slow"][0].pid.remote())
    kills: list[int] = []

    def killer() -> None:
        nonlocal pid
        for _ in range(3):
            time.sleep(1.5)
            os.kill(pid, signal.SIGKILL)
            kills.append(pid)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait for the restart, then aim at the new process
                try:
                    pid = ray.get(pools["slow"][0].pid.remote(), timeout=5)
                    break
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    time.sleep(0.2)

    thread = threading.Thread(target=killer)
    try:
        thread.start()
        result = process_shard(discover(tmp_path / "src", cfg.source)[0], cfg, tmp_path / "out", pools)
        thread.join()
    finally:
        stop_pools(pools)
    assert len(kills) == 3 and result.kept == 40 and result.rejected == 0
    assert rows(tmp_path / "out", "shards", "caption_chars") == [(f"a{i:02d}", i + 1) for i in range(40)]


def test_a_model_error_is_the_rows_reject_with_the_models_own_text(tmp_path: Path, ray_runtime, slow_signal) -> None:
    write_webdataset(tmp_path / "src" / "0.tar", [(f"k{i}", photo("cat.jpg"), "BAD" if i == 2 else "ok", "jpg")
                                                  for i in range(8)])
    cfg = CurateConfig(signals={"slow": {"batch_size": 4, "fail": "BAD"}}, rules={})
    pools = start_pools(pool_specs(build_signals(cfg.signals)))
    try:
        process_shard(discover(tmp_path / "src", cfg.source)[0], cfg, tmp_path / "out", pools)
    finally:
        stop_pools(pools)
    assert rows(tmp_path / "out", "rejects", "reason, error") == [
        ("k2", "signal_error_slow", "ValueError: cannot caption 'BAD'")]


def test_a_model_failing_on_most_rows_stops_the_run(tmp_path: Path, ray_runtime, slow_signal) -> None:
    for t in range(3):
        write_webdataset(tmp_path / "src" / f"{t}.tar", [(f"{t}k{i}", photo("cat.jpg"), "BAD", "jpg")
                                                         for i in range(12)])
    cfg = CurateConfig(signals={"slow": {"fail": "BAD", "batch_size": 2}}, rules={})
    failing = r"signal slow failed on \d+ of the \d+ rows .* ValueError: cannot caption 'BAD'"
    with pytest.raises(RunAborted, match=failing):
        run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)
    assert Manifest(tmp_path / "out").done_ids() == set()  # nothing recorded as done, nothing to skip later
    assert not list((tmp_path / "out").glob("shards/*.parquet"))
    pools = start_pools(pool_specs(build_signals(cfg.signals)))  # the same through a pool on Ray
    try:
        assert "failed on 12 of the 12 rows" in _process_guarded(discover(tmp_path / "src", cfg.source)[0], pools, cfg,
                                                               str(tmp_path / "out"), frozenset()).message
    finally:
        stop_pools(pools)


def test_shard_tasks_waiting_on_a_pool_do_not_let_more_shards_start(tmp_path: Path) -> None:
    """With run.workers 1, shards run one after another although each waits on the faces pool
    (and so gives its CPU back to Ray): at most ``run.workers`` shards hold memory at once."""
    for t in range(4):
        write_webdataset(tmp_path / "src" / f"{t}.tar", photo_samples(f"{t}"))
    config = "signals: {resolution: {}, faces: {batch_size: 2}}\nrules: {}\nrun: {workers: 1}\n"
    (tmp_path / "c.yaml").write_text(config)
    result = cli("curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr
    spans = sorted((e["started_at"], e["started_at"] + e["seconds"]) for e in Manifest(tmp_path / "out").entries())
    assert len(spans) == 4
    assert all(end <= next_start + 0.01 for (_, end), (next_start, _) in itertools.pairwise(spans)), spans


def test_a_second_run_on_the_same_output_refuses_and_a_killed_runs_lock_is_taken_over(tmp_path: Path) -> None:
    for t in range(30):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t:03d}"))
    (tmp_path / "c.yaml").write_text(CHEAP)
    args = ["curate", "--source", str(tmp_path / "src"), "--config", str(tmp_path / "c.yaml"), "--no-ray"]
    assert cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    first = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args, "--out", str(tmp_path / "out")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / "out" / "_lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli(*args, "--out", str(tmp_path / "out"))
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'out'} is in use by pid {first.pid} on")
    assert "Traceback" not in second.stderr
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert len(Manifest(tmp_path / "out").done_ids()) < 30, "the kill must land mid-run"
    third = cli(*args, "--out", str(tmp_path / "out"))
    assert third.returncode == 0, third.stderr
    for kind in ("shards", "rejects"):
        assert rows(tmp_path / "out", kind, "source") == rows(tmp_path / "ref", kind, "source")
    assert lock.read_text() == ""  # released


def test_a_changed_source_shard_is_refused_or_curated_again(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_webdataset(src / "a.tar", photo_samples("a"))
    write_webdataset(src / "b.tar", photo_samples("b"))
    (tmp_path / "c.yaml").write_text(CHEAP)
    args = ["curate", "--source", str(src), "--out", str(tmp_path / "out"), "--config", str(tmp_path / "c.yaml"),
            "--no-ray"]
    assert cli(*args).returncode == 0
    write_webdataset(src / "b.tar", list(photo_samples("b"))[:3] + list(photo_samples("c"))[:2])  # re-downloaded
    refused = cli(*args)
    assert refused.returncode == 2 and "changed since they were curated" in refused.stderr
    assert "b.tar" in refused.stderr and "source.changed: recurate" in refused.stderr
    (tmp_path / "c.yaml").write_text(CHEAP + "source: {changed: recurate}\n")  # a setting a resume may change
    redone = cli(*args)
    assert redone.returncode == 0, redone.stderr
    assert json.loads(redone.stdout)["shards_done"] == 1
    fresh = tmp_path / "fresh"
    assert cli("curate", "--source", str(src), "--out", str(fresh), "--config", str(tmp_path / "c.yaml"),
               "--no-ray").returncode == 0
    for kind in ("shards", "rejects"):
        assert rows(tmp_path / "out", kind, "source") == rows(fresh, kind, "source")


def test_a_shard_that_grows_while_read_is_not_recorded_as_done(tmp_path: Path, monkeypatch) -> None:
    import tasks.process

    path = write_webdataset(tmp_path / "src" / "a.tar", photo_samples("a"))
    real = tasks.process.read_shard

    def growing(shard, cfg, limit, storage=None):
        for i, batch in enumerate(real(shard, cfg, limit, storage)):
            if i == 0:  # the downloader is still appending
                with open(path, "ab") as fh:
                    fh.write(b"\0" * 1024)
            yield batch

    monkeypatch.setattr(tasks.process, "read_shard", growing)
    cfg = CurateConfig(rules={}, signals={"resolution": {}}, source={"batch_rows": 2})
    with pytest.raises(SourceChanged, match="changed while it was read"):
        process_shard(discover(tmp_path / "src", cfg.source)[0], cfg, tmp_path / "out")
    assert Manifest(tmp_path / "out").done_ids() == set()
    monkeypatch.setattr(tasks.process, "read_shard", real)
    summary = run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)  # settled: done on the next run
    assert summary.shards_done == 1 and summary.failed == {}


def test_a_ray_address_where_nothing_answers_fails_fast_before_writing(tmp_path: Path) -> None:
    write_webdataset(tmp_path / "src" / "a.tar", photo_samples())
    started = time.monotonic()
    result = cli("curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 env={"RAY_ADDRESS": "127.0.0.1:9"}, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: nothing answers at the Ray cluster")
    assert result.stderr.strip().count("\n") == 0 and time.monotonic() - started < 60
    assert not (tmp_path / "out" / "_run.json").exists()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A mounted tmpfs of a few hundred KB: an output that runs out of space (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_or_read_only_output_is_one_error_line(tmp_path: Path, small_fs: Path) -> None:
    for t in range(3):
        write_webdataset(tmp_path / "src" / f"{t}.tar", photo_samples(f"{t}"))
    (tmp_path / "c.yaml").write_text("signals: {resolution: {}}\nrules: {}\n")
    args = ["curate", "--source", str(tmp_path / "src"), "--config", str(tmp_path / "c.yaml")]
    full = cli(*args, "--out", str(small_fs / "out"))
    assert full.returncode == 2, full.stderr
    assert full.stderr.strip().splitlines()[-1].startswith("error: shard ")
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    read_only = cli(*args, "--out", str(small_fs / "elsewhere"), "--no-ray")
    assert read_only.returncode == 2 and "Traceback" not in read_only.stderr
    assert read_only.stderr.strip().splitlines()[-1] == f"error: Read-only file system: {small_fs / 'elsewhere'}"


def test_stdout_holds_only_the_summary_with_ray(tmp_path: Path) -> None:
    write_webdataset(tmp_path / "src" / "a.tar", photo_samples())
    (tmp_path / "c.yaml").write_text(CHEAP)
    result = cli("curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                 "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["shards_done"] == 1
    stats = cli("stats", str(tmp_path / "out"), "--json")
    assert json.loads(stats.stdout)["kept"] == json.loads(result.stdout)["kept"]


def test_t2i_up_towards_a_server_that_does_not_answer_says_so(tmp_path: Path) -> None:
    result = subprocess.run([str(Path(sys.executable).with_name("t2i")), "up"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api",
                                              "T2I_STATE_DIR": str(tmp_path / "state")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: nothing answers at PREFECT_API_URL=http://127.0.0.1:9/api")
    assert "unset PREFECT_API_URL" in result.stderr


@pytest.fixture
def token_cluster():
    """A real Ray head started with token authentication."""
    from ray_cluster import RayCluster

    cluster = RayCluster(env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        cluster.start_head(cpus=3)
        yield cluster.address
    finally:
        cluster.stop()


@pytest.mark.slow
def test_joining_a_token_auth_cluster_says_what_to_set(tmp_path: Path, token_cluster: str) -> None:
    write_webdataset(tmp_path / "src" / "a.tar", photo_samples())
    (tmp_path / "c.yaml").write_text(CHEAP)
    args = ["curate", "--source", str(tmp_path / "src"), "--config", str(tmp_path / "c.yaml")]
    refused = cli(*args, "--out", str(tmp_path / "no"), env={"RAY_ADDRESS": token_cluster, "RAY_AUTH_MODE": "disabled"})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "token authentication: set RAY_AUTH_MODE=token" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "no" / "_run.json").exists()
    joined = cli(*args, "--out", str(tmp_path / "yes"), env={"RAY_ADDRESS": token_cluster, "RAY_AUTH_MODE": "token"})
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["shards_done"] == 1


def test_a_listener_that_is_not_ray_times_out_within_the_configured_time() -> None:
    """Something accepts the connection but never speaks Ray: the join gives up in time."""
    import socket

    from tasks.cluster import RayUnavailable, probe

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        started = time.monotonic()
        with pytest.raises(RayUnavailable, match=r"within 4 s \(run.ray_connect_timeout_s\)"):
            probe(f"127.0.0.1:{server.getsockname()[1]}", 4.0)
        assert time.monotonic() - started < 30


def test_only_failures_every_shard_would_meet_stop_the_run(tmp_path: Path) -> None:
    import errno

    from tasks.dispatch import fatal_reason

    out = tmp_path / "out"
    assert fatal_reason(OSError(errno.ENOSPC, "No space left on device", str(out / "x")), out)
    assert fatal_reason(OSError(errno.EROFS, "Read-only file system", "/anywhere"), out)
    assert fatal_reason(PermissionError(errno.EACCES, "Permission denied", str(out / "shards")), out)
    unreadable_source = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "src" / "a.tar"))
    assert fatal_reason(unreadable_source, out) is None  # that shard's own problem
    assert fatal_reason(ValueError("a bad row"), out) is None
