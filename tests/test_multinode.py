"""A real two-node Ray cluster on this machine, reading from and writing to a real S3 server (the
only thing the nodes share, as on a real cluster): shard tasks run on both nodes, and losing the
second node (its raylet killed) mid-run loses and duplicates nothing; a model actor that lived
there comes back on the head. The head alone must still fit the pool and one shard task: a
cluster that loses the room for shard tasks waits for it (Ray queues the tasks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import photo_samples, write_webdataset
from ray_cluster import RayCluster
from test_s3_curate import store_of, upload

from tasks.shards import Manifest

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

CONFIG = """signals: {resolution: {}, caption: {}, sharpness: {}, phash: {}, faces: {batch_size: 4}}
rules: {sharpness: {min: 300}, face_count: {max: 1}}
run: {workers: 3, task_retries: 2}
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
        cluster.start_head(cpus=2)
        second = cluster.add_node(cpus=3)
        yield cluster, second
    finally:
        cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shards_run_on_both_nodes_and_losing_one_loses_nothing(tmp_path: Path, s3: S3Bucket, two_nodes) -> None:
    cluster, second = two_nodes
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
    done_before = len(manifest.done_ids())
    cluster.raylet(second).kill()  # the node is lost mid-run, with its shard tasks and actors
    lost_at = time.time()
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert len(nodes) == 2 and done_before < 16, "the node must be lost mid-run"
    summary = json.loads(stdout)
    assert summary["failed"] == {} and summary["shards_done"] == 16
    assert outcome(s3.uri("out"), s3) == outcome(str(tmp_path / "ref"))
    after = {e["node"] for e in manifest.entries() if e["started_at"] > lost_at + 1}
    assert len(after) == 1 and after <= nodes  # started after the loss: all on the node that is left
