"""Training data: stage selection, streaming reads, bucketed batches, captions, crops, decode
failures and exact resume, on small shards written here in the curated schema and on real
`t2i analyze` output."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import DATA, photo_samples, write_webdataset
from PIL import Image
from pydantic import ValidationError

from schemas.config import CurateConfig
from tasks.runner import run
from trainer.buckets_sampler import PlannedBatch
from trainer.captions import CaptionConfig, choose_caption
from trainer.data import DataConfig, RowIndex, loader_throughput, make_loader, make_sampler
from trainer.transforms import cover_crop

torch.set_num_threads(1)

# Image sizes (upright w, h) with distinct buckets at resolution 128, each with spare pixels to crop.
SIZES = [(310, 100), (100, 310), (130, 100), (420, 100)]
BUCKET_AT_128 = {(310, 100): (192, 64), (100, 310): (64, 192), (130, 100): (128, 128), (420, 100): (256, 64)}


def color_of(i: int) -> tuple[int, int, int]:
    return (i * 37) % 200 + 30, (i * 91) % 200 + 30, (i * 53) % 200 + 30


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95, **kw) if fmt == "JPEG" else img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def row(i: int, prefix: str = "k", size: tuple[int, int] | None = None, **extra) -> dict:
    w, h = size or SIZES[i % len(SIZES)]
    image = encode(Image.new("RGB", (w, h), color_of(i)), "PNG" if i % 5 == 0 else "JPEG")
    return {"key": f"{prefix}{i:05d}", "image": image, "caption": f"original {prefix}{i}", "source": "test",
            "meta": "{}", "width": w, "height": h, "bucket_width": None, "bucket_height": None,
            "aesthetic": 4.0 + (i % 4), "quality": float(i % 5)} | extra


def write_shard(path: Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    types = {"width": pa.int32(), "height": pa.int32(), "bucket_width": pa.int32(), "bucket_height": pa.int32(),
             "aesthetic": pa.float32(), "quality": pa.float32(), "image": pa.binary(), "synthetic": pa.bool_()}
    columns = {c: pa.array([r.get(c) for r in rows], type=types.get(c, pa.string())) for c in rows[0]}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def make_data(tmp_path: Path, shards: int = 3, rows: int = 16, row_group_size: int | None = 5, **extra) -> Path:
    out = tmp_path / "curated"
    for s in range(shards):
        write_shard(out / "shards" / f"{s:03d}.parquet",
                    [row(s * rows + i, **extra) for i in range(rows)], row_group_size)
    return out


def config(root: Path, **kw) -> DataConfig:
    base = {"shards": [str(root)], "resolution": 128, "batch_size": 4, "caption": {"dropout": 0.0}}
    return DataConfig.model_validate(base | kw)


def epoch(index: RowIndex, cfg: DataConfig, e: int = 0) -> list[dict]:
    sampler = make_sampler(index, cfg)
    sampler.set_epoch(e)
    return list(make_loader(index, sampler, cfg))


def check_pixels(batch: dict, keys_to_i: dict[str, int]) -> None:
    """Each row's pixels are its own key's colour: the reader paired bytes and key correctly."""
    for pixels, key in zip(batch["pixel_values"], batch["keys"], strict=True):
        expected = (torch.tensor(color_of(keys_to_i[key]), dtype=torch.float32) / 127.5 - 1).view(3, 1, 1)
        assert (pixels - expected).abs().mean() < 0.03, key


# -- config and selection ------------------------------------------------------------------------

def test_config_is_strict():
    with pytest.raises(ValidationError):
        DataConfig(shard=["x"])  # typo
    with pytest.raises(ValidationError):
        CaptionConfig(dropout=1.5)
    with pytest.raises(ValidationError):
        DataConfig(resolution=96)  # not a bucket base
    assert DataConfig(resolution=96, bucketed=False).resolution == 96


def test_stage2_selection_returns_exactly_the_expected_rows(tmp_path):
    rows = [row(i, size=(s, s + 10), aesthetic=a) for i, (s, a) in
            enumerate([(90, 6.0), (100, 5.0), (120, 4.99), (200, 7.5), (99, 9.0), (150, None)])]
    write_shard(tmp_path / "a.parquet", rows)
    cfg = config(tmp_path / "a.parquet", select={"aesthetic": {"min": 5}}, min_short_side=100)
    index = RowIndex.build(cfg)
    assert [index.key(i) for i in range(len(index))] == ["k00001", "k00003"]  # 5.0 kept (inclusive), NULL out
    both = config(tmp_path / "a.parquet", select={"aesthetic": {"min": 5, "max": 7}, "quality": {"max": 0.5}})
    assert RowIndex.build(both).key(0) == "k00000" and len(RowIndex.build(both)) == 1  # rows 0, 1; quality 0, 1


def test_selection_errors_name_the_problem(tmp_path):
    write_shard(tmp_path / "d" / "a.parquet", [row(0)])
    with pytest.raises(ValueError, match=r"unknown column 'aesthetc'; the shards have: .*width.*aesthetic"):
        RowIndex.build(config(tmp_path / "d", select={"aesthetc": {"min": 5}}))
    with pytest.raises(ValueError, match="no row of 1 shard files passes"):
        RowIndex.build(config(tmp_path / "d", select={"aesthetic": {"min": 50}}))
    with pytest.raises(ValueError, match=r"holds no \.parquet"):
        RowIndex.build(config(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.parquet"):
        RowIndex.build(config(tmp_path / "empty"))


# -- streaming -----------------------------------------------------------------------------------

def test_index_holds_no_image_bytes_and_reads_across_many_row_groups(tmp_path):
    noise = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    big = encode(Image.fromarray(noise))  # ~30 KB that must stay on disk
    for s in range(12):
        write_shard(tmp_path / "wide" / f"{s}.parquet", [row(s * 6 + i) for i in range(6)], row_group_size=2)
        write_shard(tmp_path / "heavy" / f"{s}.parquet", [row(s * 6 + i) | {"image": big} for i in range(6)])
    heavy = RowIndex.build(config(tmp_path / "heavy"))
    assert heavy.nbytes < 60 * len(heavy) and heavy.nbytes * 100 < len(big) * len(heavy)
    cfg = config(tmp_path / "wide", batch_size=2)
    index = RowIndex.build(cfg)
    assert len(index) == 72 and len(index.group_bounds) - 1 == 36
    keys_to_i = {f"k{i:05d}": i for i in range(72)}
    seen = []
    for batch in epoch(index, cfg):
        check_pixels(batch, keys_to_i)
        seen += batch["keys"]
    assert len(seen) == len(set(seen)) == 72  # 4 buckets x 18 rows, batches of 2: nothing dropped


def test_one_big_row_group_is_streamed_once(tmp_path):
    """A curated part is one row group: one worker reads it front to back about once per epoch."""
    write_shard(tmp_path / "one.parquet", [row(i) for i in range(240)])
    cfg = config(tmp_path / "one.parquet")
    index = RowIndex.build(cfg)
    loader = make_loader(index, make_sampler(index, cfg), cfg)
    assert sum(len(b["keys"]) for b in loader) == 240
    stats = loader.dataset._reader.stats
    assert stats["rows_read"] <= 240 * 1.25 and stats["opens"] <= 3, stats


# -- buckets, crops, micro-conditioning -----------------------------------------------------------

def test_every_batch_is_one_bucket_and_unbucketed_is_square(tmp_path):
    root = make_data(tmp_path)
    cfg = config(root)
    index = RowIndex.build(cfg)
    sizes = {index.key(i): (int(index.width[i]), int(index.height[i])) for i in range(len(index))}
    shapes = set()
    for batch in epoch(index, cfg, e=1):
        b, c, h, w = batch["pixel_values"].shape
        assert (b, c) == (4, 3) and batch["pixel_values"].dtype == torch.float32
        assert {BUCKET_AT_128[sizes[k]] for k in batch["keys"]} == {(w, h)}
        assert batch["time_ids"][:, 4:].tolist() == [[h, w]] * 4
        shapes.add((w, h))
    assert shapes == set(BUCKET_AT_128.values())
    flat = cfg.model_copy(update={"bucketed": False})
    assert {tuple(b["pixel_values"].shape[2:]) for b in epoch(index, flat)} == {(128, 128)}


def test_recorded_bucket_is_used_when_it_is_one_of_ours(tmp_path):
    write_shard(tmp_path / "a.parquet", [row(i, size=(120, 120), bucket_width=192, bucket_height=64)
                                         for i in range(4)] + [row(9, size=(120, 120), bucket_width=999,
                                                                   bucket_height=1)])
    cfg = config(tmp_path / "a.parquet", batch_size=1)
    sampler = make_sampler(RowIndex.build(cfg), cfg)
    assert [sampler.buckets[b] for b in sampler.bucket_of] == [(192, 64)] * 4 + [(128, 128)]


def test_cover_crop_exif_and_time_ids():
    stored = Image.new("RGB", (100, 320), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 160, 100, 320))  # top red, bottom blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 320 x 100, blue left, red right
    data = encode(stored, exif=exif)
    pixels, time_ids = cover_crop(data, (192, 64))
    # scale max(192/320, 64/100) = 0.64 -> 205 x 64, centre crop: left (205 - 192) // 2 = 6
    assert time_ids == (100, 320, 0, 6, 64, 192) and pixels.shape == (64, 192, 3)
    assert pixels[32, 5, 2] > 200 and pixels[32, 5, 0] < 50 and pixels[32, 186, 0] > 200
    _, t1 = cover_crop(data, (192, 64), (0.999, 0.999))
    _, t0 = cover_crop(data, (192, 64), (0.0, 0.0))
    assert t1[2:4] == (0, 13) and t0[2:4] == (0, 0)  # random crops span the whole spare width
    _, up = cover_crop(encode(Image.new("RGB", (40, 30))), (128, 128))  # upscaled to cover
    assert up == (30, 40, 0, 21, 128, 128)


def test_random_crop_is_seeded_per_key_and_epoch(tmp_path):
    root = make_data(tmp_path, shards=1, rows=24)
    cfg = config(root, random_crop=True)
    index = RowIndex.build(cfg)

    def crops(e: int) -> dict[str, tuple]:
        return {k: tuple(t[2:4].tolist()) for b in epoch(index, cfg, e) for k, t in zip(b["keys"], b["time_ids"],
                                                                                          strict=True)}
    first, again, other = crops(0), crops(0), crops(1)
    assert first == again and len(set(first.values())) > 3
    assert any(first[k] != other[k] for k in first.keys() & other.keys())


# -- captions ------------------------------------------------------------------------------------

def test_caption_choice_is_seeded_and_about_half_machine():
    cfg = CaptionConfig(language="en", dropout=0.0)
    keys = [f"key{i}" for i in range(4000)]
    picks = [choose_caption(cfg, 7, 3, k, "orig", "machine", False) for k in keys]
    assert abs(picks.count("machine") - 2000) < 160  # 5 sigma of Binomial(4000, 0.5)
    assert picks == [choose_caption(cfg, 7, 3, k, "orig", "machine", False) for k in keys]
    other_epoch = [choose_caption(cfg, 7, 4, k, "orig", "machine", False) for k in keys]
    assert 1700 < sum(a != b for a, b in zip(picks, other_epoch, strict=True)) < 2300
    assert choose_caption(cfg, 7, 3, "k", "orig", "", False) == "orig"  # no machine caption: original
    assert choose_caption(cfg, 7, 3, "k", None, "machine", False) == "machine"
    assert {choose_caption(cfg, 7, 3, k, "text", "machine", True) for k in keys[:200]} == {"text"}
    always = CaptionConfig(machine_probability=1.0, dropout=0.0)
    assert {choose_caption(always, 0, 0, k, "o", "m", False) for k in keys[:200]} == {"m"}
    drop = CaptionConfig(dropout=0.1)
    dropped = sum(choose_caption(drop, 1, 0, k, "o", "m", False) == "" for k in keys)
    assert abs(dropped - 400) < 95  # 5 sigma of Binomial(4000, 0.1)


def test_loader_captions_follow_language_synthetic_and_missing_columns(tmp_path):
    with_machine = [row(i, recaption_en=f"en {i}", recaption_zh=f"中文 {i}", synthetic=i % 4 == 0)
                    for i in range(16)]
    with_machine[1]["recaption_zh"] = ""  # this row has no Chinese machine caption
    write_shard(tmp_path / "d" / "a.parquet", with_machine)
    write_shard(tmp_path / "d" / "b.parquet", [row(i) for i in range(16, 32)])  # no machine columns at all
    for language, prefix in (("en", "en "), ("zh", "中文 ")):
        cfg = config(tmp_path / "d", batch_size=1,
                     caption={"language": language, "machine_probability": 1.0, "dropout": 0.0})
        index = RowIndex.build(cfg)
        prompts = {k: p for b in epoch(index, cfg) for k, p in zip(b["keys"], b["prompts"], strict=True)}
        for key, prompt in prompts.items():
            i = int(key[1:])
            machine = i < 16 and i % 4 != 0 and not (language == "zh" and i == 1)
            assert prompt == (f"{prefix}{i}" if machine else f"original k{i}"), key


# -- decode failures -----------------------------------------------------------------------------

def test_undecodable_rows_are_replaced_within_the_batch_and_warned_once(tmp_path, caplog):
    rows = [row(i, size=(120, 120)) for i in range(12)]
    rows[3]["image"] = b"not an image"
    rows[7]["image"] = rows[7]["image"][: len(rows[7]["image"]) // 2]  # truncated
    write_shard(tmp_path / "a.parquet", rows, row_group_size=4)
    cfg = config(tmp_path / "a.parquet")
    index = RowIndex.build(cfg)
    sampler = make_sampler(index, cfg)
    loader = make_loader(index, sampler, cfg)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        for e in range(2):
            sampler.set_epoch(e)
            for batch in loader:
                assert len(batch["keys"]) == 4 == batch["pixel_values"].shape[0]
                assert not {"k00003", "k00007"} & set(batch["keys"])
    warned = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert sorted(m.split()[2].rstrip(":") for m in warned) == ["k00003", "k00007"]  # once per key, not per epoch

    bad = np.array([3, 7])
    stand_in = loader.dataset[PlannedBatch(0, 0, bad, (128, 128))]  # every row fails: same-bucket rows
    assert len(stand_in["keys"]) == 2 and not {"k00003", "k00007"} & set(stand_in["keys"])
    assert stand_in["keys"] == loader.dataset[PlannedBatch(0, 0, bad, (128, 128))]["keys"]


# -- resume --------------------------------------------------------------------------------------

def train(cfg: DataConfig, epochs: int, stop_after: int | None = None, state: str | None = None):
    """A stand-in for the loop: (batches seen, saved sampler state when stopped)."""
    index = RowIndex.build(cfg)
    sampler = make_sampler(index, cfg)
    if state is not None:
        sampler.load_state_dict(json.loads(state))
    loader = make_loader(index, sampler, cfg)
    seen = []
    for e in range(sampler.epoch, epochs):
        sampler.set_epoch(e)
        for batch in loader:
            seen.append((batch["epoch"], batch["position"], batch["keys"], batch["prompts"],
                         batch["time_ids"].tolist(), float(batch["pixel_values"].double().sum())))
            sampler.record(batch)
            if stop_after is not None and len(seen) == stop_after:
                return seen, json.dumps(sampler.state_dict())  # killed after this checkpoint
    return seen, None


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_delivers_exactly_what_an_uninterrupted_run_would(tmp_path, workers):
    root = make_data(tmp_path, shards=3, rows=14,
                     recaption_en="machine words", recaption_zh="机器描述")
    cfg = config(root, num_workers=workers, random_crop=True, seed=5,
                 caption={"dropout": 0.2, "language": "zh"})
    full, _ = train(cfg, epochs=2)
    per_epoch = sum(1 for b in full if b[0] == 0)
    assert per_epoch >= 8 and {"", "机器描述"} <= {p for b in full for p in b[3]}
    for stop in (3, per_epoch, per_epoch + 2):
        head, state = train(cfg, epochs=2, stop_after=stop)
        tail, _ = train(cfg, epochs=2, state=state)
        assert head + tail == full, stop
    if workers:
        assert full == train(cfg.model_copy(update={"num_workers": 0}), epochs=2)[0]  # order ignores workers


def test_resume_refuses_a_changed_layout(tmp_path):
    root = make_data(tmp_path, shards=2)
    cfg = config(root)
    _, state = train(cfg, epochs=1, stop_after=2)
    with pytest.raises(ValueError, match="seed"):
        train(cfg.model_copy(update={"seed": 1}), epochs=1, state=state)
    with pytest.raises(ValueError, match="selection"):
        train(config(root, select={"aesthetic": {"min": 5}}), epochs=1, state=state)


def test_ranks_split_the_epoch(tmp_path):
    root = make_data(tmp_path, shards=2)
    cfg = config(root)
    index = RowIndex.build(cfg)
    blocks = [make_sampler(index, cfg, rank=r, world_size=2).rank_batches(0) for r in range(2)]
    assert len(blocks[0]) == len(blocks[1]) > 0
    rows = [set(np.concatenate(b).tolist()) for b in blocks]
    assert not rows[0] & rows[1]


# -- real curated output -------------------------------------------------------------------------

def test_reads_real_analyze_output(tmp_path):
    samples = list(photo_samples())[:4]
    write_webdataset(tmp_path / "src" / "00000.tar", samples)
    run(tmp_path / "src", tmp_path / "out", CurateConfig().without_rules(), mode="analyze", use_ray=False)
    shards = pq.read_table(tmp_path / "out" / "shards",
                           columns=["key", "width", "height", "bucket_width", "bucket_height"]).to_pylist()
    cfg = config(tmp_path / "out", resolution=1024, batch_size=1, caption={"dropout": 0.0})
    index = RowIndex.build(cfg)
    got = {b["keys"][0]: b for b in epoch(index, cfg)}
    assert set(got) == {s[0] for s in samples}
    for rec in shards:
        batch = got[rec["key"]]
        assert batch["pixel_values"].shape == (1, 3, rec["bucket_height"], rec["bucket_width"])
        assert batch["time_ids"][0, :2].tolist() == [rec["height"], rec["width"]]
        assert batch["prompts"][0].startswith("a photo called ")
    name = {s[0]: s[2].split()[-1] for s in samples}
    for key, batch in got.items():  # original size is the upright photo's
        with Image.open(next(DATA.glob(f"{name[key]}.*"))) as img:
            w, h = img.size if img.getexif().get(0x0112, 1) < 5 else img.size[::-1]
        assert batch["time_ids"][0, :2].tolist() == [h, w]
    assert loader_throughput(index, cfg.model_copy(update={"resolution": 256}), batches=2) > 0
