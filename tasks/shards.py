"""Atomic Parquet output and the manifest that makes a killed run resumable.

Layout under the output folder::

    shards/{shard_id}.part00000.parquet    kept rows
    rejects/{shard_id}.part00000.parquet   rejected rows with their reason
    _manifest/{shard_id}.json              written last: this source shard is done
    _tmp/{shard_id}/                       parts being written

A source shard's parts are written into ``_tmp`` (temporary name, then rename), moved
into place when the shard is finished, and only then is its manifest entry written. On
resume a shard with a manifest entry is skipped; any other shard's leftovers are deleted
and the shard is done again, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

KINDS = ("shards", "rejects")


ROW_GROUP_ROWS = 256


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_table_atomic(path: Path, table: pa.Table, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write beside, then rename. Row groups stay small (a few hundred images): a reader that
    needs some rows (the trainer resuming mid-epoch, DuckDB splitting work) reads one group, not
    the whole part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # Through our own handle: pyarrow's own file, on ENOSPC, stays open (space held) while the
    # exception's traceback lives.
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh, compression="zstd", row_group_size=row_group_rows)
        fh.flush()
        os.fsync(fh.fileno())  # on disk before the rename (and the manifest) can say it is done
    os.replace(tmp, path)


class Manifest:
    """Which source shards are finished, one small JSON file each (no shared file to lock)."""

    def __init__(self, out: Path):
        self.dir = out / "_manifest"

    def done_ids(self) -> set[str]:
        if not self.dir.is_dir():
            return set()
        return {p.stem for p in self.dir.glob("*.json")}

    def record(self, shard_id: str, entry: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / f"{shard_id}.json", json.dumps(entry, indent=1).encode())

    def entries(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))]

    def entry(self, shard_id: str) -> dict[str, Any]:
        return json.loads((self.dir / f"{shard_id}.json").read_text())

    def forget(self, shard_id: str) -> None:
        """Mark a shard not done (its source changed): the next attempt redoes it whole."""
        (self.dir / f"{shard_id}.json").unlink(missing_ok=True)


def clear_partial(out: Path, shard_id: str) -> None:
    """Remove whatever an interrupted attempt at this shard left behind."""
    shutil.rmtree(out / "_tmp" / shard_id, ignore_errors=True)
    for kind in KINDS:
        for leftover in (out / kind).glob(f"{shard_id}.part*.parquet"):
            leftover.unlink(missing_ok=True)


class PartWriter:
    """Streams batches of one kind for one source shard into parts, cut by rows or bytes.

    Rows go to the open part's file a row group at a time, so a shard task holds at most one
    row group of output (plus the input batch being scored), whatever ``max_rows`` is: memory
    does not grow with part size. Files are written under ``_tmp/`` and moved into place by
    ``publish`` once the whole shard is done."""

    def __init__(self, out: Path, kind: str, shard_id: str, schema: pa.Schema, max_rows: int, max_bytes: int,
                 row_group_rows: int = ROW_GROUP_ROWS):
        self.out, self.kind, self.shard_id, self.schema = out, kind, shard_id, schema
        self.max_rows, self.max_bytes, self.row_group_rows = max_rows, max_bytes, row_group_rows
        self.tmp_dir = out / "_tmp" / shard_id
        self.pending: list[pa.RecordBatch] = []  # rows not yet in a row group
        self.pending_rows = 0
        self.part_rows = 0  # rows in the open part, written or pending
        self.part_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.parts: list[str] = []
        self.count = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Rows beyond ``max_rows`` roll into the next part; a part may pass ``max_bytes``
        by at most one batch."""
        self.count += batch.num_rows
        while batch.num_rows:
            room = self.max_rows - self.part_rows
            head, batch = batch.slice(0, room), batch.slice(room)
            self.pending.append(head)
            self.pending_rows += head.num_rows
            self.part_rows += head.num_rows
            self.part_bytes += head.nbytes
            if self.pending_rows >= self.row_group_rows:
                self._write_pending()
            if self.part_rows >= self.max_rows or self.part_bytes >= self.max_bytes:
                self.flush()

    def _write_pending(self) -> None:
        if not self.pending_rows:
            return
        if self.writer is None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self._tmp_path(len(self.parts)), self.schema, compression="zstd")
        self.writer.write_table(pa.Table.from_batches(self.pending, schema=self.schema),
                                row_group_size=self.row_group_rows)
        self.pending, self.pending_rows = [], 0

    def _tmp_path(self, index: int) -> Path:
        return self.tmp_dir / f"{self.kind}-{self._name(index)}"

    def _name(self, index: int) -> str:
        return f"{self.shard_id}.part{index:05d}.parquet"

    def flush(self) -> None:
        """Close the open part (on disk, fsynced); the next rows start a new one."""
        self._write_pending()
        if self.writer is None:
            return
        self.writer.close()
        self.writer = None
        with open(self._tmp_path(len(self.parts)), "rb") as fh:  # on disk before the manifest says done
            os.fsync(fh.fileno())
        self.parts.append(self._name(len(self.parts)))
        self.part_rows, self.part_bytes = 0, 0

    def abort(self) -> None:
        """Close an open file after a failure, so the attempt's leftovers can be removed."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def publish(self) -> list[str]:
        """Move finished parts into ``{kind}/``; call after ``flush``."""
        target = self.out / self.kind
        target.mkdir(parents=True, exist_ok=True)
        for name in self.parts:
            os.replace(self.tmp_dir / f"{self.kind}-{name}", target / name)
        return [f"{self.kind}/{name}" for name in self.parts]
