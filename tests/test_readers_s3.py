"""Readers of a curated output (`t2i stats`, the trainer's RowIndex and ShardReader) on a real S3
(SeaweedFS, tests/s3_server.py) read what they read locally, and only committed parts: a part of an
attempt that never committed (its `_attempts/` record left behind, as a killed shard task leaves it)
is not counted."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from test_train_data import config, epoch, row, write_shard

from tasks.attempts import Attempt
from tasks.parts import PartWriter
from tasks.shards import Manifest, committed_glob
from tasks.stats import compute_stats
from tasks.storage import duckdb_setup, open_store
from trainer.captions import CaptionConfig
from trainer.row_index import RowIndex, shard_files
from trainer.shard_reader import ShardReader

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

SHARDS, ROWS = 3, 10  # per shard: 8 kept, 2 rejected


def upload_output(local: Path, s3: S3Bucket, prefix: str = "out") -> str:
    """A finished local output copied to the bucket (shards/, rejects/, _manifest/): it holds only
    committed parts, so the copy is what a finished run on S3 leaves. Returns its URL."""
    for kind in ("shards", "rejects", "_manifest"):
        if (local / kind).is_dir():
            pafs.copy_files(str(local / kind), s3.path(f"{prefix}/{kind}"), destination_filesystem=s3.filesystem())
    return s3.uri(prefix)


@pytest.fixture(scope="module")
def local_output(tmp_path_factory) -> Path:
    """A curated output in the layout tasks/shards.py leaves locally (parts by rename, then the
    manifest entry), several row groups a part."""
    out = tmp_path_factory.mktemp("readers") / "out"
    for s in range(SHARDS):
        shard_id = f"{s:05d}-0123abcd"
        rows = [row(s * ROWS + i, aesthetic=float(i * 10 + s)) for i in range(ROWS)]
        files = [f"shards/{shard_id}.part00000.parquet", f"rejects/{shard_id}.part00000.parquet"]
        write_shard(out / files[0], rows[:8], row_group_size=3)
        write_shard(out / files[1], [r | {"reason": "sharpness_below_min"} for r in rows[8:]])
        Manifest(out).record(shard_id, {"shard_id": shard_id, "kept": 8, "rejected": 2, "files": files})
    return out


@pytest.fixture
def s3_env(s3: S3Bucket, monkeypatch) -> S3Bucket:
    """The bucket, with the AWS_* variables readers take their endpoint and keys from."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3


def leave_uncommitted_part(out_url: str, shard_id: str = "00001-0123abcd") -> str:
    """What a shard task killed after writing a part leaves on an object store: the part under its
    attempt-unique name and the attempt record naming it, no manifest entry. Returns the part's URL."""
    store = open_store(out_url)
    table = pa.Table.from_pylist([row(900 + i, aesthetic=1e6) for i in range(5)])
    writer = PartWriter(store, "shards", shard_id, table.schema, max_rows=100, max_bytes=1 << 30,
                        attempt=Attempt(store, shard_id, "dead0000"))
    for batch in table.to_batches():
        writer.add(batch)
    writer.flush()
    assert store.exists(f"_attempts/{shard_id}/dead0000.json")
    return store.url(f"shards/{shard_id}.dead0000.part00000.parquet")


def without_out(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "out"}


def test_stats_on_s3_equal_local_and_skip_uncommitted_parts(local_output, s3_env):
    url = upload_output(local_output, s3_env)
    local = compute_stats(local_output)
    assert local["kept"] == SHARDS * 8 and local["rejected"] == SHARDS * 2 and "aesthetic" in local["signals"]
    remote = compute_stats(url)
    assert remote["out"] == url and without_out(remote) == without_out(local)

    leftover = leave_uncommitted_part(url)
    assert leftover not in committed_glob(url, "shards")  # on an object store: the list of committed parts
    con = duckdb.connect()
    for statement in duckdb_setup(open_store(url)):
        con.execute(statement)
    assert con.execute(f"SELECT count(*) FROM '{url}/shards/*.parquet'").fetchone()[0] == SHARDS * 8 + 5
    assert without_out(compute_stats(url)) == without_out(local)


def test_trainer_reads_the_same_rows_from_s3_and_only_committed_ones(local_output, s3_env):
    url = upload_output(local_output, s3_env)
    leftover = leave_uncommitted_part(url)
    files = shard_files([url])
    assert [Path(f).name for f in files] == [Path(f).name for f in shard_files([str(local_output)])]
    assert leftover not in files and all(f.startswith(f"{url}/shards/") for f in files)
    # a plain prefix, one object and a glob name what they name (a prefix is not an output: all its parts)
    assert leftover in shard_files([f"{url}/shards"])
    assert shard_files([files[0]]) == [files[0]]
    assert shard_files([f"{url}/shards/0000*.parquet"]) == sorted([*files, leftover])
    with pytest.raises(ValueError, match=r"holds no \.parquet"):
        shard_files([f"{url}/nothing-here"])

    local_cfg, remote_cfg = config(local_output), config(url)
    local, remote = RowIndex.build(local_cfg), RowIndex.build(remote_cfg)
    assert len(remote) == len(local) == SHARDS * 8
    assert remote.keys.to_pylist() == local.keys.to_pylist()
    assert remote.fingerprint() == local.fingerprint()  # file names, rows, sizes: a resume sees the same data
    assert np.array_equal(remote.group, local.group) and len(remote.group_start) == len(local.group_start)

    positions = np.arange(len(local))
    due = np.zeros(len(local), dtype=np.int64)
    local_rows = ShardReader(local, CaptionConfig()).fetch(positions, due, 0, 1)
    remote_rows = ShardReader(remote, CaptionConfig()).fetch(positions, due, 0, 1)
    assert remote_rows == local_rows and all(r.image for r in remote_rows.values())

    # DataLoader workers (forked) open the objects themselves
    workers = remote_cfg.model_copy(update={"num_workers": 2})
    keys = sorted(k for batch in epoch(remote, workers) for k in batch["keys"])
    assert keys == sorted(k for batch in epoch(local, local_cfg) for k in batch["keys"])
