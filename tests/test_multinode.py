"""A real Ray cluster on this machine, reading from and writing to a real S3 server (the only
thing the nodes share, as on a real cluster): a head with no CPUs (as KubeRay sets it up) and two
worker nodes. Shard tasks run on both nodes; the node holding the model actor is lost (every
process of it killed) mid-run: the actor comes back on the node left, and nothing is lost or duplicated."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
from conftest import photo_samples, write_webdataset
from ray_cluster import RayCluster
from test_s3_curate import objects, store_of, upload

from tasks.shards import Manifest

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

CONFIG = """signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}, faces: {batch_size: 4}}
rules: {sharpness: {min: 300}, face_count: {max: 1}}
run: {workers: 4, task_retries: 2}
"""


def outcome(out: str, s3: S3Bucket | None = None) -> tuple[list[tuple], list[tuple]]:
    from test_s3_curate import connect

    con = connect(s3)
    kept = con.sql(f"SELECT key, face_count, bucket_width FROM '{out}/shards/*.parquet' ORDER BY key").fetchall()
    rejected = con.sql(f"SELECT key, reason FROM '{out}/rejects/*.parquet' ORDER BY key").fetchall()
    return kept, rejected


@pytest.fixture
def two_nodes(s3: S3Bucket):
    """Both nodes get the object store's endpoint and keys from their environment, as a cluster's
    nodes get them from their instance role or a secret."""
    cluster = RayCluster(env={**os.environ, **s3.env, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        cluster.start_head(cpus=0)
        nodes = []
        for alive in (2, 3):  # one node after the other, as `add_node` does, without its probe for the count
            nodes.append(cluster._start([f"--address={cluster.address}"], 3))  # before: the head, then one more
            deadline = time.monotonic() + 90
            while cluster.alive_nodes() < alive:
                assert time.monotonic() < deadline and nodes[-1].poll() is None, "a worker node did not join"
                time.sleep(0.5)
        yield cluster, nodes
    finally:
        cluster.stop()


def actor_on(cluster: RayCluster, node) -> bool:
    """Whether a model actor's worker process runs under this node's raylet (Ray titles it
    ``ray::ModelActor...``). Each process is asked on its own: a worker that has exited but is
    not yet reaped (a zombie, whose ``cmdline`` raises) must not hide the actor beside it."""
    with contextlib.suppress(psutil.Error, LookupError):
        for proc in cluster.raylet(node).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "ModelActor" in " ".join(proc.cmdline()):
                    return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shards_run_on_both_nodes_and_losing_one_loses_nothing(tmp_path: Path, s3: S3Bucket, two_nodes) -> None:
    cluster, workers = two_nodes
    for t in range(16):
        write_webdataset(tmp_path / "src" / f"{t:05d}.tar", photo_samples(f"{t:03d}"))
    source = upload(tmp_path / "src", s3, "laion")
    (tmp_path / "c.yaml").write_text(CONFIG)
    args = [sys.executable, "-m", "t2i.cli", "curate", "--config", str(tmp_path / "c.yaml")]
    ref = subprocess.run([*args, "--source", str(tmp_path / "src"), "--out", str(tmp_path / "ref"), "--no-ray"],
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    env = {**os.environ, **s3.env, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "token"}
    run = subprocess.Popen([*args, "--source", source, "--out", s3.uri("out")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    manifest = Manifest(store_of(s3, "out"))
    deadline = time.monotonic() + 300
    while len({e["node"] for e in manifest.entries()}) < 2 and run.poll() is None:
        assert time.monotonic() < deadline, "shards never ran on both nodes"
        time.sleep(0.1)
    nodes = {e["node"] for e in manifest.entries()}
    holding = [n for n in workers if actor_on(cluster, n)]
    assert len(holding) == 1, "the one model actor must be on exactly one worker node"
    victim = holding[0]
    survivor = next(n for n in workers if n is not victim)
    done_before = len(manifest.done_ids())
    # The node is lost mid-run, with its shard tasks and the actor. Its whole tree, not the raylet
    # alone: an actor whose raylet died may go on serving direct calls until it notices, and a run
    # near its end could finish on it before Ray declared the node dead and restarted the actor.
    cluster.lose(victim)
    lost_at = time.time()
    replaced = False
    while run.poll() is None and not replaced:
        replaced = actor_on(cluster, survivor)
        time.sleep(0.1)
    ended_after_s = time.time() - lost_at
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert len(nodes) == 2 and done_before < 16, "the node must be lost mid-run"
    starts = sorted(round(e["started_at"] - lost_at, 1) for e in manifest.entries())
    assert replaced, (f"the model actor was not seen on the node left; {done_before} shards were done at the loss, "
                      f"the run ended {ended_after_s:.1f} s after it; shard starts (s from the loss): {starts}; "
                      f"log tail: {stderr[-2000:]}")
    summary = json.loads(stdout)
    assert summary["failed"] == {} and summary["shards_done"] == 16
    got, want = outcome(s3.uri("out"), s3), outcome(str(tmp_path / "ref"))
    for side, (g, w) in zip(("kept", "rejected"), zip(got, want, strict=True), strict=True):
        assert g == w, (f"{side}: extra {sorted(set(g) - set(w))[:5]}, missing {sorted(set(w) - set(g))[:5]}, "
                        f"{len(g)} vs {len(w)} rows; files {sorted(k for k in objects(s3, 'out'))}")
    after = {e["node"] for e in manifest.entries() if e["started_at"] > lost_at + 1}
    assert len(after) == 1 and after <= nodes  # started after the loss: all on the node that is left
