"""``t2i grade import``: every vote, from the built-in page (GDIR/votes.sqlite) and from Label Studio's JSON
exports, into one grades table (GDIR/grades.parquet, ``GRADES_SCHEMA``: one row per vote).

A Label Studio export is the standard "JSON" export: a list of tasks, each with ``data`` (our ``key``),
its ``project`` and ``annotations`` (``result``: a rating named ``quality``; ``completed_by``: the
annotator, a user id, as the UI's Export button gives it, or ``{"id", "email", ...}`` in an export
snapshot made with ``only_id: false``). Cancelled (skipped) annotations and annotations without a
quality rating are left out.

Graders. A Label Studio user id is unique only within its server, so an id alone names nobody:

* ``labelstudio:<email>`` whenever the email can be learned: from the export itself, from the server
  (``--labelstudio-url`` with its token: ``GET /api/users/``) or from a users file (that answer saved);
  a person is one grader wherever they graded;
* else ``labelstudio:<server>/project-<project>/user-<id>``, the server named by its URL or by
  ``--labelstudio-server NAME`` (an annotation without an annotator: ``.../annotation-<id>``);
* else the export is refused, naming the ids and what to pass: ids are never turned into names silently.

One vote is kept per (key, grader, origin), the latest: an image re-graded, overlapping exports of a
project, or one person's votes from two projects. Two exports said to come from one server must agree
on its task and annotation ids (a task id holding another task, an annotation id another annotation, is two
servers under one name), and an export checked against a server by URL must be that server's. Page
graders keep the page's names (which cannot start with ``labelstudio:``).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.grading import BATCH, GRADES, GRADES_SCHEMA, LEVELS, VOTES_DB
from tasks.grading.votes import LABEL_STUDIO_GRADERS
from tasks.storage import LocalStore

if TYPE_CHECKING:
    from tasks.grading.labelstudio import LabelStudio

log = logging.getLogger(__name__)

RATING = "quality"  # the Rating's name in GDIR/labelstudio/config.xml
SHOWN = 5  # keys or task ids named in an error
SOURCE_OPTIONS = ("--labelstudio-url URL (with LABEL_STUDIO_API_KEY set, graders are named by email), "
                  "--labelstudio-users USERS.json (GET /api/users/ of that server, saved) or "
                  "--labelstudio-server NAME (graders named labelstudio:NAME/project-P/user-ID)")


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


@dataclass(frozen=True)
class LabelStudioSource:
    """What the importer is told about where an export came from: enough to name its graders.

    ``server``: the server's name (``server_name(url)`` or a name given); ``users``: user id -> email;
    ``client``: the server itself, to check an export is its own."""

    server: str | None = None
    users: Mapping[int, str] = field(default_factory=dict)
    client: LabelStudio | None = None


def _email(value: Any) -> str | None:
    """An email, lower-cased; None for anything else (a removed member's listed email reads "Deleted")."""
    if isinstance(value, str) and "@" in value.strip(" @"):
        return value.strip().lower()
    return None


def read_users(path: str | Path) -> dict[int, str]:
    """A users file: what ``GET /api/users/`` answers (a list of ``{"id", "email", ...}``) or ``{id: email}``."""
    try:
        body = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise GradeImportError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GradeImportError(f"{Path(path).name} is not JSON ({exc})") from None
    pairs = body.items() if isinstance(body, dict) else \
        [(u.get("id"), u.get("email")) for u in body if isinstance(u, dict)] if isinstance(body, list) else []
    users = {}
    for uid, email in pairs:
        try:
            users[int(uid)] = email
        except (TypeError, ValueError):
            raise GradeImportError(f"{Path(path).name}: user id {uid!r} is not a number") from None
    if not users:
        raise GradeImportError(f"{Path(path).name} names no users: save what GET /api/users/ answers "
                               '(a list of {"id", "email"}) or write {"<id>": "<email>"}')
    return users


def labelstudio_source(*, url: str | None = None, token: str | None = None, server: str | None = None,
                       users: str | Path | None = None) -> LabelStudioSource:
    """The source the options describe: ``url`` names the server (``server`` instead, where given) and,
    with ``token``, lists its users and checks each export is its own; ``users`` is a users file (its
    emails win over the server's)."""
    import requests

    from tasks.grading.labelstudio import LabelStudio, LabelStudioError, server_name

    if server is not None and (not server or any(c.isspace() for c in server)):
        raise GradeImportError(f"--labelstudio-server {server!r}: a name without spaces, e.g. ls.example.com")
    try:
        name = server or (server_name(url) if url else None)
    except ValueError as exc:
        raise GradeImportError(str(exc)) from None
    emails: dict[int, str] = {}
    client = None
    if url and token:
        client = LabelStudio(url, token)
        try:
            emails.update(client.users())
        except (LabelStudioError, requests.RequestException) as exc:
            raise GradeImportError(f"could not list the users of {url}: {exc}") from None
    if users is not None:
        emails.update(read_users(users))
    return LabelStudioSource(server=name, users=emails, client=client)


def _grader(ann: dict, task: dict, source: LabelStudioSource) -> str | None:
    """The annotator's name (see the module's text), None when only a bare id is known."""
    who = ann.get("completed_by")
    uid, email = (who.get("id"), who.get("email")) if isinstance(who, dict) else (who, None)
    email = _email(email) or _email(source.users.get(uid))
    if email:
        return LABEL_STUDIO_GRADERS + email
    if source.server is None:
        return None
    project = ann.get("project", task.get("project"))
    name = f"user-{uid}" if uid is not None else f"annotation-{ann.get('id')}"
    return f"{LABEL_STUDIO_GRADERS}{source.server}/project-{project}/{name}"


def _task(task: dict) -> str:
    """A task as its server knows it: project, key and creation time (to the microsecond), which two
    servers do not share even where both numbered the same tasks alike."""
    return f"key {task.get('data', {}).get('key')!r} of project {task.get('project')}, created {task.get('created_at')}"


def _check_server(name: str, tasks: list[dict], source: LabelStudioSource) -> None:
    """The export is the server's own: the first task of each of its projects is there, the same task."""
    from tasks.grading.labelstudio import LabelStudioError

    firsts = {t.get("project"): t for t in reversed(tasks)}
    for task in firsts.values():
        try:
            there = _task(source.client.task(task.get("id")))
        except LabelStudioError as exc:
            if exc.status not in (403, 404):
                raise GradeImportError(f"could not check {name} against {source.client.url}: {exc}") from None
            there = "not there"
        if there != _task(task):
            raise GradeImportError(f"{name} is not an export of {source.client.url}: its task {task.get('id')} "
                                   f"({_task(task)}) is {'' if there == 'not there' else 'there '}{there}; give "
                                   "each export its own server's --labelstudio-url")


def _same_server(name: str, tasks: list[dict], server: str, seen: dict[tuple, tuple[str, Any]]) -> None:
    """Exports said to come from one server agree on its ids. Task and annotation ids are the server's
    own, so a task id holding another task, or an annotation id another annotation (``unique_id``, else
    ``created_at``), means two servers under one name, whose user ids would name different people alike."""
    def same(kind: str, ident: Any, value: Any) -> None:
        first, was = seen.setdefault((server, kind, ident), (name, value))
        if ident is not None and was != value:
            raise GradeImportError(f"{first} and {name} are both said to come from Label Studio server {server!r}, "
                                   f"but its {kind} {ident} is a different {kind} in each: they are two servers' "
                                   f"exports, whose user ids name different people; say which server each came "
                                   f"from: {SOURCE_OPTIONS}, before its exports")

    for task in tasks:
        same("task", task.get("id"), _task(task))
        for ann in task["annotations"] or ():
            if isinstance(ann, dict):
                same("annotation", ann.get("id"), ann.get("unique_id") or ann.get("created_at"))


def read_labelstudio_export(path: str | Path, keys: set[str], source: LabelStudioSource | None = None,
                            seen: dict[tuple, tuple[str, Any]] | None = None) -> list[dict]:
    """The votes in one Label Studio JSON export, checked against the batch's keys, its graders named
    with what ``source`` says of its server. ``seen``: shared by the exports of one import, to find two
    servers under one name."""
    name, source = Path(path).name, source or LabelStudioSource()
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
    if source.client is not None:
        _check_server(name, tasks, source)
    if source.server is not None:
        _same_server(name, tasks, source.server, {} if seen is None else seen)

    votes, names, unnamed, unrated, cancelled = [], set(), set(), 0, 0
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
            grader = _grader(ann, task, source)
            if grader is None:
                who = ann.get("completed_by")
                unnamed.add(str(who.get("id") if isinstance(who, dict) else who))
                continue
            where = f"{name}: task {task.get('id')} (key {task['data']['key']}), annotation {ann.get('id')} by {grader}"
            value = (ratings[-1].get("value") or {}).get("rating")
            votes.append({"key": task["data"]["key"], "grader": grader, "grade": _grade(value, where),
                          "time": _utc(ann.get("updated_at") or ann.get("created_at"), where),
                          "origin": "labelstudio"})
    if unnamed:
        ids = sorted(unnamed, key=lambda u: (len(u), u))
        raise GradeImportError(f"{name} names {len(ids)} grader{'s' * (len(ids) != 1)} by Label Studio user id only "
                               f"(ids {_listing(ids)}), and an id names a different person on another server: "
                               f"say which server it came from: {SOURCE_OPTIONS}")
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


def import_grades(gdir: str, labelstudio_exports: Sequence[str | Path | tuple[str | Path, LabelStudioSource]] = (),
                  *, votes_db: bool = True, source: LabelStudioSource | None = None) -> pa.Table:
    """Every vote of the workspace (GDIR/votes.sqlite when ``votes_db``, and each Label Studio export) as
    one grades table, written to GDIR/grades.parquet (whole or not at all) and returned.

    An export is a path, named by ``source`` (what is known of its server), or a ``(path, source)`` pair of
    its own. Raises :class:`GradeImportError` on an input it cannot take, before writing."""
    if isinstance(labelstudio_exports, str | Path):
        labelstudio_exports = [labelstudio_exports]
    keys = batch_keys(gdir)
    votes: list[dict] = []
    db = Path(gdir) / VOTES_DB
    if votes_db and db.is_file():
        votes += read_page_votes(db)
    seen: dict[tuple, tuple[str, Any]] = {}
    for export in labelstudio_exports:
        path, own = export if isinstance(export, tuple) else (export, source)
        votes += read_labelstudio_export(path, keys, own, seen)

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
