"""Keys unique across the whole output, not just within a source shard.

Shards run in parallel and cannot see each other's keys, so after they finish one DuckDB
pass (out of core, however many keys) ranks every kept key by (part file, row). The first
occurrence stays; each later one moves to ``rejects/`` as ``duplicate_key``. Per part
file it writes the reject rows first, then rewrites the part without them, both atomic:
a pass killed in between recomputes the same rows next time, so it is safe to run again at
any point. A later pass can find new later occurrences in a part already cleaned (a shard whose
files sort earlier finished in a later run): its reject file is named by a hash of the keys it
moves, so it never overwrites the rows an earlier pass moved, while a repeat of an interrupted
pass (same keys) rewrites its own file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.arrow import KEPT_BASE, reject_schema
from tasks.shards import write_table_atomic


def _later_occurrences(out: Path) -> dict[str, list[int]]:
    """part file name -> row numbers (in that file) of keys seen in an earlier place."""
    glob = str(out / "shards" / "*.parquet").replace("'", "''")
    rows = duckdb.connect().execute(f"""
        SELECT filename, file_row_number FROM (
            SELECT filename, file_row_number,
                   row_number() OVER (PARTITION BY key ORDER BY filename, file_row_number) AS nth
            FROM read_parquet('{glob}', filename=true, file_row_number=true)
        ) WHERE nth > 1 ORDER BY filename, file_row_number
    """).fetchall()
    found: dict[str, list[int]] = {}
    for filename, row in rows:
        found.setdefault(filename, []).append(row)
    return found


def _as_rejects(rows: pa.Table) -> pa.Table:
    base = {f.name for f in KEPT_BASE}
    schema = reject_schema(f for f in rows.schema if f.name not in base)
    n = rows.num_rows
    extra = {"reason": pa.array(["duplicate_key"] * n),
             "error": pa.array(["key already kept from an earlier shard"] * n)}
    return pa.table({f.name: extra[f.name] if f.name in extra else rows[f.name] for f in schema}, schema=schema)


def dedupe_keys(out: str | Path) -> int:
    """Move later duplicates of kept keys to rejects/; returns how many rows moved."""
    out = Path(out)
    if not any((out / "shards").glob("*.parquet")):
        return 0
    moved = 0
    (out / "rejects").mkdir(exist_ok=True)
    for filename, row_numbers in _later_occurrences(out).items():
        part = Path(filename)
        table = pq.read_table(part)
        later = set(row_numbers)
        drop = pa.array([i in later for i in range(table.num_rows)])
        dupes = table.filter(drop)
        digest = hashlib.blake2b("\n".join(sorted(dupes["key"].to_pylist())).encode(), digest_size=6).hexdigest()
        write_table_atomic(out / "rejects" / part.name.replace(".parquet", f".dupes-{digest}.parquet"),
                           _as_rejects(dupes))
        write_table_atomic(part, table.filter(pc.invert(drop)))
        moved += len(row_numbers)
    return moved
