"""Original size (img2dataset's ``original_width`` / ``original_height`` in the row's meta): the
resolution signal records it, ``short_side`` judges the smaller of stored and original (an upscaled
image has no more detail than its original), and the trainer's SDXL ``original_size`` conditioning
uses it. Rows whose meta does not say (no meta, bad JSON, odd values) behave as before."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import add_member
from PIL import Image

from schemas.config import CurateConfig
from tasks.decode import ImageSample
from tasks.runner import run
from tasks.signals import Sample, build_signals
from tasks.signals.resolution import original_size
from trainer.data import DataConfig, RowIndex, make_loader, make_sampler
from trainer.transforms import cover_crop

torch.set_num_threads(1)

STORED = (384, 427)  # what the downloader stored (w, h)


def jpeg(size: tuple[int, int] = STORED, color: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def resolution(meta: str | None, data: bytes | None = None) -> dict:
    (signal,) = build_signals({"resolution": {}})
    image = ImageSample(data or jpeg(), max_pixels=10**8, max_file_bytes=10**8, decode_side=None)
    return signal.compute(Sample("k", None, image, meta))


def sidecar(**extra) -> str:
    return json.dumps({"key": "k", "status": "success", "width": STORED[0], "height": STORED[1]} | extra)


# -- the signal ------------------------------------------------------------------------------------

def test_upscaled_image_is_judged_by_its_original():
    v = resolution(sidecar(original_width=180, original_height=200))
    assert (v["width"], v["height"]) == STORED, "width/height stay the stored pixels"
    assert (v["original_width"], v["original_height"]) == (180, 200)
    assert v["short_side"] == 180
    assert v["aspect_ratio"] == pytest.approx(384 / 427), "aspect ratio is the stored pixels'"


def test_downscaled_image_is_judged_by_its_stored_pixels():
    v = resolution(sidecar(original_width=1000, original_height=1100))
    assert (v["original_width"], v["original_height"]) == (1000, 1100)
    assert v["short_side"] == 384


@pytest.mark.parametrize("meta", [
    None, "", "{}", "not json", "[1, 2]", "null", '"text"', sidecar(),
    sidecar(original_width=180), sidecar(original_height=200),
    sidecar(original_width="180", original_height="200"), sidecar(original_width=None, original_height=200),
    sidecar(original_width=0, original_height=200), sidecar(original_width=-180, original_height=200),
    sidecar(original_width=True, original_height=True), sidecar(original_width=[180], original_height={}),
    sidecar(original_width=2**40, original_height=200),
    '{"original_width": NaN, "original_height": 200}', '{"original_width": Infinity, "original_height": 1e400}',
    "[" * 100_000,
])
def test_unknown_original_is_as_today(meta):
    v = resolution(meta)
    assert v == {"width": 384, "height": 427, "short_side": 384, "aspect_ratio": pytest.approx(384 / 427),
                 "file_bytes": v["file_bytes"], "original_width": None, "original_height": None}
    assert original_size(meta) is None


def test_float_sides_are_rounded():
    assert original_size('{"original_width": 180.0, "original_height": 199.6}') == (180, 200)


# -- curation and training, end to end -------------------------------------------------------------

def write_tar(path: Path, samples: list[tuple[str, bytes, str | None]]) -> Path:
    """(key, image, KEY.json text or None for no sidecar)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.txt", f"a photo {key}".encode())
            if meta is not None:
                add_member(tar, f"{key}.json", meta.encode())
    return path


def read(out: Path, part: str) -> dict[str, dict]:
    tables = [pq.read_table(p) for p in sorted((out / part).glob("*.parquet"))]
    return {r["key"]: r for t in tables for r in t.to_pylist()}


def test_curate_then_train_uses_the_original(tmp_path):
    write_tar(tmp_path / "src" / "00000.tar", [
        ("upscaled", jpeg(), sidecar(original_width=180, original_height=200)),
        ("downscaled", jpeg(color=(10, 200, 90)), sidecar(original_width=1000, original_height=1100)),
        ("nosidecar", jpeg(color=(200, 10, 90)), None),
        ("badmeta", jpeg(color=(90, 10, 200)), "{truncated"),
        ("small", jpeg((200, 220)), sidecar()),
    ])
    run(tmp_path / "src", tmp_path / "out", CurateConfig(signals={"resolution": {}}), use_ray=False)
    kept, rejects = read(tmp_path / "out", "shards"), read(tmp_path / "out", "rejects")

    assert set(kept) == {"downscaled", "nosidecar", "badmeta"}
    assert {k: r["reason"] for k, r in rejects.items()} == {"upscaled": "short_side_below_min",
                                                            "small": "short_side_below_min"}
    up = rejects["upscaled"]
    assert (up["width"], up["height"], up["original_width"], up["original_height"]) == (384, 427, 180, 200)
    assert up["error"] == "short_side 180 < min 256"
    down = kept["downscaled"]
    assert (down["width"], down["height"], down["short_side"]) == (384, 427, 384)
    assert (down["original_width"], down["original_height"]) == (1000, 1100)
    for key in ("nosidecar", "badmeta"):
        assert (kept[key]["original_width"], kept[key]["original_height"]) == (None, None)
        assert kept[key]["short_side"] == 384

    cfg = DataConfig.model_validate({"shards": [str(tmp_path / "out")], "resolution": 256, "batch_size": 1,
                                     "caption": {"dropout": 0.0}})
    index = RowIndex.build(cfg)
    sampler = make_sampler(index, cfg)
    sampler.set_epoch(0)
    got = {b["keys"][0]: b["time_ids"][0].tolist() for b in make_loader(index, sampler, cfg)}
    assert got["downscaled"][:2] == [1100, 1000], "original_size is (original_height, original_width)"
    assert got["nosidecar"][:2] == got["badmeta"][:2] == [427, 384], "no original: the stored size, as before"


# -- the trainer alone -----------------------------------------------------------------------------

def test_cover_crop_original_size():
    data = jpeg((320, 100))
    _, stored = cover_crop(data, (192, 64))
    _, given = cover_crop(data, (192, 64), original=(160, 50))
    assert stored == (100, 320, 0, 6, 64, 192)
    assert given == (50, 160, 0, 6, 64, 192), "only original_size changes; crop and target are the stored image's"


def test_tiny_shard_with_original_columns(tmp_path):
    """A shard written by hand (synthetic shards may lack columns): rows with both original sides
    condition on them, rows with a null side on the stored size; a shard without the columns reads."""
    def shard(path: Path, rows: list[tuple[str, int | None, int | None]], with_original: bool = True) -> None:
        cols = {"key": pa.array([k for k, _, _ in rows]),
                "image": pa.array([jpeg((130, 100)) for _ in rows], pa.binary()),
                "caption": pa.array([f"c {k}" for k, _, _ in rows]),
                "width": pa.array([130] * len(rows), pa.int32()), "height": pa.array([100] * len(rows), pa.int32())}
        if with_original:
            cols["original_width"] = pa.array([w for _, w, _ in rows], pa.int32())
            cols["original_height"] = pa.array([h for _, _, h in rows], pa.int32())
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)

    shard(tmp_path / "d" / "a.parquet", [("both", 1300, 1000), ("half", 1300, None), ("none", None, None)])
    shard(tmp_path / "d" / "b.parquet", [("plain", None, None)], with_original=False)
    cfg = DataConfig.model_validate({"shards": [str(tmp_path / "d")], "resolution": 128, "batch_size": 1,
                                     "caption": {"dropout": 0.0}})
    index = RowIndex.build(cfg)
    sampler = make_sampler(index, cfg)
    sampler.set_epoch(0)
    got = {b["keys"][0]: b["time_ids"][0, :2].tolist() for b in make_loader(index, sampler, cfg)}
    assert got == {"both": [1000, 1300], "half": [100, 130], "none": [100, 130], "plain": [100, 130]}
