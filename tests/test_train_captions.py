"""The trainer says what it mixes: how many selected rows have a machine caption in the language,
the expected original/machine share, a warning where the mix is originals only though machine
captions are asked for, and an error, before any model loads, for a caption set the config names
that does not exist. On real curated outputs captioned by the real pass (fake caption backends,
tests/caption_fakes.py), and on plain shards checked against the prompts the loader delivers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from test_caption_pass import curate, fake_config
from test_train_data import epoch, row, write_shard

from captioners.recaption import caption_output
from schemas.recaption import RecaptionConfig
from trainer.caption_mix import CaptionMix, caption_mix, check_caption_set
from trainer.config import ScaleConfig, load_train_config
from trainer.data import DataConfig, RowIndex
from trainer.distributed import run_training
from trainer.loop import train

ENGLISH_ONLY = {**fake_config(), "translator": None}


def caption(out: Path, cfg: dict[str, Any] | None = None) -> Path:
    """``out`` with a caption set written by the real pass (fake backends; Chinese by default)."""
    caption_output(out, RecaptionConfig.model_validate(cfg or fake_config()), use_ray=False)
    return out


def data(out: Path, **caption_cfg: Any) -> DataConfig:
    return DataConfig.model_validate({"shards": [str(out)], "resolution": 64, "bucketed": False, "batch_size": 1,
                                      "caption": caption_cfg})


def mix_of(cfg: DataConfig) -> CaptionMix:
    index = RowIndex.build(cfg)
    return caption_mix(index, cfg.caption, check_caption_set(index.files, cfg.caption))


def test_a_captioned_output_reports_its_rows_and_the_share(tmp_path: Path, caplog) -> None:
    out = caption(curate(tmp_path, 12))
    mix = mix_of(data(out))
    assert (mix.rows, mix.machine_rows, mix.synthetic_rows, mix.sidecar_parts, mix.column_parts) == (12, 12, 0, 2, 2)
    assert (mix.original_share, mix.machine_share, mix.warning) == (0.5, 0.5, None)
    assert mix.sets == ["captions"] and mix.column == "recaption_zh"
    assert mix_of(data(out, machine_probability=0.2)).machine_share == 0.2

    curate(tmp_path, 6, start=12)  # a later curate run adds a part the caption pass has not seen
    mix = mix_of(data(out))
    assert (mix.rows, mix.machine_rows, mix.sidecar_parts) == (18, 12, 2)
    assert mix.machine_share == round(0.5 * 12 / 18, 4) and mix.warning is None
    caplog.set_level(logging.INFO, logger="trainer.caption_mix")
    cfg = load_train_config(None, model={"path": str(tmp_path / "no-model")}, data={"shards": [str(out)]})
    with pytest.raises(FileNotFoundError):  # the data is fine: the report comes, then the model fails
        train(cfg, tmp_path / "run")
    said = [r for r in caplog.records if r.name == "trainer.caption_mix"]
    assert [r.levelno for r in said] == [logging.INFO]
    assert "12 of 18 selected rows have a zh machine caption" in said[0].message
    assert "original:machine 67%:33%" in said[0].message


def test_no_caption_set_is_a_warning_by_default_and_an_error_when_named(tmp_path: Path, caplog) -> None:
    out = curate(tmp_path, 12)
    mix = mix_of(data(out))  # the default set, missing: curate then train still works, and says so
    assert (mix.rows, mix.machine_rows, mix.original_share, mix.machine_share) == (12, 0, 1.0, 0.0)
    assert "no caption set 'captions'" in mix.warning and "sidecar sets there: none" in mix.warning
    with pytest.raises(ValueError, match=r"data\.caption\.sidecar_set: no caption set 'captions'.*none \(run t2i"):
        mix_of(data(out, sidecar_set="captions"))
    originals = mix_of(data(out, sidecar_set="captions", machine_probability=0))  # originals only, on purpose
    assert (originals.original_share, originals.warning) == (1.0, None)

    caption(out, fake_config(output={"name": "captions-brief"}))  # a set under another name
    assert "sidecar sets there: captions-brief" in mix_of(data(out)).warning
    with pytest.raises(ValueError, match=r"no caption set 'captions-v2'.*sets there: captions-brief\."):
        mix_of(data(out, sidecar_set="captions-v2"))
    assert mix_of(data(out, sidecar_set="captions-brief")).machine_rows == 12

    caplog.set_level(logging.INFO, logger="trainer.caption_mix")
    run = tmp_path / "run"
    cfg = load_train_config(None, model={"preset": "tiny"}, data={"shards": [str(out)],
                                                                   "caption": {"sidecar_set": "captions"}})
    with pytest.raises(ValueError, match="no caption set 'captions'"):
        train(cfg, run)
    assert not (run / "base").exists()  # the tiny preset's models were never built
    with pytest.raises(ValueError, match="no caption set 'captions'"):  # under Ray Train: before any worker
        run_training(cfg.model_copy(update={"scale": ScaleConfig(workers=2)}), run)
    assert not (run / "ray").exists() and not (run / "base").exists()
    cfg = load_train_config(None, model={"path": str(tmp_path / "no-model")}, data={"shards": [str(out)]})
    with pytest.raises(FileNotFoundError):
        train(cfg, run)
    warned = [r for r in caplog.records if r.name == "trainer.caption_mix"]
    assert [r.levelno for r in warned] == [logging.WARNING]
    assert "0 of 12 selected rows" in warned[0].message and "(100:0)" in warned[0].message


def test_an_english_only_set_gives_no_chinese_captions_and_says_so(tmp_path: Path) -> None:
    out = caption(curate(tmp_path, 12), ENGLISH_ONLY)
    zh = mix_of(data(out))
    assert (zh.rows, zh.machine_rows, zh.sidecar_parts, zh.column_parts, zh.original_share) == (12, 0, 2, 0, 1.0)
    assert "holds no recaption_zh column" in zh.warning and "English-only" in zh.warning
    en = mix_of(data(out, language="en"))
    assert (en.machine_rows, en.machine_share, en.column, en.warning) == (12, 0.5, "recaption_en", None)


def test_the_report_counts_what_the_loader_delivers(tmp_path: Path) -> None:
    """Plain shards with their own machine columns: synthetic rows, a blank machine caption, a
    missing one, rows with no original caption, a file with no machine column at all. With
    machine_probability 1 (or 0) and no dropout the share is exactly what one epoch's prompts are."""
    rows = [row(i, recaption_zh=f"中文 {i}", synthetic=i % 4 == 0) for i in range(16)]
    rows[1]["recaption_zh"], rows[3]["recaption_zh"] = "  \n", None
    rows[2]["caption"] = rows[6]["caption"] = None  # machine caption only
    rows[5]["caption"] = " "
    write_shard(tmp_path / "d" / "a.parquet", rows)
    write_shard(tmp_path / "d" / "b.parquet", [row(i) for i in range(16, 24)])
    for p in (1.0, 0.0):
        cfg = data(tmp_path / "d", machine_probability=p, dropout=0.0)
        index = RowIndex.build(cfg)
        mix = caption_mix(index, cfg.caption, check_caption_set(index.files, cfg.caption))
        prompts = [prompt for b in epoch(index, cfg) for prompt in b["prompts"]]
        machine = sum(prompt.startswith("中文") for prompt in prompts)
        assert (mix.rows, mix.synthetic_rows, mix.machine_rows, mix.machine_only_rows) == (24, 4, 10, 3)
        assert len(prompts) == 24 and mix.machine_share == round(machine / 24, 4), p
        assert mix.warning is None and mix.sets == []
    report = json.loads(json.dumps(mix.__dict__))  # what train-result.json carries
    assert report["machine_share"] == round(3 / 24, 4) and report["report"].startswith("captions: 10 of 24")
