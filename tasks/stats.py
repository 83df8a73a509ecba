"""The DuckDB queries behind `t2i stats`: counts, reasons, signal percentiles, buckets.

DuckDB reads only the columns a query names, so the image bytes in the shards are
never loaded to compute statistics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

NOT_SIGNALS = {"key", "image", "caption", "source", "meta", "bucket_width", "bucket_height", "phash", "reason",
               "error"}
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _glob(out: Path, kind: str) -> str | None:
    files = sorted((out / kind).glob("*.parquet"))
    # Quoted for a SQL string literal: a folder name may hold a quote.
    return str(out / kind / "*.parquet").replace("'", "''") if files else None


def _numeric_columns(con: duckdb.DuckDBPyConnection, glob: str) -> list[str]:
    rows = con.execute(f"DESCRIBE SELECT * FROM read_parquet('{glob}', union_by_name=true)").fetchall()
    numeric = ("INT", "FLOAT", "DOUBLE", "DECIMAL", "BIGINT", "SMALLINT", "REAL")
    return [r[0] for r in rows if r[0] not in NOT_SIGNALS and any(t in r[1].upper() for t in numeric)]


def compute_stats(out: str | Path) -> dict[str, Any]:
    out = Path(out)
    con = duckdb.connect()
    kept_glob, reject_glob = _glob(out, "shards"), _glob(out, "rejects")
    stats: dict[str, Any] = {"out": str(out), "kept": 0, "rejected": 0, "reasons": {}, "signals": {},
                             "buckets": [], "duplicate_keys": 0}
    if kept_glob:
        src = f"read_parquet('{kept_glob}', union_by_name=true)"
        stats["kept"] = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
        for col in _numeric_columns(con, kept_glob):
            qs = ", ".join(f"quantile_cont({col}, {q})" for q in QUANTILES)
            row = con.execute(f"SELECT count({col}), min({col}), avg({col}), max({col}), {qs} FROM {src}").fetchone()
            stats["signals"][col] = {"n": row[0], "min": row[1], "mean": row[2], "max": row[3],
                                     **{f"p{round(q * 100)}": v for q, v in zip(QUANTILES, row[4:], strict=True)}}
        stats["buckets"] = [
            {"bucket": f"{w}x{h}", "rows": n}
            for w, h, n in con.execute(
                f"SELECT bucket_width, bucket_height, count(*) n FROM {src} "
                "GROUP BY ALL ORDER BY n DESC, bucket_width").fetchall()
        ]
    if reject_glob:
        src = f"read_parquet('{reject_glob}', union_by_name=true)"
        stats["rejected"] = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
        stats["reasons"] = dict(con.execute(
            f"SELECT reason, count(*) n FROM {src} GROUP BY reason ORDER BY n DESC, reason").fetchall())
    if kept_glob:  # should be 0: the run moves later duplicates to rejects/
        stats["duplicate_keys"] = con.execute(
            f"SELECT count(*) FROM (SELECT key FROM read_parquet('{kept_glob}') GROUP BY key HAVING count(*) > 1)"
        ).fetchone()[0]
    total = stats["kept"] + stats["rejected"]
    stats["kept_fraction"] = round(stats["kept"] / total, 4) if total else None
    return stats


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
    return "\n".join(lines) + "\n"
