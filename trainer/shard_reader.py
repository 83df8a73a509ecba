"""Rows of the shards by index position, streamed: bounded memory whatever the shards' size.

A row group is read front to back in record batches of ``CHUNK_ROWS`` rows through a small read
buffer; rows passed on the way that a later batch of this process needs are kept (up to a byte
cap), others dropped, and at most ``max_open`` row groups are open at once. Files on an object
store are read the same way: ranged reads fetch the row groups as they are read, nothing more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.storage import is_remote, open_store
from trainer.captions import CaptionConfig
from trainer.row_index import RowIndex

CHUNK_ROWS = 16  # rows per record batch read from a row group
READ_BUFFER = 1 << 20  # pyarrow streams pages through this buffer instead of loading a column chunk

@dataclass
class ShardRow:
    key: str
    image: bytes | None
    original: str | None
    machine: str | None
    synthetic: bool
    original_size: tuple[int, int] | None = None  # (w, h) before the downloader stored it; None: unknown


ORIGINAL_COLUMNS = ("original_width", "original_height")  # tasks/signals/resolution.py


def _original_size(width: Any, height: Any) -> tuple[int, int] | None:
    """Both sides, positive, or None (a shard without the columns, or a row whose source did not say)."""
    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
        return width, height
    return None


def open_parquet(path: str, **kwargs: Any) -> pq.ParquetFile:
    """A Parquet file by local path or URL; a remote one is opened random access through its store,
    so only the footer and the row groups read are fetched (closed with the ParquetFile)."""
    if not is_remote(path):
        return pq.ParquetFile(path, **kwargs)
    store = open_store(path)
    return pq.ParquetFile(store.path(), filesystem=store.fs, **kwargs)


class _GroupCursor:
    """One row group read front to back in record batches of CHUNK_ROWS rows (of a local file, or
    fetched from an object store as the batches need them). With a caption sidecar (row for row
    the part, group for group: tasks/sidecar.py), its columns are read in step and take the
    place of the part's own."""

    def __init__(self, path: str, number: int, columns: list[str], sidecar: str | None = None,
                 sidecar_columns: tuple[str, ...] = ()):
        self.file = open_parquet(path, buffer_size=READ_BUFFER)
        self.num_rows = self.file.metadata.row_group(number).num_rows
        self.side = open_parquet(sidecar) if sidecar else None
        beside = [c for c in sidecar_columns if self.side is not None and c in self.side.schema_arrow.names]
        self._batches = self._open(self.file, number, [c for c in columns if c not in beside])
        self._side = self._open(self.side, number, ["key", *beside]) if beside else None
        self.sidecar = sidecar
        self.next_row = 0  # first row of the group not read yet

    @staticmethod
    def _open(file: pq.ParquetFile, number: int, columns: list[str]) -> Any:
        present = set(file.schema_arrow.names)
        return file.iter_batches(batch_size=CHUNK_ROWS, row_groups=[number], use_threads=False,
                                 columns=[c for c in columns if c in present])

    def read(self) -> pa.RecordBatch:
        batch = next(self._batches)
        if self._side is not None:
            side = next(self._side)
            if side.column("key") != batch.column("key"):
                raise RuntimeError(f"{self.sidecar} is not row for row its part; run t2i caption again")
            for name in side.schema.names[1:]:
                batch = batch.append_column(name, side.column(name))
        self.next_row += batch.num_rows
        return batch

    def close(self) -> None:
        self.file.close()
        if self.side is not None:
            self.side.close()


class ShardReader:
    """Rows by index position, for one process. Reading a row streams its row group from the
    cursor's place (or from the start again when the row lies behind it); rows passed on the way
    that a later batch of this process needs are kept (at most ``max_kept_bytes``), others dropped."""

    def __init__(self, index: RowIndex, caption: CaptionConfig, max_open: int = 16, max_kept_bytes: int = 256 << 20):
        self.index, self.caption = index, caption
        machine = [caption.machine_column] if caption.machine_column else []
        self.columns = ["key", "image", caption.original_column, *machine, caption.synthetic_column,
                        *ORIGINAL_COLUMNS]
        self.max_open, self.max_kept_bytes = max_open, max_kept_bytes
        self.cursors: OrderedDict[int, _GroupCursor] = OrderedDict()
        self.kept: dict[int, ShardRow] = {}
        self.kept_bytes = 0
        self.stats = {"rows_read": 0, "opens": 0, "kept_peak_bytes": 0}

    def reset(self) -> None:
        """Forget rows kept for batches of another epoch."""
        self.kept.clear()
        self.kept_bytes = 0

    def fetch(self, positions: np.ndarray, due: np.ndarray, now: int, stride: int) -> dict[int, ShardRow]:
        """Rows at ``positions``. ``due[p]`` is the batch position needing row p (-1: none); this
        process is asked for positions now, now + stride, ... (the DataLoader's round robin)."""
        for p in [p for p in self.kept if due[p] < now]:  # a batch served without them
            self._drop(p)
        out = {int(p): self._drop(int(p)) for p in positions if int(p) in self.kept}
        missing = np.unique(np.array([p for p in positions if int(p) not in out], dtype=np.int64))
        groups = self.index.group[missing]
        for g in np.unique(groups):
            self._scan(int(g), missing[groups == g], out, due, now, stride)
        return out

    def _scan(self, g: int, need: np.ndarray, out: dict[int, ShardRow], due: np.ndarray, now: int,
              stride: int) -> None:
        ix = self.index
        lo, hi = np.searchsorted(ix.group, [g, g + 1])
        rows = ix.row[lo:hi] - ix.group_start[g]  # rows within the group, ascending
        cursor = self.cursors.pop(g, None)
        if cursor is None or cursor.next_row > rows[need[0] - lo]:
            if cursor is not None:
                cursor.close()
            f = int(ix.group_file[g])
            sidecar = ix.sidecars[f] if ix.sidecars else None
            machine = (self.caption.machine_column,) if self.caption.machine_column else ()
            cursor = _GroupCursor(ix.files[f], int(ix.group_number[g]), self.columns, sidecar, machine)
            self.stats["opens"] += 1
        wanted, last = set(need.tolist()), rows[need[-1] - lo]
        while cursor.next_row <= last:
            start = cursor.next_row
            try:
                batch = cursor.read()
            except StopIteration:
                raise RuntimeError(f"{ix.files[ix.group_file[g]]}: row group {ix.group_number[g]} is shorter "
                                   "than the index says; the shards changed, build the RowIndex again") from None
            self.stats["rows_read"] += batch.num_rows
            i0, i1 = np.searchsorted(rows, [start, cursor.next_row])
            for p in range(lo + i0, lo + i1):
                d = int(due[p])
                if p in wanted:
                    out[p] = self._row(batch, int(rows[p - lo] - start), p)
                elif d > now and (d - now) % stride == 0:
                    self._keep(p, self._row(batch, int(rows[p - lo] - start), p), due)
        if cursor.next_row < cursor.num_rows:
            self.cursors[g] = cursor
            while len(self.cursors) > self.max_open:
                self.cursors.popitem(last=False)[1].close()
        else:
            cursor.close()
        missing = wanted - out.keys()
        if missing:
            raise RuntimeError(f"rows {sorted(missing)[:5]} not found in {ix.files[ix.group_file[g]]}")

    def _row(self, batch: pa.RecordBatch, i: int, position: int) -> ShardRow:
        names = batch.schema.names

        def value(column: str | None) -> Any:
            return batch.column(column)[i].as_py() if column in names else None

        key = value("key")
        if key != self.index.key(position):
            raise RuntimeError(f"row {position}: key {key!r} where the index has {self.index.key(position)!r}; "
                               "the shards changed, build the RowIndex again")
        c = self.caption
        return ShardRow(key, value("image"), value(c.original_column), value(c.machine_column),
                        bool(value(c.synthetic_column)), _original_size(*map(value, ORIGINAL_COLUMNS)))

    def _keep(self, position: int, row: ShardRow, due: np.ndarray) -> None:
        self.kept[position] = row
        self.kept_bytes += len(row.image or b"")
        while self.kept_bytes > self.max_kept_bytes and len(self.kept) > 1:
            self._drop(max(self.kept, key=lambda p: due[p]))  # needed last: cheapest to read again
        self.stats["kept_peak_bytes"] = max(self.stats["kept_peak_bytes"], self.kept_bytes)

    def _drop(self, position: int) -> ShardRow:
        row = self.kept.pop(position)
        self.kept_bytes -= len(row.image or b"")
        return row
