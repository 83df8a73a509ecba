"""The Label Studio round trip against a real Label Studio (tests/label_studio_server.py, from .venv-tools):
a grading workspace's tasks.json and config.xml into a project, ratings from two annotators through the API,
the JSON export back through ``import_grades`` together with the page's votes.sqlite; graders named by email
or by id under their server, never merged with a second server's users of the same ids; and the inputs it
must refuse (an export of another project, a rating outside 1-5, an empty export, bare ids from nowhere)."""

from __future__ import annotations

import copy
import datetime as dt
import io
import json
import re
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS
from PIL import Image

from tasks.grading import BATCH, GRADES, GRADES_SCHEMA, LABEL_STUDIO, VOTES_DB
from tasks.grading.export import label_studio_config, label_studio_tasks
from tasks.grading.importer import (
    GradeImportError,
    LabelStudioSource,
    grade_summary,
    import_grades,
    labelstudio_source,
    read_users,
)
from tasks.grading.labelstudio import LabelStudio, server_name
from tasks.grading.model import aggregate_votes
from tasks.grading.votes import VoteError, VoteStore, agreement

pytest_plugins = ["label_studio_server"]

KEYS = [f"g{i:03d}" for i in range(4)]
ADMIN = "labelstudio:grader@example.com"  # label_studio_server's admin, whose token the client uses
SECOND = "labelstudio:second@example.com"
# (annotator, key, rating) in the order submitted; the admin grades g003 twice (the later one counts),
# the second annotator skips it (a cancelled annotation: no vote)
SUBMITTED = [(ADMIN, "g000", 5), (ADMIN, "g001", 4), (ADMIN, "g002", 3), (ADMIN, "g003", 1),
             (SECOND, "g000", 4), (SECOND, "g001", 4), (SECOND, "g002", 2), (ADMIN, "g003", 2)]
PAGE_VOTES = [("g000", "ann", 5, "2026-01-02T03:04:05.678Z"), ("g002", "ann", 2, "2026-01-02T03:05:00.000Z"),
              ("g001", "bo", 3, "2026-01-02T04:00:00.000+00:00")]


def small_jpeg(path: Path) -> bytes:
    im = Image.open(path).convert("RGB")
    im.thumbnail((96, 96))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=80)
    return out.getvalue()


def make_workspace(gdir: Path, keys: list[str]) -> Path:
    """A grading workspace as ``t2i grade export`` leaves it: batch.parquet, labelstudio/tasks.json and
    config.xml (written with export.py's own Label Studio functions)."""
    batch = pa.table({"key": keys, "image": [small_jpeg(PHOTOS[i % len(PHOTOS)]) for i in range(len(keys))],
                      "caption": [f"photo {k}" for k in keys], "stratum": ["all"] * len(keys),
                      "round": pa.array([1] * len(keys), pa.int32())})
    (gdir / LABEL_STUDIO).mkdir(parents=True)
    pq.write_table(batch, gdir / BATCH)
    (gdir / LABEL_STUDIO / "tasks.json").write_text(json.dumps(label_studio_tasks(batch)))
    (gdir / LABEL_STUDIO / "config.xml").write_text(label_studio_config())
    return gdir


def write_page_votes(gdir: Path, votes) -> None:
    con = sqlite3.connect(gdir / VOTES_DB)
    con.execute("CREATE TABLE votes (key TEXT, grader TEXT, grade INTEGER, at TEXT, PRIMARY KEY (key, grader))")
    con.executemany("INSERT INTO votes VALUES (?, ?, ?, ?)", votes)
    con.commit()
    con.close()


def votes_of(table: pa.Table) -> set[tuple]:
    return {(r["key"], r["grader"], r["grade"], r["origin"]) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def graded(label_studio, tmp_path_factory):
    """A project made from the workspace, graded through the API by two annotators, and exported."""
    ls = label_studio.client()
    gdir = make_workspace(tmp_path_factory.mktemp("gdir"), KEYS)
    project = ls.create_grading_project(gdir, "t2i round trip")
    tasks = {t["data"]["key"]: t["id"] for t in ls.tasks(project)}
    assert sorted(tasks) == KEYS
    second = ls.create_user("second@example.com", username="second", first_name="Second")
    ids = {ADMIN: None, SECOND: second}
    for who, key, rating in SUBMITTED:
        ls.annotate(tasks[key], rating, completed_by=ids[who])
    ls.request("POST", f"/api/tasks/{tasks['g003']}/annotations/",  # the second annotator skips g003
               json={"result": [], "was_cancelled": True, "completed_by": second})
    write_page_votes(gdir, PAGE_VOTES)
    export = gdir / "export.json"
    ls.export(project, export)
    return ls, gdir, project, export


def test_round_trip(graded, label_studio):
    ls, gdir, project, export = graded
    tasks = json.loads(export.read_text())
    assert sorted(t["data"]["key"] for t in tasks) == KEYS
    assert any(a["was_cancelled"] for t in tasks for a in t["annotations"])  # the skip is in the export

    table = import_grades(str(gdir), [str(export)])
    latest = {(who, key): rating for who, key, rating in SUBMITTED}  # the later g003 grade wins
    expected = {(key, who, rating, "labelstudio") for (who, key), rating in latest.items()}
    expected |= {(key, grader, grade, "page") for key, grader, grade, _ in PAGE_VOTES}
    assert votes_of(table) == expected
    assert table.schema == GRADES_SCHEMA
    on_disk = pq.read_table(gdir / GRADES)
    assert on_disk.schema == GRADES_SCHEMA and on_disk.equals(table)
    assert not list(gdir.glob(".*tmp*"))

    times = dict(zip(zip(table["key"].to_pylist(), table["grader"].to_pylist(), strict=True),
                     table["time"].to_pylist(), strict=True))
    assert times[("g000", "ann")] == dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    assert all(now - dt.timedelta(minutes=10) < times[(k, g)] <= now for k, g in times if g.startswith("labelstudio:"))
    assert times[("g003", ADMIN)] > min(times[(k, ADMIN)] for k in KEYS[:3])

    summary = grade_summary(table)
    assert summary == {"votes": 10, "images": 4, "levels": {1: 0, 2: 3, 3: 2, 4: 3, 5: 2},
                       "graders": {"ann": 2, "bo": 1, ADMIN: 4, SECOND: 3},
                       "origins": {"labelstudio": 7, "page": 3}}

    # the UI's plain export names annotators by id only: refused with no word on its server; named by id
    # under the server's name given, or by email from the server (URL and token) or its users file
    plain = gdir / "plain.json"
    ls.export(project, plain, emails=False)
    assert {type(a["completed_by"]) for t in json.loads(plain.read_text()) for a in t["annotations"]} == {int}
    in_ls = {v for v in expected if v[3] == "labelstudio"}
    with pytest.raises(GradeImportError, match=r"^plain\.json names 2 graders by Label Studio user id only "
                                               r"\(ids 1, 2\), .*--labelstudio-url URL .*--labelstudio-users "
                                               r"USERS\.json .*--labelstudio-server NAME"):
        import_grades(str(gdir), [str(plain)])
    ids = {f"labelstudio:lab/project-{project}/user-{i}": f"labelstudio:{e}" for i, e in ls.users().items()}
    by_id = import_grades(str(gdir), [str(plain)], votes_db=False, source=LabelStudioSource(server="lab"))
    assert {(k, ids[g], r, o) for k, g, r, o in votes_of(by_id)} == in_ls
    by_url = labelstudio_source(url=label_studio.url + "/", token=label_studio.token)
    assert by_url.server == server_name(label_studio.url) == label_studio.url.removeprefix("http://")
    assert votes_of(import_grades(str(gdir), [str(plain)], votes_db=False, source=by_url)) == in_ls
    users = gdir / "users.json"  # GET /api/users/ saved
    users.write_text(json.dumps(ls.request("GET", "/api/users/").json()))
    assert votes_of(import_grades(str(gdir), [str(plain)], votes_db=False, source=labelstudio_source(users=users))) \
        == in_ls
    # the same export twice, or both kinds together: no vote counted twice
    assert votes_of(import_grades(str(gdir), [str(export), (str(plain), by_url), str(export)])) == expected
    # page votes only
    assert votes_of(import_grades(str(gdir))) == {v for v in expected if v[3] == "page"}


def test_export_of_another_project(graded, tmp_path):
    ls, gdir, _, _ = graded
    other = make_workspace(tmp_path / "other", ["o000", "o001", "o002"])
    project = ls.create_grading_project(other, "another project")
    for task in ls.tasks(project):
        ls.annotate(task["id"], 3)
    export = tmp_path / "other.json"
    ls.export(project, export)
    before = (gdir / GRADES).read_bytes() if (gdir / GRADES).exists() else None
    with pytest.raises(GradeImportError, match=r"^3 of 3 tasks in other\.json have keys not in this batch: "
                                               r"o000, o001, o002; is it an export of another project\?$"):
        import_grades(str(gdir), [str(export)])
    after = (gdir / GRADES).read_bytes() if (gdir / GRADES).exists() else None
    assert after == before  # nothing written


def test_empty_export(graded, tmp_path):
    ls, gdir, _, _ = graded
    empty = make_workspace(tmp_path / "empty", KEYS[:1])  # this batch, nobody graded yet
    project = ls.create_grading_project(empty, "nobody graded")
    export = tmp_path / "empty.json"
    assert ls.export(project, export, emails=False) == []  # the plain export holds annotated tasks only
    with pytest.raises(GradeImportError, match=r"^empty\.json is empty: no tasks, nothing to import"):
        import_grades(str(gdir), [str(export)])
    assert len(ls.export(project, export)) == 1  # a snapshot holds every task
    with pytest.raises(GradeImportError, match=r"^empty\.json has 1 task and no annotations: nothing to import"):
        import_grades(str(gdir), [str(export)])
    ls.request("POST", f"/api/tasks/{ls.tasks(project)[0]['id']}/annotations/", json={"result": [],
                                                                                   "was_cancelled": True})
    ls.export(project, export)
    with pytest.raises(GradeImportError, match=r"^empty\.json has 1 task and no annotations but cancelled"):
        import_grades(str(gdir), [str(export)])
    export.write_bytes(b"")
    with pytest.raises(GradeImportError, match=r"^empty\.json is empty"):
        import_grades(str(gdir), [str(export)])


def edited(export: Path, out: Path, edit) -> str:
    tasks = copy.deepcopy(json.loads(export.read_text()))
    edit(tasks)
    out.write_text(json.dumps(tasks))
    return str(out)


def test_edited_exports(graded, tmp_path):
    _, gdir, _, export = graded
    tasks = json.loads(export.read_text())
    g001 = next(t for t in tasks if t["data"]["key"] == "g001")

    def rating_7(ts):
        next(t for t in ts if t["id"] == g001["id"])["annotations"][0]["result"][0]["value"]["rating"] = 7

    with pytest.raises(GradeImportError, match=rf"seven\.json: task {g001['id']} \(key g001\), annotation \d+ "
                                               r"by labelstudio:\S+: rating 7 is not a level from 1 to 5"):
        import_grades(str(gdir), [edited(export, tmp_path / "seven.json", rating_7)])

    def no_keys(ts):
        for t in ts:
            del t["data"]["key"]

    with pytest.raises(GradeImportError, match=r"^4 of 4 tasks in nokey\.json have no 'key' in their data "
                                               r"\(task ids .*\); is it an export of another project\?$"):
        import_grades(str(gdir), [edited(export, tmp_path / "nokey.json", no_keys)])

    def other_rating(ts):
        for t in ts:
            for a in t["annotations"]:
                for r in a["result"]:
                    r["from_name"] = "stars"

    with pytest.raises(GradeImportError, match=r"no rating named 'quality' \(it has stars\); "
                                               r"is it an export of another project\?"):
        import_grades(str(gdir), [edited(export, tmp_path / "stars.json", other_rating)])

    min_export = tmp_path / "min.json"
    min_export.write_text(json.dumps([{"key": "g000", "quality": 4}]))
    with pytest.raises(GradeImportError, match=r"without 'annotations': export as JSON"):
        import_grades(str(gdir), [str(min_export)])
    with pytest.raises(GradeImportError, match=r"missing\.json: no such file"):
        import_grades(str(gdir), [str(tmp_path / "missing.json")])


def test_client_errors(label_studio):
    with pytest.raises(RuntimeError, match=r"HTTP 401"):
        LabelStudio(label_studio.url, "not-the-token").whoami()
    with pytest.raises(RuntimeError, match=r"POST /api/projects/ -> HTTP 400: .*title"):
        label_studio.client().create_project("x", "<View/>")  # a title needs 3 characters


def test_page_votes_without_label_studio(tmp_path):
    gdir = make_workspace(tmp_path / "gdir", KEYS)
    assert import_grades(str(gdir)).num_rows == 0  # no votes yet: an empty grades.parquet
    assert pq.read_table(gdir / GRADES).schema == GRADES_SCHEMA
    write_page_votes(gdir, [*PAGE_VOTES, ("g003", "cy", 9, "2026-01-02T05:00:00Z")])
    with pytest.raises(GradeImportError, match=r"votes\.sqlite: g003 by cy: rating 9 is not a level from 1 to 5"):
        import_grades(str(gdir))
    assert import_grades(str(gdir), votes_db=False).num_rows == 0
    with pytest.raises(GradeImportError, match=r"batch\.parquet not found: is .* a grading workspace"):
        import_grades(str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def other_label_studio(tmp_path_factory):
    """A second server: its user ids are numbered like the first's, for other people."""
    from label_studio_server import LabelStudioServer

    with LabelStudioServer.start(base_dir=tmp_path_factory.mktemp("other-label-studio")) as server:
        yield server


def test_user_ids_of_two_servers_never_merge(graded, label_studio, other_label_studio, tmp_path):
    ls_a, gdir, project_a, _ = graded
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ls_a.export(project_a, a, emails=False)  # as the UI's Export button gives them: bare user ids
    ls_b = other_label_studio.client()
    first_a = min(t["id"] for t in json.loads(a.read_text()))
    if first_a > 1:  # B numbers its tasks from 1: fill up to A's first, so that the two servers' ids collide
        filler = ls_b.create_project("filler", '<View><Text name="t" value="$t"/></View>')
        ls_b.import_tasks(filler, [{"data": {"t": "-"}}] * (first_a - 1))
    project_b = ls_b.create_grading_project(gdir, "the same batch elsewhere")
    third = ls_b.create_user("third@example.com", username="third")
    second = {e: i for i, e in ls_a.users().items()}["second@example.com"]
    assert third == second  # user 2 on both servers: two people
    tasks_b = {t["data"]["key"]: t["id"] for t in ls_b.tasks(project_b)}
    ls_b.annotate(tasks_b["g000"], 1, completed_by=third)
    ls_b.annotate(tasks_b["g001"], 5, completed_by=third)
    ls_b.export(project_b, b, emails=False)

    named = import_grades(str(gdir), [(a, LabelStudioSource(server="lab-a")), (b, LabelStudioSource(server="lab-b"))],
                          votes_db=False)
    assert named.num_rows == 7 + 2
    on_g000 = {(r["grader"], r["grade"]) for r in named.to_pylist() if r["key"] == "g000"}
    assert {(f"labelstudio:lab-a/project-{project_a}/user-{second}", 4),
            (f"labelstudio:lab-b/project-{project_b}/user-{third}", 1)} <= on_g000

    # by email: server A by its URL and token, B by its users file
    users_b = tmp_path / "users-b.json"
    users_b.write_text(json.dumps(ls_b.request("GET", "/api/users/").json()))
    a_by_url = labelstudio_source(url=label_studio.url, token=label_studio.token)
    by_email = votes_of(import_grades(str(gdir), [(a, a_by_url), (b, labelstudio_source(users=users_b))],
                                      votes_db=False))
    assert {("g000", SECOND, 4, "labelstudio"), ("g000", "labelstudio:third@example.com", 1, "labelstudio"),
            ("g001", SECOND, 4, "labelstudio"), ("g001", "labelstudio:third@example.com", 5, "labelstudio")} <= by_email
    assert len(by_email) == 9

    before = (gdir / GRADES).read_bytes()
    # one name for both servers: their ids disagree on what task or annotation N is
    with pytest.raises(GradeImportError, match=rf"^a\.json and b\.json are both said to come from Label Studio "
                                               rf"server 'lab', but its task {first_a} is a different task in each"):
        import_grades(str(gdir), [a, b], source=LabelStudioSource(server="lab"))
    # B's export checked against A's server: not A's
    with pytest.raises(GradeImportError, match=rf"^b\.json is not an export of {re.escape(label_studio.url)}: "
                                               r"its task \d+ \(key 'g00\d' of project \d+, created .*\) is "):
        import_grades(str(gdir), [(b, a_by_url)])
    assert (gdir / GRADES).read_bytes() == before  # nothing written


def test_sources_bad_input(tmp_path):
    assert server_name("HTTP://user:secret@LS.Example.com:8080/label/") == "ls.example.com:8080/label"
    assert server_name("ls.example.com") == "ls.example.com"
    with pytest.raises(GradeImportError, match=r"'http://' is not a Label Studio URL"):
        labelstudio_source(url="http://")
    for bad in ("", "two words"):
        with pytest.raises(GradeImportError, match=r"--labelstudio-server .*: a name without spaces"):
            labelstudio_source(server=bad)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"1": "Ann@Example.com", "2": "Deleted"}))
    assert read_users(users) == {1: "Ann@Example.com", 2: "Deleted"}
    for body, message in [("[]", "names no users"), ('{"x": "a@b.c"}', "user id 'x' is not a number"),
                          ("not json", "is not JSON")]:
        users.write_text(body)
        with pytest.raises(GradeImportError, match=message):
            read_users(users)
    with pytest.raises(GradeImportError, match=r"nowhere\.json: no such file"):
        read_users(tmp_path / "nowhere.json")


def test_page_names_and_old_grades_still_load(tmp_path):
    gdir = make_workspace(tmp_path / "gdir", KEYS)
    # a page grader cannot take a Label Studio grader's name (the agreement would count the two as one) ...
    store = VoteStore(gdir)
    with pytest.raises(VoteError, match=r"names starting with 'labelstudio:' are Label Studio's graders"):
        store.record("g000", " LabelStudio:ann@example.com", 3)
    # ... but a store that holds one still reads, as does a grades table with the old bare-id names
    with store.connect() as con:
        con.execute("INSERT INTO votes VALUES ('g000', 'labelstudio:1', 4, '2026-01-02T03:04:05Z')")
    assert store.votes() == [{"key": "g000", "grader": "labelstudio:1", "grade": 4, "at": "2026-01-02T03:04:05Z"}]
    assert votes_of(import_grades(str(gdir))) == {("g000", "labelstudio:1", 4, "page")}
    old = pa.Table.from_pylist([{"key": k, "grader": f"labelstudio:{g}", "grade": v, "origin": "labelstudio",
                                 "time": dt.datetime(2026, 1, 2, tzinfo=dt.UTC)}
                                for k, g, v in [("g000", 1, 4), ("g000", 2, 5), ("g001", 1, 2), ("g001", 2, 2)]],
                               schema=GRADES_SCHEMA)
    pq.write_table(old, tmp_path / "old-grades.parquet")
    table = pq.read_table(tmp_path / "old-grades.parquet")
    assert aggregate_votes(table).to_pylist() == [{"key": "g000", "level": 4, "votes": 2},
                                                  {"key": "g001", "level": 2, "votes": 2}]
    (pair,) = agreement(table.to_pylist())["pairs"]
    assert (pair["a"], pair["b"], pair["n"], pair["exact"]) == ("labelstudio:1", "labelstudio:2", 2, 0.5)
