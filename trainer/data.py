"""Training data: the selected rows of curated and synthetic shards, streamed in bucketed batches.

``RowIndex`` is what a stage selects (DuckDB over the Parquet files, reading only the columns the
selection names): file, row, size and bucket per row, never image bytes, so it stays small when
the shards do not. Images are read in the DataLoader's worker, as batches need them, by
``ShardReader``: row groups stream front to back in small record batches, so memory is bounded
by a few open row groups plus the rows read ahead, whatever the number or size of the shards.
A batch is one PlannedBatch of the sampler (trainer/buckets_sampler.py) turned into tensors.

An image that fails to decode at train time is logged once per key and its slot in the batch
is taken by another row of the same batch (same bucket), so batches keep their size; if every
row of a batch fails, rows of the same bucket drawn by (seed, epoch, position) stand in.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader, Dataset, get_worker_info

from schemas.config import Bounds
from trainer.buckets_sampler import BucketBatchSampler, PlannedBatch
from trainer.captions import CaptionConfig, choose_caption, uniform
from trainer.transforms import cover_crop

__all__ = ["CaptionConfig", "DataConfig", "RowIndex", "loader_throughput", "make_loader", "make_sampler"]

log = logging.getLogger(__name__)

CHUNK_ROWS = 16  # rows per record batch read from a row group
READ_BUFFER = 1 << 20  # pyarrow streams pages through this buffer instead of loading a column chunk


class DataConfig(BaseModel):
    """What a training stage reads and how it batches it."""

    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(default_factory=list)  # curate output dirs, dirs of *.parquet, files or globs
    select: dict[str, Bounds] = Field(default_factory=dict)  # column -> inclusive min/max
    min_short_side: int | None = Field(None, ge=1)
    resolution: int = Field(1024, ge=8, multiple_of=8)  # bucket base side (stage 1: 512)
    bucketed: bool = True
    random_crop: bool = False  # False: centre crop
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    caption: CaptionConfig = Field(default_factory=CaptionConfig)

    @model_validator(mode="after")
    def _bucket_side(self) -> DataConfig:
        if self.bucketed and self.resolution % 64:
            raise ValueError(f"bucketed resolution must be a multiple of 64, not {self.resolution}")
        return self


def shard_files(entries: list[str]) -> list[str]:
    """The Parquet files ``entries`` name: a curate output dir (its shards/, never rejects/), a dir
    of *.parquet, a file or a glob. An entry that matches nothing is an error, not a silent skip."""
    if not entries:
        raise ValueError("data.shards is empty: name the curated or synthetic shard folders")
    files: set[str] = set()
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = list(((path / "shards") if (path / "shards").is_dir() else path).glob("*.parquet"))
        elif path.is_file():
            found = [path]
        else:
            found = [Path(f) for f in glob.glob(entry, recursive=True) if f.endswith(".parquet")]
        if not found:
            raise ValueError(f"data.shards: {entry!r} holds no .parquet file")
        files.update(str(f.resolve()) for f in found)
    return sorted(files)


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


@dataclass(eq=False)
class RowIndex:
    """The selected rows in (file, row) order, as numpy arrays; no image bytes, no captions."""

    files: list[str]
    file: np.ndarray  # int32: index into files
    row: np.ndarray  # int64: row number in its file
    group: np.ndarray  # int32: global row-group id, ascending
    width: np.ndarray  # int32, upright
    height: np.ndarray
    bucket_width: np.ndarray  # int32: the bucket curation recorded, 0 when none
    bucket_height: np.ndarray
    keys: pa.Array
    group_file: np.ndarray  # per global row group: its file, its number in the file, its first row
    group_number: np.ndarray
    group_start: np.ndarray
    _fingerprint: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def group_bounds(self) -> np.ndarray:
        """Position bounds of the runs of one row group (len = groups with a selected row + 1)."""
        cuts = np.flatnonzero(np.diff(self.group)) + 1
        return np.concatenate([[0], cuts, [len(self)]]).astype(np.int64)

    @property
    def nbytes(self) -> int:
        arrays = (self.file, self.row, self.group, self.width, self.height, self.bucket_width,
                  self.bucket_height, self.group_file, self.group_number, self.group_start)
        return sum(a.nbytes for a in arrays) + self.keys.nbytes

    def key(self, position: int) -> str:
        return self.keys[position].as_py()

    def fingerprint(self) -> str:
        """Names the selection (file names, rows, sizes), so a resume can tell it is the same."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update("\n".join(Path(f).name for f in self.files).encode())
            for a in (self.file, self.row, self.width, self.height):
                h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @classmethod
    def build(cls, cfg: DataConfig) -> RowIndex:
        """One DuckDB query over every file (union by name: synthetic shards may lack columns, which
        then read as NULL and fail any bound on them)."""
        files = shard_files(cfg.shards)
        con = duckdb.connect()
        src = "read_parquet($files, filename=true, file_row_number=true, union_by_name=true)"
        columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}", {"files": files}).fetchall()]
        available = ", ".join(c for c in columns if c not in ("filename", "file_row_number"))
        for col in ["key", "width", "height", *cfg.select]:
            if col not in columns:
                what = "select: unknown column" if col in cfg.select else "the shards lack the column"
                raise ValueError(f"data.{what} {col!r}; the shards have: {available}")
        where, params = ["width IS NOT NULL", "height IS NOT NULL"], {"files": files}
        for i, (col, bounds) in enumerate(cfg.select.items()):
            for op, value, name in ((">=", bounds.min, f"lo{i}"), ("<=", bounds.max, f"hi{i}")):
                if value is not None:
                    where.append(f"{_quote(col)} {op} ${name}")
                    params[name] = value
        if cfg.min_short_side is not None:
            where.append("least(width, height) >= $short")
            params["short"] = cfg.min_short_side
        buckets = ", ".join(c if c in columns else f"NULL::INTEGER AS {c}" for c in ("bucket_width", "bucket_height"))
        query = (f"SELECT filename, file_row_number, key, width, height, {buckets} FROM {src} "
                 f"WHERE {' AND '.join(where)}")
        try:
            table = con.sql(query, params=params).to_arrow_table()
            unsized = con.execute(f"SELECT count(*) FROM {src} WHERE width IS NULL OR height IS NULL",
                                  {"files": files}).fetchall()[0][0]
        except duckdb.Error as exc:
            raise ValueError(f"data.select {cfg.select}: {exc}") from exc
        if unsized:
            log.warning("%d rows have no width/height and are left out", unsized)
        if table.num_rows == 0:
            raise ValueError(f"no row of {len(files)} shard files passes select={cfg.select} "
                             f"min_short_side={cfg.min_short_side}")
        return cls._from_table(files, table)

    @classmethod
    def _from_table(cls, files: list[str], table: pa.Table) -> RowIndex:
        names = pc.dictionary_encode(table.column("filename").combine_chunks())
        ids = {f: i for i, f in enumerate(files)}
        file = np.array([ids[str(Path(f).resolve())] for f in names.dictionary.to_pylist()],
                        dtype=np.int32)[names.indices.to_numpy()]
        row = table.column("file_row_number").to_numpy().astype(np.int64)
        order = np.lexsort((row, file))
        file, row = file[order], row[order]
        col = {c: table.column(c).take(pa.array(order)) for c in table.column_names}
        ints = {c: col[c].fill_null(0).to_numpy().astype(np.int32)
                for c in ("width", "height", "bucket_width", "bucket_height")}
        group = np.zeros(len(row), dtype=np.int32)
        g_file, g_number, g_start = [], [], []
        for f, path in enumerate(files):
            meta = pq.read_metadata(path)
            starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])[:-1]
            lo, hi = np.searchsorted(file, [f, f + 1])
            group[lo:hi] = len(g_start) + np.searchsorted(starts, row[lo:hi], side="right") - 1
            g_file += [f] * len(starts)
            g_number += range(len(starts))
            g_start += starts.tolist()
        return cls(files, file, row, group, ints["width"], ints["height"], ints["bucket_width"],
                   ints["bucket_height"], col["key"].combine_chunks(), np.array(g_file, dtype=np.int32),
                   np.array(g_number, dtype=np.int32), np.array(g_start, dtype=np.int64))


@dataclass
class ShardRow:
    key: str
    image: bytes | None
    original: str | None
    machine: str | None
    synthetic: bool


class _GroupCursor:
    """One row group read front to back in record batches of CHUNK_ROWS rows."""

    def __init__(self, path: str, number: int, columns: list[str]):
        self.file = pq.ParquetFile(path, buffer_size=READ_BUFFER)
        present = set(self.file.schema_arrow.names)
        self.num_rows = self.file.metadata.row_group(number).num_rows
        self._batches = self.file.iter_batches(batch_size=CHUNK_ROWS, row_groups=[number], use_threads=False,
                                               columns=[c for c in columns if c in present])
        self.next_row = 0  # first row of the group not read yet

    def read(self) -> pa.RecordBatch:
        batch = next(self._batches)
        self.next_row += batch.num_rows
        return batch

    def close(self) -> None:
        self.file.close()


class ShardReader:
    """Rows by index position, for one process. Reading a row streams its row group from the
    cursor's place (or from the start again when the row lies behind it); rows passed on the way
    that a later batch of this process needs are kept (at most ``max_kept_bytes``), others dropped."""

    def __init__(self, index: RowIndex, caption: CaptionConfig, max_open: int = 16, max_kept_bytes: int = 256 << 20):
        self.index, self.caption = index, caption
        machine = [caption.machine_column] if caption.machine_column else []
        self.columns = ["key", "image", caption.original_column, *machine, caption.synthetic_column]
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
            cursor = _GroupCursor(ix.files[ix.group_file[g]], int(ix.group_number[g]), self.columns)
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
                        bool(value(c.synthetic_column)))

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


@dataclass
class _Item:
    pixels: np.ndarray
    time_ids: tuple[int, ...]
    prompt: str
    key: str


class BucketDataset(Dataset):
    """Map-style dataset whose index is a PlannedBatch and whose item is the whole batch (the
    DataLoader runs with batch_size=None and the sampler as its sampler)."""

    def __init__(self, index: RowIndex, sampler: BucketBatchSampler, cfg: DataConfig):
        self.index, self.sampler, self.cfg = index, sampler, cfg
        self._reader: ShardReader | None = None
        self._pid = -1
        self._due: tuple[int, np.ndarray] | None = None
        self._warned: set[str] = set()

    def _prepare(self, epoch: int) -> tuple[ShardReader, np.ndarray]:
        if self._reader is None or self._pid != os.getpid():  # open files after a fork, never share
            self._reader, self._pid, self._due = ShardReader(self.index, self.cfg.caption), os.getpid(), None
        if self._due is None or self._due[0] != epoch:
            due = np.full(len(self.index), -1, dtype=np.int32)
            for k, rows in enumerate(self.sampler.rank_batches(epoch)):
                due[rows] = k
            self._due = (epoch, due)
            self._reader.reset()
        return self._reader, self._due[1]

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        info = get_worker_info()
        reader, due = self._prepare(batch.epoch)
        rows = reader.fetch(batch.rows, due, batch.position, info.num_workers if info else 1)
        items = [self._item(rows[int(p)], batch) for p in batch.rows]
        good = [i for i, item in enumerate(items) if item is not None]
        if not good:
            items = self._stand_ins(batch, reader, due, len(items))
        else:
            items = [item if item is not None else items[min(good, key=lambda j: (j - i) % len(items))]
                     for i, item in enumerate(items)]
        pixels = torch.from_numpy(np.stack([it.pixels for it in items]))
        return {
            "pixel_values": pixels.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0),  # uint8 moves
            "prompts": [it.prompt for it in items],
            "time_ids": torch.tensor([it.time_ids for it in items], dtype=torch.float32),
            "keys": [it.key for it in items],
            "epoch": batch.epoch,
            "position": batch.position,
        }

    def _item(self, row: ShardRow, batch: PlannedBatch) -> _Item | None:
        cfg, key = self.cfg, row.key
        crop = ((uniform(cfg.seed, batch.epoch, key, "crop-top"), uniform(cfg.seed, batch.epoch, key, "crop-left"))
                if cfg.random_crop else None)
        try:
            pixels, time_ids = cover_crop(row.image, batch.size, crop)
        except Exception as exc:  # any decode failure: the run goes on
            if key not in self._warned:
                self._warned.add(key)
                log.warning("training skips %s: its image does not decode (%s)", key, exc)
            return None
        prompt = choose_caption(cfg.caption, cfg.seed, batch.epoch, key, row.original, row.machine, row.synthetic)
        return _Item(pixels, time_ids, prompt, key)

    def _stand_ins(self, batch: PlannedBatch, reader: ShardReader, due: np.ndarray, size: int) -> list[_Item]:
        """Every row of ``batch`` failed: rows of the same bucket, drawn by (seed, epoch, position)."""
        same = np.flatnonzero(self.sampler.bucket_of == self.sampler.bucket_of[batch.rows[0]])
        rng = np.random.default_rng([self.cfg.seed, batch.epoch, batch.position])
        found: list[_Item] = []
        for p in rng.permutation(same)[:4 * size]:
            item = self._item(reader.fetch(np.array([p]), due, batch.position, 1)[int(p)], batch)
            if item is not None:
                found.append(item)
            if len(found) == size:
                break
        if not found:
            raise RuntimeError(f"no image of bucket {batch.size} decodes (batch {batch.position} and "
                               f"{4 * size} stand-ins tried): the shards look broken")
        return [found[i % len(found)] for i in range(size)]


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_sampler(index: RowIndex, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
    return BucketBatchSampler(index, cfg.batch_size, resolution=cfg.resolution, bucketed=cfg.bucketed,
                              seed=cfg.seed, rank=rank, world_size=world_size)


def make_loader(index: RowIndex, sampler: BucketBatchSampler, cfg: DataConfig) -> DataLoader:
    """Batches from ``sampler.position`` on, each made whole in one worker; workers are started per
    iterator (not persistent) so each new iterator sees the sampler's current epoch and position."""
    return DataLoader(BucketDataset(index, sampler, cfg), sampler=sampler, batch_size=None, collate_fn=_as_is,
                      num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None)


def loader_throughput(index: RowIndex, cfg: DataConfig, batches: int) -> float:
    """Samples per second over ``batches`` batches of a fresh sampler and loader (worker start-up
    included; epochs wrap)."""
    sampler = make_sampler(index, cfg)
    if len(sampler) == 0:
        raise ValueError("the selection is too small for one batch")
    loader = make_loader(index, sampler, cfg)
    done = samples = 0
    start = time.perf_counter()
    while done < batches:
        for batch in loader:
            samples, done = samples + len(batch["keys"]), done + 1
            sampler.record(batch)
            if done == batches:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    return samples / (time.perf_counter() - start)
