"""`t2i report DIR`: one self-contained HTML file (``DIR/report.html``) that shows what curation kept and
what each rule removed: counts, reject reasons with thumbnails of sampled rows, a histogram of every numeric
signal with the rule's bounds drawn in, buckets, sampled kept images and, where a caption pass ran, machine
captions beside the originals (the page itself is built in tasks/report_html.py).

Samples are deterministic (the same output gives the same page). Kept rows carry their image bytes: the
sampled rows' row groups are read from the committed parts (DuckDB names each row's file and row number),
never whole parts. Rejects carry no bytes: a sampled reject's image is read again from its source shard
(``tasks.sources.read_shard`` over the shard rebuilt from the reject's ``source``; a folder source's file
directly), reading stops once that shard's sampled keys are found. To keep that cheap, rejects are sampled
from the fewest shards: ordered by ``hash(source)``, then ``hash(key)``. A reject whose image cannot be had
(no image in the source, undecodable, source gone) is a placeholder tile with its reason and error.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from schemas.config import Bounds, DecodeConfig, SourceConfig, StorageConfig
from tasks.decode import DecodeError
from tasks.report_images import part_images, source_images, thumbnail
from tasks.shards import committed_glob
from tasks.stats import _ident, _literal, _numeric_columns, _source, caption_sets, compute_stats
from tasks.storage import Store, duckdb_setup, is_remote, open_store

REPORT = "report.html"
REJECTS_PER_REASON = 24
KEPT_SAMPLE = 48
CAPTION_SAMPLE = 12
# Reasons whose rows never had image bytes in the source: nothing to read again.
NO_IMAGE_REASONS = {"missing_image", "source_unreadable", "file_too_large", "noncontiguous_key"}


class NotAnOutput(ValueError):
    """The folder is not a t2i curate or analyze output."""


@dataclass
class Tile:
    key: str
    image: str | None  # a data: URI, or None for a placeholder
    note: str  # what the placeholder says (reason: error), or ""
    hover: str  # the row's signal values, one per line


@dataclass
class ReportData:
    out: str
    mode: str | None
    source: str | None
    stats: dict[str, Any]
    rules: dict[str, Bounds]
    signals: list[str] = field(default_factory=list)  # numeric columns over kept and rejected rows
    histograms: dict[str, list[tuple[str, list[float], list[int]]]] = field(default_factory=dict)
    reasons: list[tuple[str, int, list[Tile]]] = field(default_factory=list)
    kept: list[Tile] = field(default_factory=list)
    captions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # set -> sampled rows


def write_report(out: str | Path, storage: StorageConfig | None = None) -> str:
    """Write ``out/report.html`` (a local folder or an object-store prefix); returns where it is: the local
    path, or the object's URL. ``NotAnOutput`` if ``out`` is not a curate or analyze output."""
    from tasks.report_html import render

    store = open_store(out, storage)
    store.write_bytes(REPORT, render(gather(out, storage)).encode("utf-8"))
    return store.url(REPORT) if is_remote(out) else str(Path(store.path(REPORT)))


def report_link(location: str) -> str:
    """A link to a written report: ``file://`` for a local path, the URL for an object store."""
    return location if is_remote(location) else Path(location).resolve().as_uri()


def _read_stamp(store: Store) -> dict[str, Any]:
    if not store.exists("_run.json"):
        raise NotAnOutput(f"{store.url()} is not a t2i curate or analyze output (it has no _run.json)")
    try:
        stamp = json.loads(store.read_bytes("_run.json"))
    except ValueError as exc:
        raise NotAnOutput(f"{store.url()}/_run.json is not valid JSON: {exc}") from None
    if not isinstance(stamp, dict):
        raise NotAnOutput(f"{store.url()}/_run.json is not a t2i run stamp")
    return stamp


def _rules(config: dict[str, Any]) -> dict[str, Bounds]:
    rules = {}
    for column, bounds in (config.get("rules") or {}).items():
        try:
            rules[column] = Bounds.model_validate(bounds)
        except ValueError:  # a stamp from another version: leave the line out, not the report
            continue
    return rules


def _with_rows(store: Store, kind: str) -> str | None:
    """``read_parquet`` over ``kind``'s committed parts, each row with its file and row number."""
    parts = committed_glob(store, kind)
    if parts is None:
        return None
    files = _literal(parts) if isinstance(parts, str) else "[" + ", ".join(map(_literal, parts)) + "]"
    return f"read_parquet({files}, union_by_name=true, filename=true, file_row_number=true)"


def gather(out: str | Path, storage: StorageConfig | None = None) -> ReportData:
    """Everything the page shows, read from the output (and, for reject thumbnails, the sources)."""
    store = open_store(out, storage)
    store.check()
    stamp = _read_stamp(store)
    config = stamp.get("config") or {}
    decode = DecodeConfig.model_validate(config.get("decode") or {})
    stats = compute_stats(out, storage)
    data = ReportData(out=stats["out"], mode=stamp.get("mode"), source=stamp.get("source"), stats=stats,
                      rules=_rules(config))
    if not stats["kept"] and not stats["rejected"]:
        return data
    con = duckdb.connect()
    for statement in duckdb_setup(store, storage):
        con.execute(statement)
    kept, rejects = _source(store, "shards"), _source(store, "rejects")
    kept_cols = _numeric_columns(con, kept) if kept else []
    reject_cols = _numeric_columns(con, rejects) if rejects else []
    data.signals = list(dict.fromkeys(kept_cols + reject_cols))
    data.histograms = {c: _histogram(con, c, kept if c in kept_cols else None, rejects if c in reject_cols else None)
                       for c in data.signals}
    if stats["kept"]:
        data.kept = _kept_tiles(con, store, _with_rows(store, "shards"), kept_cols, decode)
        data.captions = {name: _caption_rows(con, store, name, decode) for name in caption_sets(store)}
    if stats["rejected"]:
        source_cfg = SourceConfig.model_validate({**(config.get("source") or {}), "unreadable": "salvage"})
        data.reasons = _reject_tiles(con, rejects, reject_cols, stats["reasons"], stamp.get("source") or "",
                                     source_cfg, decode, storage)
    return data


# -- histograms ------------------------------------------------------------------------------

BINS = 30


def _histogram(con: duckdb.DuckDBPyConnection, column: str, kept: str | None,
               rejects: str | None) -> list[tuple[str, list[float], list[int]]]:
    """Per side present (kept, rejected): (side, bin edges, counts), the same edges for both; finite
    values only. Counted in DuckDB, so no column is pulled into Python."""
    col = _ident(column)
    sides = [(name, src) for name, src in (("kept", kept), ("rejected", rejects)) if src]
    union = " UNION ALL ".join(f"SELECT {col}::DOUBLE x, '{name}' side FROM {src}" for name, src in sides)
    lo, hi = con.execute(f"SELECT min(x), max(x) FROM ({union}) WHERE isfinite(x)").fetchone()
    if lo is None:
        return []
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = (hi - lo) / BINS
    edges = [lo + i * width for i in range(BINS)] + [hi]
    counts = {name: [0] * BINS for name, _ in sides}
    for side, b, n in con.execute(
            f"SELECT side, least(floor((x - {lo!r}) / {width!r})::BIGINT, {BINS - 1}) b, count(*) "
            f"FROM ({union}) WHERE isfinite(x) GROUP BY ALL").fetchall():
        counts[side][int(b)] = n
    return [(name, edges, counts[name]) for name, _ in sides]


# -- tiles -----------------------------------------------------------------------------------


def _hover(row: dict[str, Any], columns: list[str], head: list[str]) -> str:
    lines = [h for h in head if h]
    for c in columns:
        v = row.get(c)
        if v is not None:
            lines.append(f"{c}: {v:.4g}" if isinstance(v, float) else f"{c}: {v}")
    return "\n".join(lines)


def _tile(row: dict[str, Any], columns: list[str], image: bytes | str | None, decode: DecodeConfig,
          note: str = "") -> Tile:
    head = [f"key: {row['key']}", f"reason: {row['reason']}" if row.get("reason") else "",
            f"error: {row['error']}" if row.get("error") else "",
            f"caption: {row['caption'][:200]}" if row.get("caption") else ""]
    hover = _hover(row, columns, head)
    if isinstance(image, bytes):
        try:
            return Tile(row["key"], thumbnail(image, decode), note, hover)
        except DecodeError as exc:
            return Tile(row["key"], None, f"{exc.reason}: {exc.detail}", hover)
    return Tile(row["key"], None, image or note or "no image", hover)


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _kept_tiles(con: duckdb.DuckDBPyConnection, store: Store, kept: str, columns: list[str],
                decode: DecodeConfig) -> list[Tile]:
    cols = "".join(f", {_ident(c)}" for c in columns)
    rows = _rows(con, f"SELECT key, caption, filename, file_row_number{cols} FROM {kept} "
                      f"ORDER BY hash(key), key LIMIT {KEPT_SAMPLE}")
    images = part_images(store, [(r["filename"], r["file_row_number"]) for r in rows])
    return [_tile(r, columns, images.get((r["filename"], r["file_row_number"])), decode) for r in rows]


def _caption_rows(con: duckdb.DuckDBPyConnection, store: Store, name: str,
                  decode: DecodeConfig) -> list[dict[str, Any]]:
    """Sampled kept rows of one caption set: key, thumbnail, original caption and the set's captions."""
    from tasks.sidecar import PART_MANIFEST

    files = [store.url(json.loads(store.read_bytes(e.rel))["file"])
             for e in store.list(f"{name}/{PART_MANIFEST}", ".json")]
    kept = _with_rows(store, "shards")
    if not files or kept is None:
        return []
    side = "read_parquet([" + ", ".join(map(_literal, files)) + "], union_by_name=true)"
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {side}").fetchall()}
    wanted = [c for c in ("recaption_en", "recaption_zh", "caption_error") if c in have]
    cols = "".join(f", c.{_ident(c)}" for c in wanted)
    rows = _rows(con, f"SELECT c.key, s.caption, s.filename, s.file_row_number{cols} FROM {side} c "
                      f"JOIN {kept} s ON s.key = c.key ORDER BY hash(c.key), c.key LIMIT {CAPTION_SAMPLE}")
    images = part_images(store, [(r["filename"], r["file_row_number"]) for r in rows])
    for r in rows:
        r["tile"] = _tile({"key": r["key"]}, [], images.get((r.pop("filename"), r.pop("file_row_number"))), decode)
    return rows


# -- rejects: images read again from their sources --------------------------------------------


def _reject_tiles(con: duckdb.DuckDBPyConnection, rejects: str, columns: list[str], counts: dict[str, int],
                  run_source: str, source_cfg: SourceConfig, decode: DecodeConfig,
                  storage: StorageConfig | None) -> list[tuple[str, int, list[Tile]]]:
    cols = "".join(f", {_ident(c)}" for c in columns)
    rows = _rows(con, f"SELECT reason, key, source, error, caption{cols} FROM (SELECT *, row_number() OVER "
                      f"(PARTITION BY reason ORDER BY hash(source), hash(key), key) rn FROM {rejects}) "
                      f"WHERE rn <= {REJECTS_PER_REASON} ORDER BY reason, rn")
    wanted: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r["reason"] not in NO_IMAGE_REASONS:
            wanted[r["source"]].add(r["key"])
    images = {(src, key): got for src, keys in wanted.items()
              for key, got in source_images(src, keys, run_source, source_cfg, decode, storage).items()}
    tiles: dict[str, list[Tile]] = defaultdict(list)
    for r in rows:
        note = f"{r['reason']}: {r['error']}" if r.get("error") else r["reason"]
        got = images.get((r["source"], r["key"]))
        tiles[r["reason"]].append(_tile(r, columns, got if isinstance(got, bytes) else None, decode,
                                        note if not isinstance(got, str) else f"{note} ({got})"))
    return [(reason, n, tiles.get(reason, [])) for reason, n in counts.items()]
