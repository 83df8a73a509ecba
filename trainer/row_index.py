"""The rows a training stage selects: one DuckDB query over the shards, no image bytes kept.

``RowIndex`` holds file, row, row group, size, recorded bucket and key per selected row (about
44 bytes a row), so it stays small when the shards do not; images are read later, by
trainer/shard_reader.py, as batches need them.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from trainer.data import DataConfig

log = logging.getLogger(__name__)


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
