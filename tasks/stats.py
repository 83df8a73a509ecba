"""The DuckDB queries behind `t2i stats`: counts, reasons, signal percentiles, buckets.

DuckDB reads only the columns a query names, so the image bytes in the shards are
never loaded to compute statistics (on an object store, only those columns' byte ranges
are fetched). Only committed parts are counted (tasks/shards.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from schemas.config import StorageConfig
from tasks.shards import committed_glob
from tasks.storage import Store, duckdb_setup, is_remote, open_store

NOT_SIGNALS = {"key", "image", "caption", "source", "meta", "bucket_width", "bucket_height", "phash", "reason",
               "error"}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _literal(text: str) -> str:
    """A SQL string literal: a folder or bucket name may hold a quote."""
    return "'" + text.replace("'", "''") + "'"


def _ident(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _source(store: Store, kind: str) -> str | None:
    """``read_parquet`` over ``kind``'s committed parts only (an object store may also hold parts of
    attempts that never committed), or None when there are none."""
    parts = committed_glob(store, kind)
    if parts is None:
        return None
    files = _literal(parts) if isinstance(parts, str) else "[" + ", ".join(map(_literal, parts)) + "]"
    return f"read_parquet({files}, union_by_name=true)"


def _numeric_columns(con: duckdb.DuckDBPyConnection, src: str) -> list[str]:
    rows = con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
    numeric = ("INT", "FLOAT", "DOUBLE", "DECIMAL", "BIGINT", "SMALLINT", "REAL")
    return [r[0] for r in rows if r[0] not in NOT_SIGNALS and any(t in r[1].upper() for t in numeric)]


def compute_stats(out: str | Path, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The summary of an output, a local folder or an ``s3://`` URL (read through DuckDB's httpfs
    with the same endpoint and keys as the store)."""
    store = open_store(out, storage)
    con = duckdb.connect()
    for statement in duckdb_setup(store, storage):
        con.execute(statement)
    kept_src, reject_src = _source(store, "shards"), _source(store, "rejects")
    stats: dict[str, Any] = {"out": store.url() if is_remote(out) else str(Path(out)), "kept": 0, "rejected": 0,
                             "reasons": {}, "signals": {}, "buckets": [], "duplicate_keys": 0}
    if kept_src:
        stats["kept"] = con.execute(f"SELECT count(*) FROM {kept_src}").fetchone()[0]
        for name in _numeric_columns(con, kept_src):
            col = _ident(name)
            qs = ", ".join(f"quantile_cont({col}, {q})" for q in QUANTILES)
            row = con.execute(f"SELECT count({col}), min({col}), avg({col}), max({col}), {qs} FROM {kept_src}"
                              ).fetchone()
            stats["signals"][name] = {"n": row[0], "min": row[1], "mean": row[2], "max": row[3],
                                      **{f"p{round(q * 100)}": v for q, v in zip(QUANTILES, row[4:], strict=True)}}
        stats["buckets"] = [
            {"bucket": f"{w}x{h}", "rows": n}
            for w, h, n in con.execute(
                f"SELECT bucket_width, bucket_height, count(*) n FROM {kept_src} "
                "GROUP BY ALL ORDER BY n DESC, bucket_width").fetchall()
        ]
        # should be 0: the run moves later duplicates to rejects/
        stats["duplicate_keys"] = con.execute(
            f"SELECT count(*) FROM (SELECT key FROM {kept_src} GROUP BY key HAVING count(*) > 1)").fetchone()[0]
    if reject_src:
        stats["rejected"] = con.execute(f"SELECT count(*) FROM {reject_src}").fetchone()[0]
        stats["reasons"] = dict(con.execute(
            f"SELECT reason, count(*) n FROM {reject_src} GROUP BY reason ORDER BY n DESC, reason").fetchall())
    total = stats["kept"] + stats["rejected"]
    stats["kept_fraction"] = round(stats["kept"] / total, 4) if total else None
    stats["caption_sets"] = {name: _caption_set(con, store, name, stats["kept"]) for name in caption_sets(store)}
    return stats


# Per caption set: what share of the rows got a caption, and what went wrong (tasks/sidecar.py);
# figure -> (the column it needs, its SQL). A set made without a translator has no Chinese columns.
CAPTION_FIGURES = {
    "rows": ("key", "count(*)"),
    "captioned": ("recaption_en", "count(recaption_en)"),
    "errors": ("caption_error", "count(caption_error)"),
    "truncated": ("caption_truncated", "count(*) FILTER (WHERE caption_truncated)"),
    "repetitive": ("caption_repetitive", "count(*) FILTER (WHERE caption_repetitive)"),
    "mean_caption_tokens": ("caption_tokens", "avg(caption_tokens)"),
    "translated": ("recaption_zh", "count(recaption_zh)"),
    "translate_truncated": ("translate_truncated", "count(*) FILTER (WHERE translate_truncated)"),
    "spans_lost": ("spans_kept", "count(*) FILTER (WHERE spans_kept = false)"),
    "mean_translate_tokens": ("translate_tokens", "avg(translate_tokens)"),
}


def sidecar_sets(store: Store) -> list[str]:
    """The sidecar sets of an output (captions, grades, ...): folders beside shards/ with a set stamp."""
    from pyarrow import fs as pafs

    from tasks.sidecar import SET_STAMP

    found = store.fs.get_file_info(pafs.FileSelector(store.path(), recursive=False, allow_not_found=True))
    names = sorted(f.base_name for f in found if f.type == pafs.FileType.Directory)
    return [n for n in names if n not in ("shards", "rejects") and not n.startswith("_") and
            store.exists(f"{n}/{SET_STAMP}")]


def caption_sets(store: Store) -> list[str]:
    """The sidecar sets that hold machine captions (their stamp names a captioner)."""
    from tasks.sidecar import SET_STAMP

    return [n for n in sidecar_sets(store) if "captioner" in json.loads(store.read_bytes(f"{n}/{SET_STAMP}"))]


def _caption_set(con: duckdb.DuckDBPyConnection, store: Store, name: str, kept: int) -> dict[str, Any]:

    from tasks.sidecar import PART_MANIFEST

    files = [store.url(json.loads(store.read_bytes(e.rel))["file"])
             for e in store.list(f"{name}/{PART_MANIFEST}", ".json")]
    if not files:
        return {"rows": 0, "of_kept": 0.0}
    src = "read_parquet([" + ", ".join(map(_literal, files)) + "], union_by_name=true)"
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    figures = {k: sql for k, (column, sql) in CAPTION_FIGURES.items() if column in have}
    row = con.execute(f"SELECT {', '.join(figures.values())} FROM {src}").fetchone()
    out = dict(zip(figures, row, strict=True))
    out["of_kept"] = round(out["rows"] / kept, 4) if kept else None  # below 1: parts not captioned yet
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"output: {stats['out']}",
             f"kept: {stats['kept']}   rejected: {stats['rejected']}   kept fraction: {_fmt(stats['kept_fraction'])}"
             f"   duplicate keys: {stats['duplicate_keys']}"]
    if stats["reasons"]:
        lines.append("\nreject reasons:")
        lines += [f"  {reason:<32} {n:>10}" for reason, n in stats["reasons"].items()]
    if stats["signals"]:
        cols = ["n", "min", "p5", "p25", "p50", "p75", "p95", "max"]
        lines.append("\nsignals over kept rows:")
        lines.append(f"  {'signal':<16}" + "".join(f"{c:>11}" for c in cols))
        for name, s in stats["signals"].items():
            lines.append(f"  {name:<16}" + "".join(f"{_fmt(s[c]):>11}" for c in cols))
    if stats["buckets"]:
        lines.append("\nbuckets (w x h: rows):")
        lines.append("  " + ", ".join(f"{b['bucket']}: {b['rows']}" for b in stats["buckets"]))
    for name, figures in stats.get("caption_sets", {}).items():
        lines.append(f"\ncaption set {name}:")
        lines.append("  " + "   ".join(f"{k}: {_fmt(v)}" for k, v in figures.items()))
    return "\n".join(lines)


def format_markdown(stats: dict[str, Any]) -> str:
    """The same summary as a Markdown table, for the Prefect UI."""
    lines = ["# Curation summary", "", f"Output: `{stats['out']}`", "",
             "| kept | rejected | kept fraction | duplicate keys in shards |", "| --- | --- | --- | --- |",
             f"| {stats['kept']} | {stats['rejected']} | {_fmt(stats['kept_fraction'])} | {stats['duplicate_keys']} |"]
    if stats["reasons"]:
        lines += ["", "## Reject reasons", "", "| reason | rows |", "| --- | --- |"]
        lines += [f"| {reason} | {n} |" for reason, n in stats["reasons"].items()]
    if stats["signals"]:
        cols = ["n", "min", "p5", "p25", "p50", "p75", "p95", "max"]
        lines += ["", "## Signals over kept rows", "", "| signal | " + " | ".join(cols) + " |",
                  "|" + " --- |" * (len(cols) + 1)]
        lines += [f"| {name} | " + " | ".join(_fmt(s[c]) for c in cols) + " |" for name, s in stats["signals"].items()]
    if stats["buckets"]:
        lines += ["", "## Buckets", "", "| bucket | rows |", "| --- | --- |"]
        lines += [f"| {b['bucket']} | {b['rows']} |" for b in stats["buckets"]]
    for name, figures in stats.get("caption_sets", {}).items():
        lines += ["", f"## Caption set `{name}`", "", "| " + " | ".join(figures) + " |", "|" + " --- |" * len(figures),
                  "| " + " | ".join(_fmt(v) for v in figures.values()) + " |"]
    return "\n".join(lines) + "\n"
