"""Images of extreme shape (1x1, 3x3000, 40000x400, 100000x1) must not kill the model signals,
and an input that does kill its actor must cost its own row, not its shard nor the pool."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import cv2
import duckdb
import numpy as np
import pyarrow as pa
import pytest
import ray
from conftest import photo, write_webdataset
from PIL import Image

from schemas.config import CurateConfig
from tasks.actors import infer_on_pool, pool_specs, start_pools, stop_pools
from tasks.decode import ImageSample
from tasks.process import process_shard
from tasks.runner import run
from tasks.signals import build_signals, registry
from tasks.signals.base import ModelParams, ModelSignal, Sample
from tasks.signals.faces import MAX_SIDE, Faces, fit_long_side
from tasks.signals.ocr import Ocr
from tasks.sources import discover

# width x height; 40000x400 at the faces' 384 px short side is 38400 px long: mediapipe's
# OpenCV aborted the process on it. 100000x1 has to be a PNG (JPEG stops at 65535).
EXTREMES = {"tiny": (1, 1), "thin": (3, 3000), "strip": (20000, 300), "banner": (40000, 400), "line": (100000, 1)}
PHOTOS = {"lena": ("lena.jpg", 1), "group": ("img8.jpg", 4)}  # name -> (file, faces)


def solid(width: int, height: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, fmt)
    return buf.getvalue()


def banner_with_text(width: int, height: int) -> np.ndarray:
    """A black band of white words across the whole width: one text box as long as the image."""
    rgb = np.full((height, width, 3), 255, np.uint8)
    rgb[height // 3 : 2 * height // 3] = 0
    for x in range(0, width, 300):
        cv2.putText(rgb, "HELLO", (x + 5, int(height * 0.6)), cv2.FONT_HERSHEY_SIMPLEX, height / 200, (255,) * 3, 10)
    return rgb


def read(out: Path, kind: str, columns: str) -> list[tuple]:
    """``key, columns`` of every row of one kind of output file (none: no rows)."""
    files = sorted(str(f) for f in (out / kind).glob("*.parquet"))
    return duckdb.sql(f"SELECT key, {columns} FROM read_parquet({files})").fetchall() if files else []


def sample(key: str, data: bytes, side: int) -> Sample:
    return Sample(key, None, ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=side))


def test_faces_on_extreme_shapes_find_nothing_and_survive() -> None:
    signal = Faces()
    names = list(EXTREMES)
    data = {n: solid(*EXTREMES[n], "PNG" if n == "line" else "JPEG") for n in names}
    prepared = {n: signal.prepare(sample(n, data[n], signal.pixel_side())) for n in names}
    assert max(max(a.shape[:2]) for a in prepared.values()) == MAX_SIDE  # the banner and the line are capped
    assert prepared["banner"].shape == (41, 4096, 3) and prepared["line"].shape == (1, 4096, 3)
    assert prepared["tiny"].shape == (1, 1, 3)
    rows = signal.compute_batch([sample(n, data[n], signal.pixel_side()) for n in names])
    assert rows == [{"face_count": 0, "face_area_ratio": 0.0}] * len(names)
    signal.ensure_setup()  # infer fed directly, uncapped, is capped again before mediapipe sees it
    assert signal.infer([np.zeros((2, 40000, 3), np.uint8)]) == [{"face_count": 0, "face_area_ratio": 0.0}]


def test_the_cap_leaves_normal_photos_alone() -> None:
    rgb = np.zeros((384, 4096, 3), np.uint8)
    assert fit_long_side(rgb) is rgb
    assert fit_long_side(np.zeros((300, 20000, 3), np.uint8)).shape == (61, 4096, 3)


def test_ocr_reads_no_crop_wider_than_opencv_allows() -> None:
    """A 53:1 banner with a full-width text band: its 34000 px crop failed OpenCV's remap."""
    signal = Ocr()
    signal.ensure_setup()
    row = signal.infer([(banner_with_text(34000, 640), "a banner")])[0]
    assert row["ocr_boxes"] >= 0 and 0.0 <= row["ocr_area_ratio"] <= 1.0
    tiny = signal.infer([(np.zeros((1, 1, 3), np.uint8), None), (np.zeros((3000, 3, 3), np.uint8), None)])
    assert [r["ocr_boxes"] for r in tiny] == [0, 0]


def test_ocr_skips_reading_a_hair_thin_line() -> None:
    signal = Ocr()
    signal.ensure_setup()
    rgb = np.full((640, 8192, 3), 255, np.uint8)
    box = np.array([[0, 300], [8000, 300], [8000, 303], [0, 303]], np.float32)  # 8000 x 3: 2667:1
    assert signal._recognise(rgb, rgb, [box]) == [("", 0.0)]


def test_analyze_without_ray_accounts_for_every_extreme_image(tmp_path: Path) -> None:
    samples = [(k, solid(*wh, "PNG" if k == "line" else "JPEG"), f"a {k} image", "png" if k == "line" else "jpg")
               for k, wh in EXTREMES.items()]
    samples += [(k, photo(f), f"a photo called {k}", "jpg") for k, (f, _) in PHOTOS.items()]
    write_webdataset(tmp_path / "src" / "0.tar", samples)
    cfg = CurateConfig(signals={"faces": {}, "ocr": {}}, rules={})
    summary = run(tmp_path / "src", tmp_path / "out", cfg, mode="analyze", use_ray=False)
    assert summary.failed == {}
    out = tmp_path / "out"
    rows = read(out, "shards", "NULL, face_count") + read(out, "rejects", "reason, face_count")
    assert sorted(k for k, _, _ in rows) == sorted(k for k, *_ in samples)  # each row exactly once
    reasons = {k: r for k, r, _ in rows if r}
    assert not [r for r in reasons.values() if r.startswith(("signal_error_faces", "signal_error_ocr"))], reasons
    faces = {k: n for k, _, n in rows}
    assert {k: faces[k] for k in PHOTOS} == {k: n for k, (_, n) in PHOTOS.items()}
    assert all(faces[k] == 0 for k in EXTREMES if k not in reasons)


class Boom(ModelSignal):
    """A model that crashes its process (no Python exception) on the caption ``BOOM``."""

    name = "boom"
    cost = 150
    Params = ModelParams
    fields = (pa.field("caption_chars", pa.int32()),)

    def prepare(self, sample: Sample) -> str:
        return sample.caption or ""

    def infer(self, inputs: list[str]) -> list[dict[str, Any]]:
        if "BOOM" in inputs:
            os._exit(1)
        return [{"caption_chars": len(c)} for c in inputs]


def test_an_actor_that_dies_costs_one_row_not_the_shard(tmp_path: Path, ray_runtime, monkeypatch) -> None:
    monkeypatch.setitem(registry(), "boom", Boom)  # the actor gets the class itself, not its name,
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # by value: workers cannot import tests
    lena = photo("lena.jpg")
    write_webdataset(tmp_path / "src" / "0.tar", [(f"a{i}", lena, "BOOM" if i == 3 else "fine", "jpg")
                                                  for i in range(6)])
    write_webdataset(tmp_path / "src" / "1.tar", [(f"b{i}", lena, "also fine", "jpg") for i in range(4)])
    cfg = CurateConfig(signals={"boom": {"batch_size": 2}}, rules={})
    pools = start_pools(pool_specs(build_signals(cfg.signals)))
    try:
        results = [process_shard(s, cfg, tmp_path / "out", pools) for s in discover(tmp_path / "src", cfg.source)]
        assert [(r.kept, r.rejected) for r in results] == [(5, 1), (4, 0)]  # the next shard runs on the restarted actor
        assert read(tmp_path / "out", "rejects", "reason") == [("a3", "signal_error_boom")]
        expected = {**{f"a{i}": 4 for i in (0, 1, 2, 4, 5)}, **{f"b{i}": 9 for i in range(4)}}  # len(caption)
        assert dict(read(tmp_path / "out", "shards", "caption_chars")) == expected
    finally:
        stop_pools(pools)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    _wait_until_dead(pools["boom"])  # ray.kill is asynchronous: a call sent right after it may still be served
    with pytest.raises(RuntimeError, match="did not come back"):  # a killed pool fails the shard, rejects nothing
        infer_on_pool(pools["boom"], ["fine"], 1)


def _wait_until_dead(handles: list, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    for h in handles:
        while True:
            try:
                ray.get(h.ready.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            assert time.monotonic() < deadline, "a killed actor kept answering"
            time.sleep(0.2)
