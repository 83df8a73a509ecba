"""Five-level human grades: the sample export (strata, rounds, uncertain rows, Label Studio files), the
votes store and its agreement figures, and the built-in grading page in a real headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS
from PIL import Image

from schemas.config import CurateConfig
from tasks.grading import BATCH, EXPORT_META, GRADES_SCHEMA, LABEL_STUDIO, LEVELS, VOTES_DB
from tasks.grading.export import ExportError, export_sample, signal_columns
from tasks.grading.server import serve
from tasks.grading.votes import VoteError, VoteStore, agreement, krippendorff_alpha, weighted_kappa
from tasks.runner import run

CHROMIUM = "/usr/bin/chromium"
TOOLS_PYTHON = Path(__file__).parents[1] / ".venv-tools" / "bin" / "python"  # Label Studio, from make setup


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """A curated output of the test photos (12 kept rows, resolution and sharpness signals)."""
    root = tmp_path_factory.mktemp("curated")
    src = root / "src"
    src.mkdir()
    for p in PHOTOS:
        shutil.copy(p, src / p.name)
    out = root / "out"
    cfg = CurateConfig.model_validate({"signals": {"resolution": {}, "sharpness": {}}, "rules": {}})
    summary = run(src, out, cfg, use_ray=False)
    assert summary.kept == len(PHOTOS)
    return out


def batch(gdir: Path) -> pa.Table:
    return pq.read_table(gdir / BATCH)


# -- export ----------------------------------------------------------------------------------------


def test_export_stratified_over_sharpness_quartiles(curated, tmp_path):
    gdir = tmp_path / "g"
    meta = export_sample(str(curated), 8, str(gdir), seed=0)
    assert meta["round"] == 1 and meta["drawn"] == 8 and meta["strata_columns"] == ["sharpness"]
    assert meta["strata"] == {f"sharpness=q{q}": 2 for q in range(1, 5)}  # 12 rows: 3 a quartile, 2 drawn of each
    t = batch(gdir)
    assert t.column_names == ["key", "image", "caption", "stratum", "round", "sharpness"]
    assert t.column("key").to_pylist() == meta["keys"] and len(set(meta["keys"])) == 8
    assert set(t.column("round").to_pylist()) == {1}
    # the strata really are quartiles: every q1 row is below every q4 row
    rows = t.select(["stratum", "sharpness"]).to_pylist()
    q1 = [r["sharpness"] for r in rows if r["stratum"] == "sharpness=q1"]
    q4 = [r["sharpness"] for r in rows if r["stratum"] == "sharpness=q4"]
    assert max(q1) < min(q4)
    for data in t.column("image").to_pylist():
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and max(img.size) <= 768
    recorded = json.loads((gdir / EXPORT_META).read_text())
    assert {"shards", "n", "seed", "strata_columns", "round", "created"} <= recorded.keys()
    assert recorded["n"] == 8 and recorded["seed"] == 0 and recorded["shards"] == str(curated)


def test_export_is_deterministic_for_a_seed(curated, tmp_path):
    first = export_sample(str(curated), 6, str(tmp_path / "a"), seed=7)["keys"]
    again = export_sample(str(curated), 6, str(tmp_path / "b"), seed=7)["keys"]
    assert first == again
    assert batch(tmp_path / "a").column("image").to_pylist() == batch(tmp_path / "b").column("image").to_pylist()
    others = [export_sample(str(curated), 6, str(tmp_path / f"s{s}"), seed=s)["keys"] for s in (1, 2, 3)]
    assert any(o != first for o in others)


def test_later_rounds_draw_new_keys_and_append(curated, tmp_path):
    gdir = tmp_path / "g"
    one = export_sample(str(curated), 8, str(gdir), seed=0)
    two = export_sample(str(curated), 3, str(gdir), seed=0)
    assert two["round"] == 2 and len(two["keys"]) == 3 and not set(one["keys"]) & set(two["keys"])
    t = batch(gdir)
    assert t.num_rows == 11 and t.column("key").to_pylist() == one["keys"] + two["keys"]
    assert t.column("round").to_pylist() == [1] * 8 + [2] * 3
    assert len(json.loads((gdir / LABEL_STUDIO / "tasks.json").read_text())) == 3  # the round to import now
    assert len(json.loads((gdir / LABEL_STUDIO / "tasks.round1.json").read_text())) == 8
    assert [r["round"] for r in json.loads((gdir / EXPORT_META).read_text())["rounds"]] == [1, 2]
    three = export_sample(str(curated), 5, str(gdir), seed=0)  # one row left
    assert three["round"] == 3 and three["drawn"] == 1
    assert len(set(batch(gdir).column("key").to_pylist())) == len(PHOTOS)
    with pytest.raises(ExportError, match="no rows left"):
        export_sample(str(curated), 2, str(gdir), seed=0)
    assert not list(gdir.glob(".*tmp*")) and not list((gdir / LABEL_STUDIO).glob(".*tmp*"))


def test_uncertain_rows_fill_half_of_the_sample(curated, tmp_path):
    keys = [p.stem for p in PHOTOS]
    preds = tmp_path / "preds.parquet"
    # confidences: the two lowest of the output's keys are keys[5] and keys[9]; "gone" is not in the output;
    # an extra column of the model's is not read
    conf = {k: 0.9 - i * 0.01 for i, k in enumerate(keys)}
    conf[keys[5]], conf[keys[9]] = 0.11, 0.12
    pq.write_table(pa.table({"key": [*conf, "gone"], "quality_confidence": [*conf.values(), 0.01],
                             "quality_pred": [[1.0, 2.0]] * (len(conf) + 1)}), preds)
    meta = export_sample(str(curated), 4, str(tmp_path / "g"), seed=0, uncertain=str(preds))
    assert meta["uncertain_rows"] == 2 and meta["drawn"] == 4
    rows = batch(tmp_path / "g").select(["key", "stratum"]).to_pylist()
    assert [r["key"] for r in rows if r["stratum"] == "uncertain"] == [keys[5], keys[9]]
    assert all(r["stratum"].startswith("sharpness=") for r in rows if r["stratum"] != "uncertain")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a"], "confidence": [0.1]}), bad)
    with pytest.raises(ExportError, match="quality_confidence"):
        export_sample(str(curated), 4, str(tmp_path / "g2"), uncertain=str(bad))


def test_label_studio_files(curated, tmp_path):
    gdir = tmp_path / "g"
    export_sample(str(curated), 5, str(gdir), seed=3)
    root = ET.fromstring((gdir / LABEL_STUDIO / "config.xml").read_text())  # well-formed
    rating = root.find(".//Rating")
    assert rating.attrib["name"] == "quality" and rating.attrib["toName"] == "image"
    assert rating.attrib["maxRating"] == "5"
    assert root.find(".//Image").attrib == {**root.find(".//Image").attrib, "name": "image", "value": "$image"}
    assert root.find(".//Text").attrib["value"] == "$caption"
    texts = [h.attrib["value"] for h in root.iter("Header")]
    for grade, (name, description) in LEVELS.items():
        assert sum(t.startswith(f"{grade}: {name}") and description in t for t in texts) == 1
    tasks = json.loads((gdir / LABEL_STUDIO / "tasks.json").read_text())
    assert [t["data"]["key"] for t in tasks] == batch(gdir).column("key").to_pylist()
    for t in tasks:
        head, data = t["data"]["image"].split(",", 1)
        assert head == "data:image/jpeg;base64"
        assert Image.open(io.BytesIO(base64.b64decode(data))).format == "JPEG"
        assert isinstance(t["data"]["caption"], str)
    if TOOLS_PYTHON.exists():  # Label Studio's own parser accepts the config, with the rating on the image
        check = ("import sys; from label_studio_sdk.label_interface import LabelInterface; "
                 "li = LabelInterface(open(sys.argv[1]).read()); li.validate(); "
                 "print([(c.name, c.tag, list(c.to_name)) for c in li.controls])")
        done = subprocess.run([str(TOOLS_PYTHON), "-c", check, str(gdir / LABEL_STUDIO / "config.xml")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "('quality', 'Rating', ['image'])" in done.stdout


def test_signal_columns_prefer_aesthetic():
    have = {"width": "INTEGER", "sharpness": "FLOAT", "quality": "DOUBLE", "aesthetic": "FLOAT", "key": "VARCHAR"}
    assert signal_columns(have) == ["aesthetic", "quality"]
    assert signal_columns({"sharpness": "FLOAT", "width": "INTEGER"}) == ["sharpness"]
    assert signal_columns({"width": "INTEGER"}) == []


# -- votes and agreement ---------------------------------------------------------------------------


def test_agreement_on_a_hand_made_table():
    votes = [{"key": k, "grader": g, "grade": v} for k, g, v in [
        ("i1", "ann", 4), ("i1", "bob", 4), ("i1", "cy", 5),
        ("i2", "ann", 2), ("i2", "bob", 3),
        ("i3", "ann", 1), ("i3", "bob", 5), ("i3", "cy", 1),
        ("i4", "cy", 3),  # one vote: in no pair's or alpha's figures
    ]]
    out = agreement(votes)
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert out["units"] == 3 and out["images"] == 4 and out["graders"] == ["ann", "bob", "cy"]
    assert pairs[("ann", "bob")]["n"] == 3
    assert pairs[("ann", "bob")]["exact"] == pytest.approx(1 / 3)
    assert pairs[("ann", "bob")]["within_one"] == pytest.approx(2 / 3)
    assert pairs[("ann", "cy")]["n"] == 2 and pairs[("ann", "cy")]["exact"] == pytest.approx(1 / 2)
    assert pairs[("ann", "cy")]["within_one"] == 1.0
    assert pairs[("bob", "cy")]["exact"] == 0.0 and pairs[("bob", "cy")]["within_one"] == pytest.approx(1 / 2)
    # by hand, two units {1, 2} and {3, 3}: coincidences o12 = o21 = 1, o33 = 2; n = 4; D_o = 2/4;
    # D_e = (2*1*1*1 + 2*1*2*4 + 2*1*2*1) / (4*3) = 22/12; alpha = 1 - 6/22
    assert krippendorff_alpha([[1, 2], [3, 3]], "interval") == pytest.approx(16 / 22)
    assert krippendorff_alpha([[4, 4], [2, 2]]) == 1.0
    assert krippendorff_alpha([[3, 3], [3, 3]]) is None  # nothing to disagree on
    # Krippendorff (2011)'s worked example: 4 observers, 12 units, values 1-5 with gaps
    na = None
    obs = [[1, 2, 3, 3, 2, 1, 4, 1, 2, na, na, na], [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, na, 3],
           [na, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, na], [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, na]]
    units = [[v for v in unit if v is not None] for unit in zip(*obs, strict=True)]
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha(units, "ordinal") == pytest.approx(0.815, abs=5e-4)
    # quadratic kappa: perfect agreement 1; by hand for (1,2),(2,1): observed mean (a-b)^2 = 1, expected from
    # the marginals (1/2, 1/2 each) 1/4 + 1/4 = 1/2 (the 1/16 scale cancels): 1 - 1 / (1/2) = -1
    assert weighted_kappa([(1, 1), (3, 3), (5, 5)]) == 1.0
    assert weighted_kappa([(1, 2), (2, 1)]) == pytest.approx(-1.0)
    assert weighted_kappa([(2, 2), (2, 2)]) is None


def test_vote_store_replaces_refuses_and_orders(tmp_path):
    gdir = tmp_path / "g"
    gdir.mkdir()
    pq.write_table(pa.table({"key": ["k1", "k2", "k3"], "image": [b"x"] * 3, "caption": ["", "", ""]}), gdir / BATCH)
    store = VoteStore(gdir)
    assert store.next_for("ann", 2) == "k1"
    store.record("k1", "ann", 2)
    store.record("k1", " ann ", 5)  # the same grader, trimmed: replaces
    assert [(v["key"], v["grader"], v["grade"]) for v in store.votes()] == [("k1", "ann", 5)]
    assert store.next_for("ann", 2) == "k2"
    store.record("k2", "bob", 3)
    store.record("k2", "cy", 3)
    assert store.next_for("ann", 2) == "k3"  # k2 has its two votes
    store.skip("k3", "ann")
    assert store.next_for("ann", 2) is None
    assert store.progress("ann") == {"graded": 1, "skipped": 1, "total": 3, "waiting": 1}
    assert store.history("ann") == ["k1", "k3"]
    for args, why in [(("k1", "ann", 7), "1 to 5"), (("k1", "ann", "3"), "integer"), (("k1", "ann", True), "integer"),
                      (("k1", "ann", 2.0), "integer"), (("nope", "ann", 3), "unknown key"), (("k1", " ", 3), "grader")]:
        with pytest.raises(VoteError, match=why):
            store.record(*args)
    # many writers at once (one connection each): every vote stored, none lost to a locked database
    def grade_all(grader: str) -> None:
        for i in range(20):
            store.record(f"k{i % 3 + 1}", grader, i % 5 + 1)

    threads = [threading.Thread(target=grade_all, args=(f"t{n}",)) for n in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    last = {f"k{i % 3 + 1}": i % 5 + 1 for i in range(20)}  # each grader's last vote per key
    assert {(v["grader"], v["key"]): v["grade"] for v in store.votes() if v["grader"].startswith("t")} == \
        {(f"t{n}", k): g for n in range(6) for k, g in last.items()}
    table = store.grades_table()
    assert table.schema == GRADES_SCHEMA and table.num_rows == len(store.votes())
    assert set(table.column("origin").to_pylist()) == {"page"}
    con = sqlite3.connect(gdir / VOTES_DB)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.IntegrityError):  # the table itself refuses a grade out of range
        con.execute("INSERT INTO votes VALUES ('k3', 'dan', 6, 'now')")
    con.close()


# -- the page, in a real browser -------------------------------------------------------------------


def post(url: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


HOSTILE = '<b id="injected">bold</b> & "quotes" <script>window.pwned = 1</script>'


def test_grading_page_in_a_browser(curated, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    gdir = tmp_path / "g"
    keys = export_sample(str(curated), 6, str(gdir), seed=0)["keys"]
    # the fourth image's bytes do not decode; the first caption tries to inject markup
    t = batch(gdir)
    images, captions = t.column("image").to_pylist(), t.column("caption").to_pylist()
    images[3], captions[0] = b"\xff\xd8\xff garbage, not a JPEG", HOSTILE
    t = t.set_column(1, "image", pa.array(images, pa.binary())).set_column(2, "caption", pa.array(captions))
    pq.write_table(t, gdir / BATCH)

    with pytest.raises(ValueError, match="refusing"):
        serve(str(gdir), host="0.0.0.0")
    server = serve(str(gdir), port=0)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            a = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            b = browser.new_context().new_page()  # a second grader: its own storage, at the same time

            def shows(page, k, grade=None):
                expect(page.locator("body")).to_have_attribute("data-key", k)
                expect(page.locator("body")).to_have_attribute("data-grade", str(grade) if grade else "")

            def start(page, name):
                page.goto(server.url)
                expect(page.locator("#levels button")).to_have_count(5)
                page.fill("#grader", name)
                page.press("#grader", "Enter")
                shows(page, keys[0])

            start(a, "A")
            start(b, "B")
            # the five levels on screen; the caption as text, its markup not made into elements
            for grade, (name, description) in LEVELS.items():
                expect(a.locator(f'#levels button[data-grade="{grade}"]')).to_contain_text(name)
                expect(a.locator(f'#levels button[data-grade="{grade}"]')).to_contain_text(description)
            expect(a.locator("#caption")).to_have_text(HOSTILE)
            assert a.locator("#injected").count() == 0 and a.evaluate("window.pwned") is None
            expect(a.locator("#picture")).to_be_visible()
            assert a.evaluate("document.getElementById('picture').naturalWidth") > 0

            a.keyboard.press("4")
            shows(a, keys[1])
            b.keyboard.press("4")
            shows(b, keys[1])
            a.keyboard.press("2")
            shows(a, keys[2])
            b.keyboard.press("3")
            shows(b, keys[2])
            expect(a.locator("#progress-text")).to_have_text("2 / 6 graded")
            a.reload()  # continues where A was: the name from localStorage, the item from the server
            expect(a.locator("#grader")).to_have_value("A")
            shows(a, keys[2])
            expect(a.locator("#progress-text")).to_have_text("2 / 6 graded")
            a.keyboard.press("5")
            shows(a, keys[3])
            b.keyboard.press("3")
            shows(b, keys[3])
            # the broken image: the placeholder instead, and it can be graded 1
            expect(a.locator("#broken")).to_be_visible()
            expect(a.locator("#broken")).to_have_text("image does not load")
            expect(a.locator("#picture")).to_be_hidden()
            a.keyboard.press("1")
            shows(a, keys[4])
            expect(a.locator("#broken")).to_be_hidden()
            # back: the grades given are shown; a new one replaces the old and goes on
            a.keyboard.press("ArrowLeft")
            shows(a, keys[3], 1)
            expect(a.locator("#broken")).to_be_visible()
            expect(a.locator('#levels button[data-grade="1"]')).to_have_class("given")
            a.keyboard.press("ArrowLeft")
            shows(a, keys[2], 5)
            expect(a.locator("#status")).to_have_text("your grade: 5")
            a.keyboard.press("3")
            shows(a, keys[3], 1)
            a.keyboard.press("ArrowRight")
            shows(a, keys[4])
            a.keyboard.press("ArrowRight")  # nothing beyond the next image to grade
            shows(a, keys[4])
            b.keyboard.press("s")  # B skips the broken image
            shows(b, keys[4])
            expect(a.locator("#progress-text")).to_have_text("4 / 6 graded")
            shot = tmp_path / "grading-page.png"
            a.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.exists() and shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # the votes are what was pressed, the last change winning
        con = sqlite3.connect(gdir / VOTES_DB)
        stored = sorted(con.execute("SELECT grader, key, grade FROM votes").fetchall())
        skips = con.execute("SELECT grader, key FROM skips").fetchall()
        con.close()
        assert stored == sorted([("A", keys[0], 4), ("A", keys[1], 2), ("A", keys[2], 3), ("A", keys[3], 1),
                                 ("B", keys[0], 4), ("B", keys[1], 3), ("B", keys[2], 3)])
        assert skips == [("B", keys[3])]

        status, body = get(server.url + "api/agreement")
        report = json.loads(body)
        assert status == 200 and report["graders"] == ["A", "B"] and report["units"] == 3
        (pair,) = report["pairs"]
        assert (pair["a"], pair["b"], pair["n"]) == ("A", "B", 3)
        assert pair["exact"] == pytest.approx(2 / 3) and pair["within_one"] == 1.0
        assert report["alpha_interval"] == pytest.approx(krippendorff_alpha([[4, 4], [2, 3], [3, 3]]))

        # refusals: HTTP 400 with a message, nothing stored
        grade_url = server.url + "api/grade"
        for body, why in [({"key": keys[5], "grader": "A", "grade": 7}, "1 to 5"),
                          ({"key": keys[5], "grader": "A", "grade": "x"}, "integer"),
                          ({"key": keys[5], "grader": "A", "grade": 2.5}, "integer"),
                          ({"key": "no-such-key", "grader": "A", "grade": 3}, "unknown key"),
                          ({"key": keys[5], "grader": "", "grade": 3}, "grader"),
                          ({"key": keys[5], "grade": 3}, "grader")]:
            status, answer = post(grade_url, body)
            assert status == 400 and why in answer["error"], (body, answer)
        assert post(server.url + "api/skip", {"key": "no-such-key", "grader": "A"})[0] == 400
        plain = urllib.request.Request(grade_url, json.dumps({"key": keys[5], "grader": "C", "grade": 3}).encode(),
                                       {"Content-Type": "text/plain"})  # what another site's page could send
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(plain, timeout=10)
        assert refused.value.code == 400 and b"application/json" in refused.value.read()
        rebound = urllib.request.Request(grade_url, json.dumps({"key": keys[5], "grader": "C", "grade": 3}).encode(),
                                         {"Content-Type": "application/json", "Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=10)
        assert refused.value.code == 400
        assert get(server.url + "api/image/no-such-key")[0] == 404
        status, data = get(server.url + "api/image/" + keys[1])
        assert status == 200 and Image.open(io.BytesIO(data)).format == "JPEG"
        assert len(VoteStore(gdir).votes()) == 7
        status, answer = post(grade_url, {"key": keys[5], "grader": "C", "grade": 5})
        assert status == 200 and answer["vote"]["grade"] == 5
    finally:
        server.stop()
