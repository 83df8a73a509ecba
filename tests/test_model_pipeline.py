"""The model signals end to end: real BlazeFace, RapidOCR and BRISQUE, and the aesthetic
plumbing on a tiny random CLIP, each model in its Ray actor pool, scores in the shards."""

from __future__ import annotations

import duckdb
import pytest
from conftest import PHOTOS, photo_samples, write_webdataset
from tiny_models import tiny_aesthetic_params

from schemas.config import Bounds, ConfigError, CurateConfig
from tasks.runner import run

NAMES = {f"{i:09d}": p.name for i, p in enumerate(PHOTOS)}
CHEAP = {"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}}


def kept(out) -> dict[str, dict]:
    rows = duckdb.sql(f"SELECT * EXCLUDE (image) FROM read_parquet('{out}/shards/*.parquet')").df()
    return {NAMES[r["key"]]: r for r in rows.to_dict("records")}


def test_model_signals_on_actor_pools(tmp_path, ray_runtime):
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    signals = CHEAP | {"faces": {}, "ocr": {}, "quality": {},
                       "aesthetic": tiny_aesthetic_params(tmp_path / "models", batch_size=4)}
    cfg = CurateConfig(signals=signals, rules={"face_count": Bounds(max=1)})
    summary = run(tmp_path / "src", tmp_path / "out", cfg)
    assert summary.failed == {}
    rows = kept(tmp_path / "out")
    rejects = duckdb.sql(f"SELECT key, reason FROM read_parquet('{tmp_path}/out/rejects/*.parquet')").fetchall()
    assert [(NAMES[k], r) for k, r in rejects] == [("img8.jpg", "face_count_above_max")]  # four people
    assert rows["lena.jpg"]["face_count"] == 1 and rows["cat.jpg"]["face_count"] == 0
    assert rows["lena-face.jpg"]["face_area_ratio"] >= 0.4 > rows["lena.jpg"]["face_area_ratio"]
    assert rows["img2.jpg"]["ocr_boxes"] >= 1 and rows["img2.jpg"]["ocr_area_ratio"] > 0.01
    assert '"' in rows["img2.jpg"]["caption_ocr"] and rows["img2.jpg"]["caption_ocr"].startswith("a photo called")
    assert rows["cat.jpg"]["ocr_boxes"] == 0
    scores = [r["aesthetic"] for r in rows.values()]
    assert all(s is not None for s in scores) and len(set(scores)) > 1
    assert all(r["quality"] is not None for r in rows.values())


def test_a_rule_on_a_signal_without_weights_fails_at_start(tmp_path):
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    cfg = CurateConfig(signals=CHEAP | {"aesthetic": {"mlp_weights": str(tmp_path / "missing.safetensors")}},
                       rules={"aesthetic": Bounds(min=5)})
    with pytest.raises(ConfigError, match=r"missing\.safetensors"):
        run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)
    assert not (tmp_path / "out").exists()


def test_pools_that_leave_no_cpu_for_shards_are_refused_not_hung(tmp_path, ray_runtime):
    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    cfg = CurateConfig(signals=CHEAP | {"faces": {"actors": 4}}, rules={})
    with pytest.raises(ConfigError, match="reserve 4 CPUs"):
        run(tmp_path / "src", tmp_path / "out", cfg)


def test_every_signal_shares_one_decode(tmp_path):
    from tasks.process import process_shard
    from tasks.sources import discover

    write_webdataset(tmp_path / "src" / "0.tar", photo_samples())
    cfg = CurateConfig(signals=CHEAP | {"faces": {}, "ocr": {}, "quality": {}}, rules={})
    shard = discover(tmp_path / "src", cfg.source)[0]
    result = process_shard(shard, cfg, tmp_path / "out")
    assert result.kept == len(PHOTOS) and result.decodes == len(PHOTOS)
