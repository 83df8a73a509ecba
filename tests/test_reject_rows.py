"""Reject rows say what was dropped (caption and meta, never the image bytes) and read the same
in every run: no memory address in an error text, so two runs over one corpus write equal rejects."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import photo, write_webdataset
from PIL import Image

from schemas.config import Bounds, CurateConfig
from tasks.decode import DecodeError, ImageSample, stable_text
from tasks.runner import run

ADDRESS = re.compile(r"0x[0-9a-f]{6,}")


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _corpus(root: Path) -> dict[str, str]:
    """Two shards with one bad row of each kind, plus a key repeated across the shards (the
    duplicate-key pass moves its second copy to rejects). Returns key -> expected reason."""
    truncated = photo("img9.jpg")
    write_webdataset(root / "00000.tar", [
        ("good_cat", photo("cat.jpg"), "a cat", "jpg"),
        ("bad_not_image", b"<html>404 not found</html>", "an error page", "jpg"),
        ("bad_truncated", truncated[: len(truncated) // 2], "cut in half", "jpg"),
        ("too_small", _tiny_png(), "a 32 px square", "png"),
        ("no_image", None, "a caption whose image is missing", "jpg"),
        ("repeated", photo("lena.jpg"), "the first copy", "jpg"),
    ])
    write_webdataset(root / "00001.tar", [
        ("repeated", photo("img10.jpg"), "the second copy", "jpg"),
        ("bad_garbage", b"\x00garbage bytes", "not an image either", "jpg"),
    ])
    return {"bad_not_image": "undecodable", "bad_truncated": "undecodable", "too_small": "short_side_below_min",
            "no_image": "missing_image", "repeated": "duplicate_key", "bad_garbage": "undecodable"}


def _config() -> CurateConfig:
    # The CPU signals only: what is judged here is the reject rows, not the models.
    return CurateConfig(signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}},
                        rules={"short_side": Bounds(min=256), "caption_chars": Bounds(max=4096)})


def _rejects(out: Path) -> list[dict]:
    tables = [pq.read_table(p) for p in sorted((out / "rejects").glob("*.parquet"))]
    rows = pa.concat_tables(tables, promote_options="default").to_pylist()
    return sorted(rows, key=lambda r: (r["key"], r["reason"]))


def test_rejects_carry_caption_and_meta_and_are_equal_across_runs(tmp_path):
    expected = _corpus(tmp_path / "src")
    captions = {"bad_not_image": "an error page", "bad_truncated": "cut in half", "too_small": "a 32 px square",
                "no_image": "a caption whose image is missing", "repeated": "the second copy",
                "bad_garbage": "not an image either"}
    first = run(tmp_path / "src", tmp_path / "out1", _config(), use_ray=False)
    second = run(tmp_path / "src", tmp_path / "out2", _config(), use_ray=False)
    assert first.failed == second.failed == {}

    rejects = _rejects(tmp_path / "out1")
    assert {r["key"]: r["reason"] for r in rejects} == expected
    for r in rejects:
        assert "image" not in r, "rejects never hold the image bytes"
        assert r["caption"] == captions[r["key"]], r["key"]
        assert json.loads(r["meta"]) == {"key": r["key"], "status": "success"}, r["key"]
        assert r["error"] and not ADDRESS.search(r["error"]), r["error"]
    assert _rejects(tmp_path / "out2") == rejects, "two runs over one corpus write equal rejects"


def test_pillow_file_reprs_lose_their_address():
    try:
        ImageSample(b"<html>404</html>", max_pixels=10**8, max_file_bytes=10**8, decode_side=None)
    except DecodeError as exc:
        assert exc.detail == "UnidentifiedImageError: cannot identify image file (the image bytes)"
    else:
        raise AssertionError("an HTML page decoded as an image")
    assert stable_text("got <Foo object at 0x7f29f22bcfe0>, id 0x7f29f22bcfe1") == "got <Foo object>, id 0x..."
    assert stable_text("bad marker 0xFFD8") == "bad marker 0xFFD8"
