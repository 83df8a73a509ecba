"""The writer of a shard's parts: batches in, Parquet parts out, staged where its attempt says
(tasks/attempts.py) until the attempt commits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.attempts import Attempt
from tasks.shards import ROW_GROUP_ROWS
from tasks.storage import Store, as_store


class PartWriter:
    """Streams batches of one kind for one source shard into parts, cut by rows or bytes.

    Rows go to the open part's file a row group at a time, so a shard task holds at most one
    row group of output (plus the input batch being scored), whatever ``max_rows`` is: memory
    does not grow with part size. ``keep_empty`` writes one empty part for a shard with no rows
    (rejects: so ``FROM 'out/rejects/*.parquet'`` works on an output with none). Parts are written
    where the attempt stages them; its commit makes them visible (``Attempt.commit``)."""

    def __init__(self, out: Store | str | Path, kind: str, shard_id: str, schema: pa.Schema, max_rows: int,
                 max_bytes: int, row_group_rows: int = ROW_GROUP_ROWS, attempt: Attempt | None = None,
                 keep_empty: bool = False):
        self.store = as_store(out)
        self.kind, self.shard_id, self.schema = kind, shard_id, schema
        self.max_rows, self.max_bytes, self.row_group_rows = max_rows, max_bytes, row_group_rows
        self.attempt = attempt or Attempt(self.store, shard_id)  # shared by a shard's two writers
        self.keep_empty = keep_empty
        self.pending: list[pa.RecordBatch] = []  # rows not yet in a row group
        self.pending_rows = 0
        self.part_rows = 0  # rows in the open part, written or pending
        self.part_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.sink: Any = None
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
            self._open_part()
        self.writer.write_table(pa.Table.from_batches(self.pending, schema=self.schema),
                                row_group_size=self.row_group_rows)
        self.pending, self.pending_rows = [], 0

    def _open_part(self) -> None:
        rel = self._final(len(self.parts))
        self.attempt.note(rel)
        self.sink = self.store.open_writer(self.attempt.staged(rel))
        self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")

    def _name(self, index: int) -> str:
        if self.store.renames:
            return f"{self.shard_id}.part{index:05d}.parquet"
        return f"{self.shard_id}.{self.attempt.token}.part{index:05d}.parquet"

    def _final(self, index: int) -> str:
        return f"{self.kind}/{self._name(index)}"

    def flush(self) -> None:
        """Close the open part (durable: fsynced locally, the upload completed on an object
        store); the next rows start a new one."""
        self._write_pending()
        if self.writer is None and self.keep_empty and not self.parts and not self.count:
            self._open_part()  # an empty part: the folder's glob has a file with every column
        if self.writer is None:
            return
        self.writer.close()
        self._close_sink()
        self.writer = None
        self.parts.append(self._name(len(self.parts)))
        self.part_rows, self.part_bytes = 0, 0

    def _close_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is None or getattr(sink, "closed", False):
            return
        if not isinstance(sink, pa.NativeFile):  # a local file of our own
            sink.flush()
            os.fsync(sink.fileno())  # on disk before the manifest says done
        sink.close()

    def abort(self) -> None:
        """Close an open file after a failure and remove it (closing an object-store stream
        completes its upload: the half part would otherwise appear)."""
        if self.writer is None:
            return
        try:
            self.writer.close()
        finally:
            self.writer = None
            sink, self.sink = self.sink, None
            if sink is not None and not getattr(sink, "closed", False):
                sink.close()
            self.store.delete(self.attempt.staged(self._final(len(self.parts))))

    @property
    def files(self) -> list[str]:
        """The finished parts' final names (``{kind}/{name}``); call after ``flush``."""
        return [f"{self.kind}/{name}" for name in self.parts]
