"""``t2i grade import``: every vote, from the built-in page (GDIR/votes.sqlite) and from Label Studio's JSON
exports, into one grades table (GDIR/grades.parquet, ``GRADES_SCHEMA``: one row per vote).

A Label Studio export is the standard "JSON" export: a list of tasks, each with ``data`` (our ``key``) and
``annotations`` (``result``: a rating named ``quality``; ``completed_by``: the annotator, a user id or, in an
export snapshot, ``{"id", "email", ...}``). Graders are named ``labelstudio:<email>`` (``labelstudio:<id>``
when the export carries only the id and ``annotators`` does not name it); page graders keep the page's
name. Cancelled (skipped) annotations and annotations without a quality rating are left out. The same
vote twice (key, grader, origin: an image re-graded, or overlapping exports) keeps the latest.

Exports of another project are refused before anything is written: tasks without a ``key``, keys that are
not in GDIR/batch.parquet, no rating named ``quality`` at all.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.grading import BATCH, GRADES, GRADES_SCHEMA, LEVELS, VOTES_DB
from tasks.storage import LocalStore

log = logging.getLogger(__name__)

RATING = "quality"  # the Rating's name in GDIR/labelstudio/config.xml
SHOWN = 5  # keys or task ids named in an error


class GradeImportError(ValueError):
    """An input that cannot be imported; the message says which file and what is wrong."""


def _listing(items: Sequence[Any]) -> str:
    head = ", ".join(map(str, items[:SHOWN]))
    return head + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def _utc(text: Any, where: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(str(text))
    except ValueError:
        raise GradeImportError(f"{where}: time {text!r} is not an ISO time") from None
    return (t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)).replace(
        microsecond=t.microsecond // 1000 * 1000)


def _grade(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= len(LEVELS) \
            or value != int(value):
        raise GradeImportError(f"{where}: rating {value!r} is not a level from 1 to {len(LEVELS)}")
    return int(value)


def batch_keys(gdir: str | Path) -> set[str]:
    path = Path(gdir) / BATCH
    if not path.is_file():
        raise GradeImportError(f"{path} not found: is {gdir} a grading workspace (t2i grade export --out)?")
    return set(pq.read_table(path, columns=["key"]).column("key").to_pylist())


def _grader(completed_by: Any, annotators: Mapping[int, str]) -> str:
    if isinstance(completed_by, dict):  # an export snapshot with completed_by expanded
        who = completed_by.get("email") or annotators.get(completed_by.get("id")) or completed_by.get("id")
    else:
        who = annotators.get(completed_by, completed_by)
    if who is None:
        who = "unknown"
    return f"labelstudio:{who}"


def read_labelstudio_export(path: str | Path, keys: set[str],
                            annotators: Mapping[int, str] | None = None) -> list[dict]:
    """The votes in one Label Studio JSON export, checked against the batch's keys."""
    name, annotators = Path(path).name, annotators or {}
    try:
        tasks = json.loads(Path(path).read_bytes() or b"null")
    except FileNotFoundError:
        raise GradeImportError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradeImportError(f"{name} is not JSON ({exc}): export the project as JSON") from None
    if tasks is None or tasks == []:
        raise GradeImportError(f"{name} is empty: no tasks, nothing to import (Label Studio exports only annotated "
                               "tasks: has anyone graded yet?)")
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise GradeImportError(f"{name} is not Label Studio's JSON export (a list of tasks)")
    if any("annotations" not in t for t in tasks):
        raise GradeImportError(f"{name} has tasks without 'annotations': export as JSON (not JSON_MIN or CSV)")

    no_key = [t.get("id", i) for i, t in enumerate(tasks) if not isinstance(t.get("data"), dict)
              or not isinstance(t["data"].get("key"), str)]
    if no_key:
        raise GradeImportError(f"{len(no_key)} of {len(tasks)} tasks in {name} have no 'key' in their data "
                               f"(task ids {_listing(no_key)}); is it an export of another project?")
    foreign = sorted({t["data"]["key"] for t in tasks} - keys)
    if foreign:
        n = sum(t["data"]["key"] in foreign for t in tasks)
        raise GradeImportError(f"{n} of {len(tasks)} tasks in {name} have keys not in this batch: "
                               f"{_listing(foreign)}; is it an export of another project?")

    votes, names, unrated, cancelled = [], set(), 0, 0
    for task in tasks:
        for ann in task["annotations"] or ():
            if not isinstance(ann, dict):
                continue
            if ann.get("was_cancelled"):
                cancelled += 1
                continue
            results = [r for r in ann.get("result") or () if isinstance(r, dict)]
            names.update(r.get("from_name") for r in results)
            ratings = [r for r in results if r.get("from_name") == RATING and r.get("type") == "rating"]
            if not ratings:
                unrated += 1
                continue
            grader = _grader(ann.get("completed_by"), annotators)
            where = f"{name}: task {task.get('id')} (key {task['data']['key']}), annotation {ann.get('id')} by {grader}"
            value = (ratings[-1].get("value") or {}).get("rating")
            votes.append({"key": task["data"]["key"], "grader": grader, "grade": _grade(value, where),
                          "time": _utc(ann.get("updated_at") or ann.get("created_at"), where),
                          "origin": "labelstudio"})
    if not votes and not unrated:
        what = "annotations but cancelled (skipped) ones" if cancelled else "annotations"
        raise GradeImportError(f"{name} has {len(tasks)} task{'s' * (len(tasks) != 1)} and no {what}: "
                               "nothing to import (has anyone graded yet?)")
    if not votes:
        raise GradeImportError(f"{name} has {unrated} annotations but no rating named {RATING!r} (it has "
                               f"{_listing(sorted(map(str, names - {None}))) or 'none'}); is it an export "
                               "of another project?")
    if unrated or cancelled:
        log.warning("%s: %d votes; left out %d cancelled annotations and %d without a %r rating",
                    name, len(votes), cancelled, unrated, RATING)
    return votes


def read_page_votes(path: str | Path) -> list[dict]:
    """The built-in page's votes (``votes(key, grader, grade, at)``)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT key, grader, grade, at FROM votes").fetchall()
    except sqlite3.DatabaseError as exc:
        raise GradeImportError(f"{path}: {exc}") from None
    finally:
        con.close()
    name = Path(path).name
    return [{"key": key, "grader": grader, "grade": _grade(grade, f"{name}: {key} by {grader}"),
             "time": _utc(at, f"{name}: {key} by {grader}"), "origin": "page"} for key, grader, grade, at in rows]


def import_grades(gdir: str, labelstudio_exports: Sequence[str] = (), *, votes_db: bool = True,
                  annotators: Mapping[int, str] | None = None) -> pa.Table:
    """Every vote of the workspace (GDIR/votes.sqlite when ``votes_db``, and each Label Studio export) as
    one grades table, written to GDIR/grades.parquet (whole or not at all) and returned.

    ``annotators``: Label Studio user ids -> emails (``LabelStudio.users()``), for exports that name
    annotators by id only. Raises :class:`GradeImportError` on an input it cannot take, before writing."""
    if isinstance(labelstudio_exports, str | Path):
        labelstudio_exports = [labelstudio_exports]
    keys = batch_keys(gdir)
    votes: list[dict] = []
    db = Path(gdir) / VOTES_DB
    if votes_db and db.is_file():
        votes += read_page_votes(db)
    for export in labelstudio_exports:
        votes += read_labelstudio_export(export, keys, annotators)

    latest: dict[tuple[str, str, str], dict] = {}
    for v in votes:
        k = (v["key"], v["grader"], v["origin"])
        if k not in latest or v["time"] >= latest[k]["time"]:
            latest[k] = v
    rows = [latest[k] for k in sorted(latest)]
    table = pa.Table.from_pylist(rows, schema=GRADES_SCHEMA)
    LocalStore(gdir).write_parquet(GRADES, table, max(1, table.num_rows))
    return table


def grade_summary(table: pa.Table) -> dict:
    """votes, images graded, votes per level (every level, 0 included), votes per grader and per origin."""
    rows = table.select(["key", "grader", "grade", "origin"]).to_pylist()
    levels = Counter(r["grade"] for r in rows)
    return {"votes": len(rows), "images": len({r["key"] for r in rows}),
            "levels": {g: levels[g] for g in LEVELS},
            "graders": dict(sorted(Counter(r["grader"] for r in rows).items())),
            "origins": dict(sorted(Counter(r["origin"] for r in rows).items()))}
