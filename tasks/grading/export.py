"""``export_sample``: a sample of a curated output for human grading (the workspace of tasks/grading).

How the rows are drawn:

- **Strata.** Up to ``MAX_STRATA_COLUMNS`` of the automatic signals present in the kept rows, in the order of
  ``SIGNAL_PREFERENCE`` (aesthetic first, then the technical-quality scores), are each cut into quartiles over
  all kept rows with DuckDB (``ntile(4)``; a null is its own bin ``na``); a row's stratum is the combination, e.g.
  ``aesthetic=q1,sharpness=q4``. An output with none of these signals is one stratum, ``all``.
- **Even across strata.** Within its stratum every row gets a rank by ``md5(key || ':' || seed)``; rows are
  taken rank 1 of every stratum, then rank 2 of every stratum, and so on, until ``n`` are drawn, so each
  stratum gives the same number of rows (a small stratum runs out and the others fill in). The same output,
  ``n`` and seed draw the same rows.
- **Uncertain rows.** With ``uncertain`` (the predictions of the previous round's model: a Parquet file, a
  glob, or a folder of Parquet parts such as a sidecar set; only its ``key`` and ``quality_confidence``
  columns are read), half of ``n`` (``n // 2``) are the eligible rows the model is least sure of (lowest
  ``quality_confidence``, ties by the same hash); their stratum is ``uncertain``. The other half is drawn
  as above.
- **Rounds.** Keys already in the workspace's ``batch.parquet`` are never drawn again; each export is the
  next round (1, 2, ...) and its rows are appended to ``batch.parquet`` (written beside, then renamed).

The Label Studio import (``labelstudio/tasks.json``) holds the rows of the round just drawn (what there is to
import now); every round's import is also kept as ``labelstudio/tasks.round{N}.json``.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import DecodeConfig, StorageConfig
from tasks.grading import BATCH, EXPORT_META, LABEL_STUDIO, LEVELS
from tasks.report import _with_rows
from tasks.report_images import part_images
from tasks.stats import _ident, _literal, caption_sets
from tasks.storage import duckdb_setup, open_store

log = logging.getLogger(__name__)

GRADE_SIDE = 768  # long side of the JPEG graders see, px
JPEG_QUALITY = 88
SIGNAL_PREFERENCE = ("aesthetic", "quality", "brisque", "niqe", "musiq", "sharpness")
MAX_STRATA_COLUMNS = 2
QUARTILES = 4
UNCERTAIN = "uncertain"
BATCH_ROW_GROUP = 32  # small row groups: the page reads one image at a time


class ExportError(ValueError):
    """The sample cannot be drawn (no committed rows, bad predictions file, n < 1)."""


def signal_columns(columns: dict[str, str]) -> list[str]:
    """The signal columns the strata are cut on: of ``columns`` (name -> DuckDB type), the numeric ones
    named in ``SIGNAL_PREFERENCE``, in its order, at most ``MAX_STRATA_COLUMNS``."""
    numeric = ("INT", "FLOAT", "DOUBLE", "DECIMAL", "REAL")
    present = [c for c in SIGNAL_PREFERENCE if c in columns and any(t in columns[c].upper() for t in numeric)]
    return present[:MAX_STRATA_COLUMNS]


def export_sample(shards: str, n: int, out: str, *, seed: int = 0, uncertain: str | None = None,
                  storage: StorageConfig | None = None) -> dict[str, Any]:
    """Draw ``n`` rows of the curated output ``shards`` (a folder or ``s3://``/``gs://`` URL; its committed
    parts only) into the grading workspace ``out`` as its next round; returns what ``export.json`` records
    (plus ``keys``: the keys drawn, in batch order)."""
    if n < 1:
        raise ExportError(f"n must be at least 1, not {n}")
    gdir = Path(out)
    gdir.mkdir(parents=True, exist_ok=True)
    store = open_store(shards, storage)
    kept = _with_rows(store, "shards")
    if kept is None:
        raise ExportError(f"{store.url()} has no committed shards (run t2i curate first)")
    con = duckdb.connect()
    for statement in duckdb_setup(store, storage):
        con.execute(statement)
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {kept}").fetchall()}
    strata_cols = signal_columns(types)

    previous = _read_batch(gdir)
    round_no = (max(previous.column("round").to_pylist()) + 1) if previous is not None and previous.num_rows else 1
    taken = set(previous.column("key").to_pylist()) if previous is not None else set()
    con.execute("CREATE TEMP TABLE taken (key VARCHAR)")
    if taken:
        con.executemany("INSERT INTO taken VALUES (?)", [(k,) for k in sorted(taken)])

    caption_sql, caption_join = _caption_source(con, store)
    sig = "".join(f", s.{_ident(c)}" for c in strata_cols)
    con.execute(f"CREATE TEMP TABLE pool AS SELECT s.key, {caption_sql} AS caption, s.filename, s.file_row_number"
                f"{sig}, md5(s.key || ':' || {int(seed)}) AS h FROM {kept} s {caption_join} WHERE s.key IS NOT NULL")
    # Quartiles over every kept row (not only those left), so a round's strata are the output's quartiles.
    # A key twice in the shards (should not happen: curation moves duplicates to rejects): its first row.
    bins = ", ".join(
        f"CASE WHEN {_ident(c)} IS NULL THEN '{c}=na' ELSE '{c}=q' || ntile({QUARTILES}) OVER "
        f"(PARTITION BY {_ident(c)} IS NULL ORDER BY {_ident(c)}, key) END" for c in strata_cols)
    stratum_sql = f"concat_ws(',', {bins})" if strata_cols else "'all'"
    con.execute(f"CREATE TEMP TABLE binned AS SELECT *, {stratum_sql} AS stratum FROM (SELECT * EXCLUDE (d) FROM "
                "(SELECT *, row_number() OVER (PARTITION BY key ORDER BY filename, file_row_number) d FROM pool) "
                "WHERE d = 1)")
    eligible = "(SELECT * FROM binned WHERE key NOT IN (SELECT key FROM taken))"

    picked: list[dict[str, Any]] = []
    n_uncertain = 0
    if uncertain:
        preds = _predictions_source(con, uncertain)
        rows = _dicts(con, f"SELECT e.* EXCLUDE (stratum), '{UNCERTAIN}' AS stratum FROM {eligible} e JOIN "
                           f"(SELECT key, min(quality_confidence) c FROM {preds} WHERE quality_confidence IS NOT "
                           f"NULL GROUP BY key) p USING (key) ORDER BY p.c, e.h, e.key LIMIT {n // 2}")
        picked += rows
        n_uncertain = len(rows)
        if rows:
            con.executemany("INSERT INTO taken VALUES (?)", [(r["key"],) for r in rows])

    picked += _dicts(con, f"SELECT * EXCLUDE (r) FROM (SELECT *, row_number() OVER (PARTITION BY stratum "
                          f"ORDER BY h, key) r FROM {eligible}) ORDER BY r, md5(stratum || ':' || {int(seed)}), "
                          f"stratum LIMIT {n - len(picked)}")
    if not picked:
        raise ExportError(f"no rows left to draw in {store.url()}: all {len(taken)} kept keys are in {gdir / BATCH}")

    images = part_images(store, [(r["filename"], r["file_row_number"]) for r in picked])
    decode = DecodeConfig()
    for r in picked:
        r["image"] = _grading_jpeg(images.get((r["filename"], r["file_row_number"])), r["key"], decode)
    table = _batch_table(picked, strata_cols, round_no)
    batch = table if previous is None else pa.concat_tables([previous, table], promote_options="permissive")
    _write_parquet_atomic(gdir / BATCH, batch)

    ls_dir = gdir / LABEL_STUDIO
    tasks = label_studio_tasks(table)
    text = json.dumps(tasks, ensure_ascii=False)
    _write_atomic(ls_dir / f"tasks.round{round_no}.json", text.encode())
    _write_atomic(ls_dir / "tasks.json", text.encode())
    _write_atomic(ls_dir / "config.xml", label_studio_config().encode())

    strata = sorted({r["stratum"] for r in picked})
    meta = {"shards": store.url(), "n": n, "drawn": len(picked), "seed": seed, "round": round_no,
            "strata_columns": strata_cols, "strata": {s: sum(r["stratum"] == s for r in picked) for s in strata},
            "uncertain": uncertain, "uncertain_rows": n_uncertain, "batch_rows": batch.num_rows,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    rounds = _read_meta(gdir).get("rounds", [])
    _write_atomic(gdir / EXPORT_META, json.dumps({**meta, "rounds": [*rounds, meta]}, indent=1).encode())
    return {**meta, "keys": [r["key"] for r in picked]}


# -- pieces ----------------------------------------------------------------------------------------


def _dicts(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cur = con.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _caption_source(con: duckdb.DuckDBPyConnection, store: Any) -> tuple[str, str]:
    """The caption graders see: the row's own caption, else the machine caption of the first caption set
    (tasks/sidecar.py) that has one, joined by key."""
    from tasks.sidecar import PART_MANIFEST

    for name in caption_sets(store):
        files = [store.url(json.loads(store.read_bytes(e.rel))["file"])
                 for e in store.list(f"{name}/{PART_MANIFEST}", ".json")]
        if not files:
            continue
        side = "read_parquet([" + ", ".join(map(_literal, files)) + "], union_by_name=true)"
        have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {side}").fetchall()}
        if "recaption_en" in have:
            return ("coalesce(s.caption, c.recaption_en)",
                    f"LEFT JOIN (SELECT key, any_value(recaption_en) recaption_en FROM {side} GROUP BY key) c "
                    "ON c.key = s.key")
    return "s.caption", ""


def _predictions_source(con: duckdb.DuckDBPyConnection, uncertain: str) -> str:
    """``read_parquet`` over a predictions file, glob or folder of parts; its two columns checked."""
    path = Path(uncertain)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
        if not files:
            raise ExportError(f"{uncertain}: no Parquet files in this folder")
        src = "read_parquet([" + ", ".join(map(_literal, files)) + "], union_by_name=true)"
    elif "*" in uncertain or path.is_file() or "://" in uncertain:
        src = f"read_parquet({_literal(uncertain)}, union_by_name=true)"
    else:
        raise ExportError(f"{uncertain}: no such predictions file")
    try:
        have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    except duckdb.Error as exc:
        raise ExportError(f"{uncertain}: not readable as Parquet ({exc})") from exc
    missing = {"key", "quality_confidence"} - have
    if missing:
        raise ExportError(f"{uncertain}: the predictions lack the column(s) {', '.join(sorted(missing))}")
    return f"(SELECT key, quality_confidence FROM {src})"


def _grading_jpeg(data: bytes | str | None, key: str, decode: DecodeConfig) -> bytes:
    """The image as graders see it: a JPEG, long side <= GRADE_SIDE, decoded with curation's limits. Bytes
    that will not decode are kept as they are (the page then shows that the image does not load)."""
    from tasks.decode import ImageSample

    if not isinstance(data, bytes | bytearray):
        log.warning("%s: no image bytes (%s)", key, data)
        return b""
    try:
        sample = ImageSample(bytes(data), max_pixels=decode.max_pixels, max_file_bytes=decode.max_file_bytes,
                             decode_side=GRADE_SIDE)
        img = sample.pixels().copy()
        img.thumbnail((GRADE_SIDE, GRADE_SIDE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
        return buf.getvalue()
    except Exception as exc:  # DecodeError, or anything Pillow raises on odd input
        log.warning("%s: image does not decode (%s); kept as it is", key, exc)
        return bytes(data)


def _batch_table(rows: list[dict[str, Any]], strata_cols: list[str], round_no: int) -> pa.Table:
    fields = [pa.field("key", pa.string()), pa.field("image", pa.binary()), pa.field("caption", pa.string()),
              pa.field("stratum", pa.string()), pa.field("round", pa.int32())]
    fields += [pa.field(c, pa.float64()) for c in strata_cols]
    cols = {"key": [r["key"] for r in rows], "image": [r["image"] for r in rows],
            "caption": [r["caption"] for r in rows], "stratum": [r["stratum"] for r in rows],
            "round": [round_no] * len(rows)}
    cols.update({c: [None if r.get(c) is None else float(r[c]) for r in rows] for c in strata_cols})
    return pa.Table.from_pydict(cols, schema=pa.schema(fields))


def _read_batch(gdir: Path) -> pa.Table | None:
    path = gdir / BATCH
    return pq.read_table(path) if path.exists() else None


def _read_meta(gdir: Path) -> dict[str, Any]:
    path = gdir / EXPORT_META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _write_parquet_atomic(path: Path, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", row_group_size=BATCH_ROW_GROUP)
    _write_atomic(path, buf.getvalue().to_pybytes())


# -- Label Studio ----------------------------------------------------------------------------------


def label_studio_tasks(table: pa.Table) -> list[dict[str, Any]]:
    """A Label Studio JSON import: one task per row, the image inline as a data: URI."""
    tasks = []
    for key, image, caption, stratum, round_no in zip(*(table.column(c).to_pylist() for c in
                                                       ("key", "image", "caption", "stratum", "round")), strict=True):
        uri = "data:image/jpeg;base64," + base64.b64encode(image or b"").decode("ascii")
        tasks.append({"data": {"image": uri, "key": key, "caption": caption or "", "stratum": stratum,
                               "round": round_no}})
    return tasks


def label_studio_config() -> str:
    """The labeling config: the image, its caption, the five levels described, and a 1-5 rating
    ``quality`` (the number is the level). Checked to be well-formed XML."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image", maxWidth="768px")
    ET.SubElement(view, "Header", value="Caption", size="5")
    ET.SubElement(view, "Text", name="caption", value="$caption")
    ET.SubElement(view, "Header", value="Grade the image: how many stars = which level", size="5")
    levels = ET.SubElement(view, "View", style="font-size: 90%")
    for grade, (name, description) in LEVELS.items():
        ET.SubElement(levels, "Header", name=f"level{grade}", value=f"{grade}: {name} - {description}", size="6")
    ET.SubElement(view, "Rating", name="quality", toName="image", maxRating="5", icon="star", size="large",
                  required="true")
    ET.indent(view)
    text = ET.tostring(view, encoding="unicode")
    ET.fromstring(text)  # well-formed, or this raises
    return text + "\n"
