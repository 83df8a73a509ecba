"""`t2i synth` end to end: rendered words through the curation cascade (real RapidOCR), into shards
and rejects with the OCR reading; deterministic; resumable; on S3 through Ray; the trainer keeps
synthetic rows' own captions; bad fonts, uncoverable words, unfit sizes and broken background
photos."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest
import yaml
from conftest import PHOTOS

from schemas.config import ConfigError, CurateConfig
from synth_text.pipeline import pass_rates, synth_config, synthesize
from tasks.runner import RunConfigMismatch, run
from tasks.shards import Manifest
from trainer.data import CaptionConfig, DataConfig, RowIndex, make_loader, make_sampler

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

SMALL = {"synth": {"words_per_shard": 4, "sizes": [[512, 512], [768, 512]]}, "output": {"row_group_rows": 4}}


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", "synth", *args], capture_output=True, text=True,
                          timeout=600)


def images(out: Path) -> dict[str, str]:
    """key -> sha256 of the image bytes of every kept row."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in
            duckdb.sql(f"SELECT key, image FROM '{out}/shards/*.parquet'").fetchall()}


def test_synth_renders_reads_back_and_accounts_for_every_image_deterministically(tmp_path: Path) -> None:
    config = write_config(tmp_path / "s.yaml", SMALL)
    first = cli("--words", "12", "--out", str(tmp_path / "a"), "--config", str(config), "--no-ray")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["shards_done"] == 3 and summary["output_kept"] + summary["output_rejected"] == 12
    assert summary["output_kept"] >= 9  # most of them legible to the curation OCR
    rates = summary["pass_rates"]
    assert sum(r["images"] for r in rates["font"].values()) == 12 == sum(r["images"] for r in rates["layout"].values())

    kept = duckdb.sql(f"SELECT * FROM '{tmp_path}/a/shards/*.parquet'").fetchdf()
    for _, r in kept.iterrows():
        assert r["synthetic"] and r["rendered_text"] and r["font"]
        assert all(line in r["caption"] for line in r["rendered_text"].split("\n"))  # the caption names the text
        boxes = json.loads(r["text_boxes"])
        assert len(boxes) == len(r["rendered_text"].split("\n")) and all(len(b) == 4 for b in boxes)
        chars = json.loads(r["char_boxes"])
        assert len(chars) == len(r["rendered_text"].replace("\n", "")) and all(len(b) == 4 for b in chars)
        assert (r["width"], r["height"]) in ((512, 512), (768, 512)) and r["bucket_width"] > 0
        assert r["text_cer"] <= 0.1
    rejected = duckdb.sql(f"SELECT reason, rendered_text, ocr_text, text_cer FROM '{tmp_path}/a/rejects/*.parquet'"
                          ).fetchall()
    for reason, rendered, ocr_text, text_cer in rejected:  # illegible: the reason and the OCR reading beside
        assert reason == "text_cer_above_max" and rendered and ocr_text is not None and text_cer > 0.1

    second = cli("--words", "12", "--out", str(tmp_path / "b"), "--config", str(config), "--no-ray")
    assert second.returncode == 0, second.stderr
    assert images(tmp_path / "a") == images(tmp_path / "b")  # the same command, the same bytes
    again = cli("--words", "12", "--out", str(tmp_path / "a"), "--config", str(config), "--no-ray")
    assert json.loads(again.stdout)["shards_skipped"] == 3
    reseeded = cli("--words", "12", "--seed", "7", "--out", str(tmp_path / "a"), "--config", str(config), "--no-ray")
    assert reseeded.returncode == 2 and "source.synth.seed" in reseeded.stderr


def test_a_lost_shard_is_rendered_again_identically(tmp_path: Path) -> None:
    cfg = synth_config(None, words=8, words_per_shard=4, sizes=[[512, 512]])
    synthesize(tmp_path / "out", cfg, use_ray=False)
    before = images(tmp_path / "out")
    victim = sorted(Manifest(tmp_path / "out").done_ids())[1]
    Manifest(tmp_path / "out").forget(victim)  # as if killed before its commit
    summary = synthesize(tmp_path / "out", cfg, use_ray=False)
    assert (summary.shards_skipped, summary.shards_done) == (1, 1)
    assert images(tmp_path / "out") == before


def test_synth_through_ray_onto_s3_equals_the_local_run(tmp_path: Path, s3: S3Bucket, ray_runtime) -> None:
    from test_s3_curate import connect

    keys = {"endpoint_url": s3.endpoint_url, "region": s3.region, "access_key_id": s3.access_key,
            "secret_access_key": s3.secret_key}
    remote = synth_config(write_config(tmp_path / "s.yaml", {**SMALL, "storage": keys}), words=8)
    summary = synthesize(s3.uri("synth"), remote)
    assert summary.output_kept + summary.output_rejected == 8
    synthesize(tmp_path / "local", synth_config(write_config(tmp_path / "l.yaml", SMALL), words=8), use_ray=False)
    con = connect(s3)
    on_s3 = {k: hashlib.sha256(v).hexdigest()
             for k, v in con.sql(f"SELECT key, image FROM '{s3.uri('synth')}/shards/*.parquet'").fetchall()}
    assert on_s3 == images(tmp_path / "local")
    assert pass_rates(s3.uri("synth"), remote.storage) == pass_rates(tmp_path / "local")


def test_the_trainer_keeps_synthetic_rows_own_captions(tmp_path: Path) -> None:
    synthesize(tmp_path / "out", synth_config(None, words=8, words_per_shard=4, sizes=[[512, 512]]), use_ray=False)
    captions = dict(duckdb.sql(f"SELECT key, caption FROM '{tmp_path}/out/shards/*.parquet'").fetchall())
    cfg = DataConfig(shards=[str(tmp_path / "out")], resolution=64, batch_size=1, bucketed=False,
                     caption=CaptionConfig(machine_probability=1.0, dropout=0.0))
    index = RowIndex.build(cfg)
    prompts = {k: p for b in make_loader(index, make_sampler(index, cfg), cfg)
               for k, p in zip(b["keys"], b["prompts"], strict=True)}
    assert prompts == captions


def test_missing_or_corrupt_font_files_fail_before_any_work_naming_them(tmp_path: Path) -> None:
    (tmp_path / "bad.ttf").write_bytes(b"not a font at all")
    for path in (tmp_path / "missing.ttf", tmp_path / "bad.ttf"):
        config = write_config(tmp_path / "s.yaml", {"synth": {"font_paths": [str(path)]}})
        result = cli("--words", "4", "--out", str(tmp_path / "out"), "--config", str(config), "--no-ray")
        assert result.returncode == 2 and str(path) in result.stderr
        assert not (tmp_path / "out" / "shards").exists()
    with pytest.raises(ConfigError, match=r"synth\.sizes"):
        synth_config(None, sizes=[[100, 100]])
    with pytest.raises(ConfigError, match="unknown section"):
        synth_config(write_config(tmp_path / "x.yaml", {"rules": {}}))


def test_words_no_font_covers_and_text_that_cannot_fit_are_rejects_not_crashes(tmp_path: Path) -> None:
    latin_only = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # no Han characters at all
    cfg = synth_config(None, words=4, words_per_shard=4, font_paths=[latin_only], sizes=[[512, 512]])
    summary = synthesize(tmp_path / "tofu", cfg, use_ray=False)
    assert (summary.output_kept, summary.output_rejected) == (0, 4)
    reasons = duckdb.sql(f"SELECT reason, error FROM '{tmp_path}/tofu/rejects/*.parquet'").fetchall()
    assert all(r == "render_failed" and "font" in e for r, e in reasons)

    huge = synth_config(None, words=4, words_per_shard=4, sizes=[[256, 256]], min_text_px=400)
    summary = synthesize(tmp_path / "unfit", huge, use_ray=False)
    assert (summary.output_kept, summary.output_rejected) == (0, 4)
    errors = [e for (e,) in duckdb.sql(f"SELECT error FROM '{tmp_path}/unfit/rejects/*.parquet'").fetchall()]
    assert all("fit" in e for e in errors), errors


def test_photo_backgrounds_come_from_a_curated_output_and_broken_ones_are_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for i, p in enumerate(PHOTOS[:4]):
        (src / f"{i}{p.suffix}").write_bytes(p.read_bytes())
    run(src, tmp_path / "curated", CurateConfig.model_validate({"signals": {"resolution": {}}, "rules": {}}),
        use_ray=False)
    part = next((tmp_path / "curated" / "shards").glob("*.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(part).to_pylist()
    table[0]["image"] = b"\xff\xd8 a truncated jpeg"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(part)), part)
    cfg = synth_config(None, words=8, words_per_shard=8, sizes=[[512, 512]], backgrounds={"photo": 1.0},
                       photos_from=str(tmp_path / "curated"))
    with caplog.at_level(logging.WARNING):
        summary = synthesize(tmp_path / "out", cfg, use_ray=False)
    assert "1 background photos" in caplog.text
    assert summary.output_kept + summary.output_rejected == 8
    backgrounds = {b for (b,) in duckdb.sql(
        f"SELECT synth_background FROM '{tmp_path}/out/shards/*.parquet'").fetchall()}
    assert backgrounds == {"photo"}
    with pytest.raises(RunConfigMismatch, match=r"source\.synth\.photo_count"):
        synthesize(tmp_path / "out", cfg.model_copy(update={"source": cfg.source.model_copy(update={
            "synth": cfg.source.synth.model_copy(update={"photo_count": 3})})}), use_ray=False)


def test_the_report_renders_synthetic_rejects_again_with_the_runs_bytes(tmp_path: Path) -> None:
    """Rejects keep no image bytes; a synthetic one's image is rendered again from the run's settings,
    byte for byte what the run wrote (checked on the kept rows, whose bytes are stored)."""
    from tasks.report_images import source_images

    cfg = synth_config(None, words=4, words_per_shard=4, sizes=[[512, 512]])
    synthesize(tmp_path / "out", cfg, use_ray=False)
    kept = dict(duckdb.sql(f"SELECT key, image FROM '{tmp_path}/out/shards/*.parquet'").fetchall())
    again = source_images("synth:words/0-4", {*kept, "w999999-000"}, "synth:words", cfg.source, cfg.decode)
    assert {k: again[k] for k in kept} == kept
    assert "not a key" in again["w999999-000"]
