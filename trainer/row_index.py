"""The rows a training stage selects: one DuckDB query over the shards, no image bytes kept.

``RowIndex`` holds file, row, row group, size, recorded bucket and key per selected row (about
44 bytes a row), so it stays small when the shards do not; images are read later, by
trainer/shard_reader.py, as batches need them. Shards may be local or on S3 (``s3://``, endpoint and
keys from the environment), read through DuckDB's httpfs here.

``select`` may also bound a column of a sidecar set (tasks/sidecar.py) of a curated output entry,
e.g. ``{quality_level: {min: 4}}`` from the grade pass or a caption column: a column no shard has
is looked for in the sets beside ``shards/`` (folders with a ``_run.json``), and the set that
has it is LEFT JOINed by (part, key) from its committed, current sidecars only (as
``sidecar_files`` finds them). A row without a sidecar row reads NULL and fails the bound. Two
sets with the column are ambiguous: name it ``set.column`` (``grades.quality_level``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.shards import MANIFEST, committed_files
from tasks.storage import duckdb_setup, is_remote, open_store

if TYPE_CHECKING:
    from trainer.data import DataConfig

log = logging.getLogger(__name__)


def shard_files(entries: list[str]) -> list[str]:
    """The Parquet files ``entries`` name: a curate output dir (its committed shards/, never rejects/),
    a dir of *.parquet, a file or a glob, locally or as an ``s3://`` URL (a bucket prefix is a dir;
    settings from the environment). An entry that matches nothing is an error, not a silent skip."""
    if not entries:
        raise ValueError("data.shards is empty: name the curated or synthetic shard folders")
    files: set[str] = set()
    for entry in entries:
        found = [canonical(f) for f in _entry_files(entry)]
        if not found:
            raise ValueError(f"data.shards: {entry!r} holds no .parquet file")
        files.update(found)
    return sorted(files)


def _entry_files(entry: str) -> list[str]:
    """The files of one entry, by local path or URL (not yet canonical)."""
    remote = is_remote(entry)
    if not remote and not Path(entry).exists():
        return [f for f in glob.glob(entry, recursive=True) if f.endswith(".parquet")]
    if remote and any(c in entry for c in "*?["):  # DuckDB globs the bucket as read_parquet would
        return [f for (f,) in connect([entry]).execute("SELECT file FROM glob($p)", {"p": entry}).fetchall()
                if f.endswith(".parquet")]
    store = open_store(entry)
    if store.info("") is not None:
        return [store.url()]
    if store.list(MANIFEST, ".json") or store.list("shards", ".parquet"):
        # an object store may hold parts of attempts never committed: only the manifest's count
        return committed_files(store, "shards")
    return [store.url(e.rel) for e in store.list("", ".parquet")]


def sidecar_files(files: list[str], set_name: str | None) -> list[str | None]:
    """Per shard file, the caption sidecar of the same part (tasks/sidecar.py), or None: no set, the
    file is not a curated part, or the part changed since it was captioned (a warning says to run
    ``t2i caption`` again; its rows train on their own captions meanwhile)."""
    if not set_name:
        return [None] * len(files)
    out: list[str | None] = []
    done: dict[str, dict[str, dict]] = {}  # output root -> part stem -> manifest entry
    for f in files:
        root, sep, name = f.rpartition("/shards/")
        if not sep or "/" in name:
            out.append(None)
            continue
        if root not in done:
            store = open_store(root)
            done[root] = {e.rel.rsplit("/", 1)[-1].removesuffix(".json"): json.loads(store.read_bytes(e.rel))
                          for e in store.list(f"{set_name}/_manifest", ".json")}
        stem = name.removesuffix(".parquet")
        entry = done[root].get(stem)
        if entry is None:
            out.append(None)
            continue
        size = open_store(root).info(f"shards/{name}")
        if size is None or entry.get("part", {}).get("size") != size.size:
            log.warning("the %s sidecar of %s is stale (the part changed since its pass ran): run the pass (t2i "
                        "caption for captions) again; meanwhile its rows read NULL there and train on their own "
                        "captions", set_name, f)
            out.append(None)
            continue
        out.append(f"{root}/{entry['file']}")
    return out


def canonical(path: str) -> str:
    """How a file is named in the index: an object-store URL as it is, a local path resolved (so
    DuckDB's ``filename`` and the listing agree)."""
    return path if is_remote(path) else str(Path(path).resolve())


def connect(files: list[str]) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that can read ``files``: httpfs with the environment's endpoint and keys
    when one is on an object store (all of them share the settings)."""
    con = duckdb.connect()
    remote = next((f for f in files if is_remote(f)), None)
    if remote is not None:
        for statement in duckdb_setup(open_store(remote)):
            con.execute(statement)
    return con


def _group_rows(con: duckdb.DuckDBPyConnection, files: list[str]) -> dict[str, list[int]]:
    """Rows per row group of each file, in order: the footers read by DuckDB in parallel (one
    request each on an object store, not one file after another)."""
    found: dict[str, list[int]] = {}
    for name, _, rows in con.execute("SELECT file_name, row_group_id, any_value(row_group_num_rows) "
                                     "FROM parquet_metadata($files) GROUP BY ALL ORDER BY ALL",
                                     {"files": files}).fetchall():
        found.setdefault(canonical(name), []).append(rows)
    return found


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def sidecar_sets(files: list[str]) -> list[str]:
    """The sidecar sets beside the curated outputs ``files`` belong to (tasks.stats.sidecar_sets)."""
    from tasks.stats import sidecar_sets as of_output

    roots = dict.fromkeys(f.rpartition("/shards/")[0] for f in files if "/shards/" in f)
    return sorted({name for root in roots for name in of_output(open_store(root))})


def _join_sidecars(con: duckdb.DuckDBPyConnection, files: list[str], src: str, wanted: list[str], available: str,
                   params: dict) -> str:
    """``src`` with the ``wanted`` columns of the sidecar sets LEFT JOINed on (part, key); a column
    ``set.column`` names its set. Adds the sidecar lists to ``params``; returns the relation."""
    sets: dict[str, tuple[list[str], list[str], list[str]]] = {}  # set -> its shards, sidecars, columns
    for name in sidecar_sets(files):
        pairs = [(f, s) for f, s in zip(files, sidecar_files(files, name), strict=True) if s is not None]
        if not pairs:
            continue
        found = con.execute("DESCRIBE SELECT * FROM read_parquet($f, union_by_name=true)",
                            {"f": [s for _, s in pairs]}).fetchall()
        sets[name] = ([f for f, _ in pairs], [s for _, s in pairs],
                      [r[0] for r in found if r[0] not in ("key", "filename", "file_row_number")])
    by_set: dict[str, list[tuple[str, str]]] = {}  # set -> (column in the set, name in select)
    for col in wanted:
        named = [(n, col[len(n) + 1:]) for n in sets if col.startswith(f"{n}.") and col[len(n) + 1:] in sets[n][2]]
        if named:
            by_set.setdefault(named[0][0], []).append((named[0][1], col))
            continue
        having = [name for name, (_, _, cols) in sets.items() if col in cols]
        if len(having) > 1:
            raise ValueError(f"data.select: column {col!r} is in the sidecar sets {having}: name one, e.g. "
                             f"{having[0] + '.' + col!r}")
        if not having:
            extra = "; ".join(f"{n}: {', '.join(c)}" for n, (_, _, c) in sets.items())
            raise ValueError(f"data.select: unknown column {col!r}; the shards have: {available}"
                             + (f"; the sidecar sets have: {extra}" if extra else ""))
        by_set.setdefault(having[0], []).append((col, col))
    joins, picked = [], []
    for i, (name, cols) in enumerate(by_set.items()):
        shards, sidecars, _ = sets[name]
        params[f"sc{i}"], params[f"sh{i}"] = sidecars, shards
        inner = ", ".join(f"c.{_quote(c)} AS {_quote(alias)}" for c, alias in cols)
        joins.append(f"LEFT JOIN (SELECT m.shard, c.key, {inner} "
                     f"FROM read_parquet($sc{i}, filename=true, union_by_name=true) c "
                     f"JOIN (SELECT unnest($sc{i}) AS sidecar, unnest($sh{i}) AS shard) m ON c.filename = m.sidecar) "
                     f"j{i} ON s.filename = j{i}.shard AND s.key = j{i}.key")
        picked += [f"j{i}.{_quote(alias)}" for _, alias in cols]
    return f"(SELECT s.*, {', '.join(picked)} FROM {src} s {' '.join(joins)})"


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
    sidecars: list[str | None] = field(default_factory=list)  # per file: its caption sidecar, if current
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
        con = connect(files)
        src = "read_parquet($files, filename=true, file_row_number=true, union_by_name=true)"
        columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}", {"files": files}).fetchall()]
        available = ", ".join(c for c in columns if c not in ("filename", "file_row_number"))
        for col in ["key", "width", "height"]:
            if col not in columns:
                raise ValueError(f"data.the shards lack the column {col!r}; the shards have: {available}")
        where, params = ["width IS NOT NULL", "height IS NOT NULL"], {"files": files}
        selected = src
        wanted = [c for c in cfg.select if c not in columns]
        if wanted:
            selected = _join_sidecars(con, files, src, wanted, available, params)
        for i, (col, bounds) in enumerate(cfg.select.items()):
            for op, value, name in ((">=", bounds.min, f"lo{i}"), ("<=", bounds.max, f"hi{i}")):
                if value is not None:
                    where.append(f"{_quote(col)} {op} ${name}")
                    params[name] = value
        if cfg.min_short_side is not None:
            where.append("least(width, height) >= $short")
            params["short"] = cfg.min_short_side
        buckets = ", ".join(c if c in columns else f"NULL::INTEGER AS {c}" for c in ("bucket_width", "bucket_height"))
        query = (f"SELECT filename, file_row_number, key, width, height, {buckets} FROM {selected} "
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
        index = cls._from_table(files, table, _group_rows(con, files))
        index.sidecars = sidecar_files(files, cfg.caption.sidecar_set)
        return index

    @classmethod
    def _from_table(cls, files: list[str], table: pa.Table, group_rows: dict[str, list[int]]) -> RowIndex:
        names = pc.dictionary_encode(table.column("filename").combine_chunks())
        ids = {f: i for i, f in enumerate(files)}
        file = np.array([ids[canonical(f)] for f in names.dictionary.to_pylist()],
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
            starts = np.cumsum([0, *group_rows.get(path, [])])[:-1]
            lo, hi = np.searchsorted(file, [f, f + 1])
            group[lo:hi] = len(g_start) + np.searchsorted(starts, row[lo:hi], side="right") - 1
            g_file += [f] * len(starts)
            g_number += range(len(starts))
            g_start += starts.tolist()
        return cls(files, file, row, group, ints["width"], ints["height"], ints["bucket_width"],
                   ints["bucket_height"], col["key"].combine_chunks(), np.array(g_file, dtype=np.int32),
                   np.array(g_number, dtype=np.int32), np.array(g_start, dtype=np.int64))
