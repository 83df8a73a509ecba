"""`t2i report DIR`: one self-contained HTML file that shows what curation kept and what each rule removed,
checked on real curation runs (bad rows included, so several reject reasons have tiles), parsed with
html.parser: counts, tiles per sampled row, histograms with the rules' bounds, captions, escaping, and no
reference outside the file."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import photo, photo_samples, write_webdataset
from PIL import Image

import tasks.report as report
from captioners.recaption import caption_output
from schemas.config import Bounds, CurateConfig, StorageConfig
from schemas.recaption import RecaptionConfig
from t2i.cli import main
from tasks.report import NotAnOutput, write_report
from tasks.runner import run

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

XSS = "<script>alert(1)</script>"
ODD_KEY = 'odd<b>&"key'
FAKES = {"captioner": {"backend": "caption_fakes:FakeCaptioner"},
         "translator": {"backend": "caption_fakes:FakeTranslator"}}


def _config(**extra) -> CurateConfig:
    return CurateConfig(signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}},
                        rules={"short_side": Bounds(min=400), "sharpness": Bounds(min=200),
                               "caption_chars": Bounds(max=4096)}, **extra)


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _corpus(src: Path) -> None:
    samples = [(k, img, XSS if k == "a000000003" else cap, ext) for k, img, cap, ext in photo_samples("a")]
    write_webdataset(src / "00000.tar", [
        *samples,
        ("bad", b"<html>404</html>", "an error page", "jpg"),
        ("tiny", _png(32), "a 32 px square", "png"),
        ("noimg", None, "a caption without its image", "jpg"),
        (ODD_KEY, _png(48), "a key that needs escaping", "png"),
    ])
    write_webdataset(src / "00001.tar", [("a000000003", photo("cat.jpg"), "the second copy", "jpg")])


class Page(HTMLParser):
    """Every element with its attributes and the ids / data attributes of the elements around it."""

    VOID = frozenset({"img", "meta", "br", "hr", "link", "input"})

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[dict] = []
        self.elements: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "within": [dict(e["attrs"]) | {"tag": e["tag"]} for e in self.stack],
              "text": ""}
        self.elements.append(el)
        if tag not in self.VOID:
            self.stack.append(el)

    def handle_endtag(self, tag):
        while self.stack:
            if self.stack.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data

    def find(self, tag: str, **attrs) -> list[dict]:
        return [e for e in self.elements if e["tag"] == tag
                and all(e["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def inside(self, el: dict, key: str) -> str | None:
        return next((a[key] for a in reversed(el["within"]) if key in a), None)


def tiles(page: Page, where: str | None = None) -> dict[str, dict]:
    """key -> tile figure, in a section (``where``: a section id) or a reason's grid (``reason:NAME``)."""
    found = {}
    for fig in page.find("figure", **{"class": "tile"}):
        if where and where.startswith("reason:"):
            if page.inside(fig, "data-reason") != where.removeprefix("reason:"):
                continue
        elif where and page.inside(fig, "id") != where:
            continue
        assert fig["attrs"]["data-key"] not in found, "one tile per sampled row"
        found[fig["attrs"]["data-key"]] = fig
    return found


def tile_images(page: Page, fig: dict) -> list[dict]:
    i = page.elements.index(fig)
    return [e for e in page.elements[i + 1 : i + 3] if e["tag"] == "img"]


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[Path, str, Page]:
    root = tmp_path_factory.mktemp("report")
    _corpus(root / "src")
    run(root / "src", root / "out", _config(), use_ray=False)
    caption_output(root / "out", RecaptionConfig.model_validate(FAKES), use_ray=False)
    path = write_report(root / "out")
    assert path == str((root / "out" / "report.html").resolve())
    text = Path(path).read_text(encoding="utf-8")
    return root / "out", text, Page(text)


def _reasons(out: Path) -> dict[str, set[str]]:
    rows = duckdb.sql(f"SELECT reason, key FROM '{out}/rejects/*.parquet'").fetchall()
    found: dict[str, set[str]] = {}
    for reason, key in rows:
        found.setdefault(reason, set()).add(key)
    return found


def test_counts_and_sections(curated):
    out, text, page = curated
    assert {s["attrs"]["id"] for s in page.find("section")} == {"counts", "reasons", "signals", "buckets", "kept",
                                                                 "captions"}
    kept = duckdb.sql(f"SELECT count(*) FROM '{out}/shards/*.parquet'").fetchone()[0]
    reasons = _reasons(out)
    field = {e["attrs"]["data-field"]: e["text"] for e in page.find("td") if "data-field" in e["attrs"]}
    assert (field["kept"], field["rejected"]) == (str(kept), str(sum(map(len, reasons.values()))))
    assert field["duplicate_keys_in_shards"] == "0" and field["mode"] == "curate"
    assert field["source"] == str((out.parent / "src").resolve())
    assert set(reasons) >= {"short_side_below_min", "undecodable", "missing_image", "duplicate_key"}
    assert {e["attrs"]["data-reason"] for e in page.find("div", **{"class": "reason"})} == set(reasons)
    assert len(text.encode()) < 600_000  # thumbnails are small


def test_one_tile_per_sampled_row_with_signals_on_hover(curated):
    out, _, page = curated
    for reason, keys in _reasons(out).items():  # fewer rows than the cap: all of them
        grid = tiles(page, f"reason:{reason}")
        assert set(grid) == keys, reason
        for key, fig in grid.items():
            assert f"key: {key}" in fig["attrs"]["title"]
            images = tile_images(page, fig)
            if reason in ("short_side_below_min", "sharpness_below_min", "duplicate_key"):
                assert len(images) == 1, f"{reason} {key}: its image read again from the source"
            if reason in ("missing_image", "undecodable"):  # a labelled placeholder, its error shown
                assert not images
                placeholder = page.elements[page.elements.index(fig) + 1]
                assert placeholder["attrs"]["class"] == "ph" and placeholder["text"].startswith(reason)
    tiny = tiles(page, "reason:short_side_below_min")["tiny"]
    assert "short_side: 32" in tiny["attrs"]["title"] and "width: 32" in tiny["attrs"]["title"]
    kept = {k for (k,) in duckdb.sql(f"SELECT key FROM '{out}/shards/*.parquet'").fetchall()}
    grid = tiles(page, "kept")
    assert set(grid) == kept and all(len(tile_images(page, f)) == 1 for f in grid.values())
    assert all("sharpness: " in f["attrs"]["title"] for f in grid.values())


def test_thumbnails_are_small_jpegs_and_nothing_is_external(curated):
    _, text, page = curated
    images = page.find("img")
    assert images and all(i["attrs"]["src"].startswith("data:image/") for i in images)
    for i in images:
        if i["attrs"]["src"].startswith("data:image/jpeg;base64,"):
            thumb = Image.open(io.BytesIO(base64.b64decode(i["attrs"]["src"].split(",", 1)[1])))
            assert thumb.format == "JPEG" and max(thumb.size) <= 160
    for e in page.elements:
        for name in ("src", "href"):
            value = e["attrs"].get(name) or ""
            assert "http://" not in value and "https://" not in value
            assert name not in e["attrs"] or name != "href" or value.startswith("#")
    assert not page.find("script") and not page.find("link") and "<script" not in text.lower()


def test_histograms_with_the_rule_lines(curated):
    _, _, page = curated
    figures = {f["attrs"]["data-column"]: f for f in page.find("figure", **{"class": "hist"})}
    assert {"short_side", "sharpness", "caption_chars", "width", "aspect_ratio", "file_bytes"} <= set(figures)
    assert "phash" not in figures and "bucket_width" not in figures

    def svg(column: str) -> str:
        img = tile_images(page, figures[column])[0]["attrs"]["src"]
        assert img.startswith("data:image/svg+xml;base64,")
        return base64.b64decode(img.split(",", 1)[1]).decode()

    assert figures["short_side"]["attrs"]["data-rule"] == "yes" and 'id="rule-min"' in svg("short_side")
    assert 'id="rule-min"' in svg("sharpness") and 'id="rule-max"' not in svg("sharpness")
    assert 'id="rule-max"' in svg("caption_chars")  # far off the data: noted at the edge
    assert figures["width"]["attrs"]["data-rule"] == "no" and "rule-" not in svg("width")


def test_text_from_the_data_is_escaped(curated):
    _, text, page = curated
    assert XSS not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert ODD_KEY not in text and "odd&lt;b&gt;&amp;&quot;key" in text
    assert ODD_KEY in tiles(page, "reason:short_side_below_min")  # and it reads back as the key


def test_captions_side_by_side(curated):
    out, _, page = curated
    table = page.find("table", **{"class": "captions", "data_set": "captions"})
    assert len(table) == 1
    rows = {r["attrs"]["data-key"]: r for r in page.find("tr") if page.inside(r, "data-set") == "captions"
            and "data-key" in r["attrs"]}
    kept = dict(duckdb.sql(f"SELECT key, caption FROM '{out}/shards/*.parquet'").fetchall())
    assert set(rows) == set(kept)  # fewer than the cap
    for key, row in rows.items():
        assert kept[key] in row["text"] and "a picture of mean colour" in row["text"] and "一张图片：" in row["text"]
        assert len(tile_images(page, tiles(page, "captions")[key])) == 1
    assert XSS in rows["a000000003"]["text"]  # the parser unescaped it: it was text, not a tag


def test_samples_are_capped_and_the_same_every_time(curated, monkeypatch):
    out, _, _ = curated
    monkeypatch.setattr(report, "REJECTS_PER_REASON", 2)
    monkeypatch.setattr(report, "KEPT_SAMPLE", 3)
    first = Path(write_report(out)).read_text()
    page = Page(first)
    reasons = _reasons(out)
    grid = tiles(page, "reason:short_side_below_min")
    assert len(grid) == 2 and set(grid) <= reasons["short_side_below_min"]
    assert len(tiles(page, "kept")) == 3
    assert f"2 of {len(reasons['short_side_below_min'])} rows shown" in first
    assert Path(write_report(out)).read_text() == first


def test_parquet_and_folder_sources(tmp_path):
    """Rejects re-read from a Parquet file without a key column (keys are path/row) and a folder's files."""
    src = tmp_path / "pq" / "year=2024"
    src.mkdir(parents=True)
    pq.write_table(pa.table({"jpg": [photo("cat.jpg"), _png(40), photo("img3.jpg")], "caption": ["c", "s", "i"]}),
                   src / "part-0.parquet")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "small.png").write_bytes(_png(64))
    (tmp_path / "folder" / "cat.jpg").write_bytes(photo("cat.jpg"))
    for name in ("pq", "folder"):
        run(tmp_path / name, tmp_path / f"out-{name}", _config(), use_ray=False)
        page = Page(Path(write_report(tmp_path / f"out-{name}")).read_text())
        grid = tiles(page, "reason:short_side_below_min")
        assert set(grid) == _reasons(tmp_path / f"out-{name}")["short_side_below_min"]
        assert grid and all(len(tile_images(page, f)) == 1 for f in grid.values()), name


def test_empty_outputs(tmp_path):
    write_webdataset(tmp_path / "src" / "0.tar", [])
    run(tmp_path / "src", tmp_path / "out", _config(), use_ray=False)
    (tmp_path / "bare").mkdir()  # a stamp and no part at all
    (tmp_path / "bare" / "_run.json").write_text(json.dumps({"mode": "analyze", "source": "/x", "config": {}}))
    for out in (tmp_path / "out", tmp_path / "bare"):
        page = Page(Path(write_report(out)).read_text())
        assert page.find("p", id="empty") and not page.find("figure")
        field = {e["attrs"]["data-field"]: e["text"] for e in page.find("td") if "data-field" in e["attrs"]}
        assert field["kept"] == "0" and field["rejected"] == "0"


def test_cli(tmp_path, curated, capsys):
    out, _, _ = curated
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str((out / "report.html").resolve())
    (tmp_path / "stuff").mkdir()
    assert main(["report", str(tmp_path / "stuff")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "stuff" / "report.html").exists()
    assert main(["report", str(tmp_path / "nope")]) == 2
    with pytest.raises(NotAnOutput):
        write_report(tmp_path / "stuff")


def test_an_output_on_s3(tmp_path, s3: S3Bucket):
    storage = StorageConfig(endpoint_url=s3.endpoint_url, region=s3.region, access_key_id=s3.access_key,
                            secret_access_key=s3.secret_key)
    write_webdataset(tmp_path / "0.tar", [*list(photo_samples())[:3], ("tiny", _png(32), "small", "png")])
    fs = s3.filesystem()
    with fs.open_output_stream(s3.path("src/0.tar")) as fh:
        fh.write((tmp_path / "0.tar").read_bytes())
    run(s3.uri("src"), s3.uri("out"), _config(storage=storage), use_ray=False)
    where = write_report(s3.uri("out"), storage)
    assert where == s3.uri("out/report.html")
    with fs.open_input_stream(s3.path("out/report.html")) as fh:
        page = Page(fh.read().decode())
    assert set(tiles(page, "kept")) and all(len(tile_images(page, f)) == 1 for f in tiles(page, "kept").values())
    grid = tiles(page, "reason:short_side_below_min")
    assert "tiny" in grid and len(tile_images(page, grid["tiny"])) == 1  # read again from the tar on S3


def test_the_report_in_a_real_browser_loads_every_image_and_plot(curated, tmp_path):
    """Headless Debian chromium (make setup installs it) opens the file offline: every thumbnail and
    histogram decodes, the sections render, and a screenshot is kept."""
    from playwright.sync_api import sync_playwright

    out, _, _ = curated
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True).new_page()
        failed: list[str] = []
        page.on("requestfailed", lambda r: failed.append(r.url[:80]))
        page.goto((out / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt || ''])")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
        browser.close()
    assert failed == []
    assert len(sizes) > 10 and all(done and width > 0 for done, width, _ in sizes), sizes
    assert any("eject" in h for h in headings) and any("istogram" in h or "ignal" in h for h in headings), headings
    assert shot.stat().st_size > 10_000
