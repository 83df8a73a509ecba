"""The caption pass end to end: tiny real models (built offline) through Ray into sidecar sets,
from there into DuckDB and the trainer; resume after kill -9; new parts; a changed prompt; missing
weights; faults (fake backends, tests/caption_fakes.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import PHOTOS

from captioners import CAPTIONERS, TRANSLATORS
from captioners.recaption import caption_output
from schemas.config import ConfigError, CurateConfig
from schemas.recaption import RecaptionConfig, load_recaption_config
from tasks.passes import NotCurated, RunAborted
from tasks.runner import run
from tasks.sidecar import SetChanged
from tasks.stats import compute_stats
from trainer.data import CaptionConfig, DataConfig, RowIndex, make_loader, make_sampler

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]

ROOT = Path(__file__).resolve().parent.parent
TINY = yaml.safe_load((ROOT / "configs" / "recaption-tiny.yaml").read_text())
CURATE = {"signals": {"resolution": {}}, "rules": {}, "source": {"folder_chunk": 6}, "output": {"row_group_rows": 4}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from captioners.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def tiny_config(models: dict[str, Path], **sections: Any) -> dict[str, Any]:
    cfg = json.loads(json.dumps(TINY))
    cfg["captioner"]["path"] = str(models["qwen2-vl"])
    cfg["translator"]["path"] = str(models["marian-ct2"])
    for name, value in sections.items():
        cfg[name] = value if not isinstance(value, dict) else {**cfg.get(name, {}), **value}
    return cfg


def fake_config(captioner: dict | None = None, translator: dict | None = None, **sections: Any) -> dict[str, Any]:
    return {"captioner": {"backend": "caption_fakes:FakeCaptioner", **(captioner or {})},
            "translator": {"backend": "caption_fakes:FakeTranslator", **(translator or {})}, **sections}


def curate(root: Path, images: int, start: int = 0, caption: str = "photo {i} of 故宫") -> Path:
    """A curated output of ``images`` photos (6 per part, row groups of 4)."""
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + images):
        p = PHOTOS[i % len(PHOTOS)]
        (src / f"{i:04d}{p.suffix}").write_bytes(p.read_bytes())
        (src / f"{i:04d}.txt").write_text(caption.format(i=i))
    run(src, root / "out", CurateConfig.model_validate(CURATE), use_ray=False)
    return root / "out"


def sidecar_rows(out: Path, name: str = "captions") -> dict[str, dict]:
    rows = {}
    for f in sorted((out / name).glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            rows[r["key"]] = r
    return rows


def test_tiny_models_through_ray_into_sidecars_duckdb_and_the_trainer(tmp_path: Path, tiny, ray_runtime) -> None:
    out = curate(tmp_path, 14)
    shutil.copytree(out, tmp_path / "here")
    summary = caption_output(out, RecaptionConfig.model_validate(tiny_config(tiny)))
    assert (summary.parts_total, summary.parts_done, summary.rows, summary.set_rows) == (3, 3, 14, 14)
    assert summary.errors == {} and summary.failed == {}
    recaption = summary.model_batches["recaption"]  # rows 14, requests of 4 rows from each row group of 4 or 2
    assert 14 / TINY["stages"]["recaption"]["batch_size"] <= recaption["batches"] <= 14
    assert recaption["merged"] <= recaption["batches"]

    for part in sorted((out / "shards").glob("*.parquet")):  # one sidecar per part, row for row, group for group
        side = pq.ParquetFile(out / "captions" / part.name)
        shard = pq.ParquetFile(part)
        assert side.read(columns=["key"]).column("key") == shard.read(columns=["key"]).column("key")
        assert ([side.metadata.row_group(g).num_rows for g in range(side.num_row_groups)]
                == [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
        entry = json.loads((out / "captions" / "_manifest" / f"{part.stem}.json").read_text())
        assert entry["rows"] == shard.metadata.num_rows
    rows = sidecar_rows(out)
    assert len(rows) == 14
    for r in rows.values():
        assert r["recaption_en"] and r["recaption_zh"] and r["caption_error"] is None
        assert r["caption_model"].startswith("transformers:qwen2-vl@")
        assert r["translate_model"].startswith("ctranslate2:marian-ct2@")
        assert 0 < r["caption_tokens"] <= TINY["captioner"]["max_new_tokens"]
        assert r["translate_tokens"] > 0 and len(r["prompt_hash"]) == 16
    assert not list((out / "captions").glob("_partial/*"))

    # the same captions without Ray: greedy decoding, whatever the pool merged into a batch
    caption_output(tmp_path / "here", RecaptionConfig.model_validate(tiny_config(tiny)), use_ray=False)
    here = sidecar_rows(tmp_path / "here")
    assert {k: r["recaption_en"] for k, r in here.items()} == {k: r["recaption_en"] for k, r in rows.items()}

    joined = duckdb.sql(f"SELECT s.key, c.recaption_zh FROM '{out}/shards/*.parquet' s "
                        f"JOIN '{out}/captions/**/*.parquet' c USING (key)").fetchall()
    assert sorted(joined) == sorted((k, r["recaption_zh"]) for k, r in rows.items())

    cfg = DataConfig(shards=[str(out)], resolution=64, batch_size=2, bucketed=False,
                     caption=CaptionConfig(language="zh", dropout=0.0))
    index = RowIndex.build(cfg)
    assert all(s and s.endswith(".parquet") for s in index.sidecars)
    sampler = make_sampler(index, cfg)
    prompts = {k: p for batch in make_loader(index, sampler, cfg) for k, p in zip(batch["keys"], batch["prompts"],
                                                                                    strict=True)}
    machine = {k for k, p in prompts.items() if p == rows[k]["recaption_zh"]}
    original = {k for k, p in prompts.items() if p.startswith("photo ")}
    assert machine and original and machine | original == set(prompts)  # the 50:50 mix really picks both


def test_kill_dash_nine_mid_pass_then_rerun_gives_the_uninterrupted_captions(tmp_path: Path, tiny) -> None:
    out = curate(tmp_path, 48)
    shutil.copytree(out, tmp_path / "ref")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tiny), allow_unicode=True))
    cmd = [sys.executable, "-m", "t2i.cli", "caption", "--config", str(tmp_path / "c.yaml"), "--no-ray"]
    subprocess.run([*cmd, "--shards", str(tmp_path / "ref")], check=True, capture_output=True)

    proc = subprocess.Popen([*cmd, "--shards", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "captions" / "_manifest").glob("*.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((out / "captions" / "_manifest").glob("*.json")))
    assert 1 <= done_at_kill < 8, "the kill must land mid-pass"

    resumed = subprocess.run([*cmd, "--shards", str(out)], check=True, capture_output=True, text=True)
    summary = json.loads(resumed.stdout)
    assert summary["parts_skipped"] == done_at_kill and summary["parts_done"] == 8 - done_at_kill
    assert sidecar_rows(out) == sidecar_rows(tmp_path / "ref")
    assert summary["set_rows"] == 48 and not list((out / "captions").glob("_partial/*"))


def test_a_killed_part_resumes_from_its_row_group_checkpoints(tmp_path: Path) -> None:
    out = curate(tmp_path, 6)
    cfg = RecaptionConfig.model_validate(fake_config())
    caption_output(out, cfg, use_ray=False)
    reference = sidecar_rows(out)
    part = next((out / "shards").glob("*.parquet")).stem
    side = out / "captions" / f"{part}.parquet"
    # as a kill after two row groups of this part would leave it: checkpoints, no sidecar, no entry
    ckpt = out / "captions" / "_partial" / part / f"size-{(out / 'shards' / f'{part}.parquet').stat().st_size}"
    ckpt.mkdir(parents=True)
    table = pq.read_table(side)
    pq.write_table(table.slice(0, 4), ckpt / "g00000.parquet")
    pq.write_table(table.slice(4, 2), ckpt / "g00001.parquet")
    (ckpt / "g00001.parquet").write_bytes(b"torn")  # a half-written checkpoint is done again
    stale = ckpt.parent / "size-1"  # the same keys from another version of the part: never taken for this one
    stale.mkdir()
    bogus = table.slice(4, 2).set_column(1, "recaption_en", pa.array(["stale", "stale"], pa.string()))
    pq.write_table(bogus, stale / "g00001.parquet")
    side.unlink()
    (out / "captions" / "_manifest" / f"{part}.json").unlink()
    summary = caption_output(out, cfg, use_ray=False)
    assert summary.parts_done == 1 and summary.resumed_groups == 1
    assert sidecar_rows(out) == reference and not stale.exists()


def test_new_parts_are_captioned_alone_and_a_gone_part_loses_its_sidecar(tmp_path: Path) -> None:
    out = curate(tmp_path, 12)
    cfg = RecaptionConfig.model_validate(fake_config())
    first = caption_output(out, cfg, use_ray=False)
    assert (first.parts_done, first.rows) == (2, 12)
    curate(tmp_path, 6, start=12)  # a later curate run adds a part
    again = caption_output(out, cfg, use_ray=False)
    assert (again.parts_skipped, again.parts_done, again.rows, again.set_rows) == (2, 1, 6, 18)

    gone = sorted((out / "shards").glob("*.parquet"))[0]
    gone.unlink()  # as recurating a changed source would replace it
    orphan = out / "captions" / "_partial" / "lost-part" / "g00000.parquet"  # a part gone mid-pass
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"PAR1")
    done = sorted((out / "shards").glob("*.parquet"))[-1].stem  # as a kill after its commit, before its clean-up
    leftover = out / "captions" / "_partial" / done / "g00000.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"PAR1")
    caption_output(out, cfg, use_ray=False)
    assert not orphan.parent.exists() and not leftover.parent.exists()
    assert not (out / "captions" / gone.name).exists()
    assert not (out / "captions" / "_manifest" / f"{gone.stem}.json").exists()
    assert set(sidecar_rows(out)) == {k for f in (out / "shards").glob("*.parquet")
                                      for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}


def test_a_changed_part_is_captioned_again(tmp_path: Path) -> None:
    out = curate(tmp_path, 6)
    cfg = RecaptionConfig.model_validate(fake_config())
    caption_output(out, cfg, use_ray=False)
    part = next((out / "shards").glob("*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table.slice(1), part)  # the key pass dropped a row, say
    summary = caption_output(out, cfg, use_ray=False)
    assert summary.parts_done == 1
    assert list(sidecar_rows(out)) == table.column("key").to_pylist()[1:]


def test_a_changed_prompt_is_refused_naming_it_and_a_new_set_goes_beside(tmp_path: Path) -> None:
    out = curate(tmp_path, 6)
    caption_output(out, RecaptionConfig.model_validate(fake_config()), use_ray=False)
    before = sidecar_rows(out)
    changed = fake_config({"prompt": "Describe the image briefly.{ocr_hint}"})
    with pytest.raises(SetChanged, match=r"captioner\.prompt"):
        caption_output(out, RecaptionConfig.model_validate(changed), use_ray=False)
    assert sidecar_rows(out) == before  # not a mix
    caption_output(out, RecaptionConfig.model_validate({**changed, "output": {"name": "captions-brief"}}),
                   use_ray=False)
    brief = sidecar_rows(out, "captions-brief")
    assert set(brief) == set(before)
    assert {r["prompt_hash"] for r in brief.values()}.isdisjoint({r["prompt_hash"] for r in before.values()})
    # how the work runs may change freely
    faster = fake_config(stages={"recaption": {"request_rows": 2, "batch_size": 4}}, run={"workers": 1})
    assert caption_output(out, RecaptionConfig.model_validate(faster), use_ray=False).parts_skipped == 1


def test_moved_weights_are_the_same_set_and_changed_weights_are_not(tmp_path: Path, tiny) -> None:
    moved = tmp_path / "other-disk" / "qwen2-vl"
    shutil.copytree(tiny["qwen2-vl"], moved)
    a = RecaptionConfig.model_validate(tiny_config(tiny)).set_definition()
    b = RecaptionConfig.model_validate(tiny_config(tiny, captioner={**TINY["captioner"], "path": str(moved)}))
    assert b.set_definition() == a
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("}", ', "x": 1}', 1))
    assert b.set_definition()["captioner"]["model"] != a["captioner"]["model"]


def test_missing_weights_fail_in_seconds_naming_the_path_and_write_nothing(tmp_path: Path, tiny) -> None:
    out = curate(tmp_path, 6)
    cfg = tiny_config(tiny, captioner={**TINY["captioner"], "path": str(tmp_path / "no-such-model")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "t2i.cli", "caption", "--shards", str(out), "--config",
                             str(tmp_path / "c.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tmp_path / 'no-such-model'} does not exist" in result.stderr
    assert time.time() - started < 60 and not (out / "captions").exists()
    cfg = tiny_config(tiny, translator={**TINY["translator"], "path": str(tmp_path / "no-mt")})
    with pytest.raises(ConfigError, match="no-mt"):
        caption_output(out, RecaptionConfig.model_validate(cfg), use_ray=False)


def test_bad_configs_and_outputs_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"captioner\.backend must be one of"):
        RecaptionConfig.model_validate({"captioner": {"backend": "gpt"}})
    with pytest.raises(ValueError, match="max_new_tokens"):
        RecaptionConfig.model_validate(fake_config({"max_new_tokens": 0}))
    with pytest.raises(ValueError, match="not a caption set name"):
        RecaptionConfig.model_validate(fake_config(output={"name": "shards"}))
    with pytest.raises(ValueError, match="unknown stage"):
        RecaptionConfig.model_validate(fake_config(stages={"recaptoin": {}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotCurated, match="not a t2i curate output"):
        caption_output(tmp_path / "empty", RecaptionConfig.model_validate(fake_config()), use_ray=False)


def test_a_row_the_model_raises_on_gets_its_error_and_the_pass_goes_on(tmp_path: Path) -> None:
    out = curate(tmp_path, 12)
    cfg = RecaptionConfig.model_validate(fake_config({"fail_on_caption": "photo 3 "}))
    summary = caption_output(out, cfg, use_ray=False)
    rows = sidecar_rows(out)
    assert len(rows) == 12 and summary.errors == {"recaption": 1}
    bad = rows["0003"]
    assert bad["recaption_en"] is None and bad["recaption_zh"] is None
    assert bad["caption_error"] == "recaption: ValueError: cannot caption 'photo 3 of 故宫'"
    assert all(r["recaption_zh"] and r["caption_error"] is None for k, r in rows.items() if k != "0003")
    figures = compute_stats(out)["caption_sets"]["captions"]
    assert (figures["rows"], figures["captioned"], figures["errors"], figures["translated"]) == (12, 11, 1, 11)
    assert figures["of_kept"] == 1.0


def test_a_model_failing_on_most_rows_fails_the_pass_loudly_and_commits_nothing(tmp_path: Path, ray_runtime) -> None:
    out = curate(tmp_path, 12)
    cfg = RecaptionConfig.model_validate(fake_config({"fail_always": True}))
    with pytest.raises(RunAborted, match=r"stage recaption failed on \d+ of the \d+ rows"):
        caption_output(out, cfg, use_ray=False)
    with pytest.raises(RunAborted, match="stage recaption failed"):
        caption_output(out, cfg)  # through Ray: the part task's failure stops the pass
    assert not list((out / "captions").glob("*.parquet"))
    assert not list((out / "captions" / "_manifest").glob("*.json"))


def test_out_of_memory_splits_the_batch_and_every_row_is_captioned(tmp_path: Path, ray_runtime) -> None:
    out = curate(tmp_path, 12)
    cfg = RecaptionConfig.model_validate(fake_config({"oom_above": 1}, stages={"recaption": {"batch_size": 8}}))
    summary = caption_output(out, cfg)
    assert summary.errors == {} and summary.rows == 12
    assert all(r["recaption_en"] for r in sidecar_rows(out).values())


def test_huge_and_empty_captions_and_an_image_the_model_cannot_take(tmp_path: Path) -> None:
    out = curate(tmp_path, 6)
    part = next((out / "shards").glob("*.parquet"))
    table = pq.read_table(part).to_pylist()
    table[0]["caption"] = "x" * 2**20  # 1 MB
    table[1]["caption"] = ""
    table[2]["caption"] = None
    table[3]["image"] = b"<html>not an image</html>"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(part)), part, row_group_size=4)
    seen = tmp_path / "seen.txt"
    summary = caption_output(out, RecaptionConfig.model_validate(fake_config({"seen_file": str(seen)})), use_ray=False)
    rows = sidecar_rows(out)
    assert len(rows) == 6 and summary.errors == {"recaption": 1}
    assert max(int(n) for n in seen.read_text().split()) == 2000  # the 1 MB caption was cut to max_caption_chars
    assert rows[table[3]["key"]]["caption_error"].startswith("recaption: DecodeError: undecodable")
    assert rows[table[1]["key"]]["recaption_en"] and rows[table[2]["key"]]["recaption_en"]


def test_quoted_text_and_nouns_survive_translation_or_the_row_is_flagged(tmp_path: Path) -> None:
    out = curate(tmp_path, 6, caption="故宫 photo {i}")
    ocr = fake_config(protect={"nouns": ["mean colour"]})
    caption_output(out, RecaptionConfig.model_validate(ocr), use_ray=False)
    rows = sidecar_rows(out)
    for r in rows.values():
        assert "mean colour" in r["recaption_en"] and r["spans_kept"] is True
        assert "mean colour" in r["recaption_zh"] and "⟦" not in r["recaption_zh"]
    lossy = fake_config({}, {"drop_placeholders": True}, protect={"nouns": ["mean colour"]},
                        output={"name": "lossy"})
    caption_output(out, RecaptionConfig.model_validate(lossy), use_ray=False)
    assert all(r["spans_kept"] is False for r in sidecar_rows(out, "lossy").values())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("recaption-*.yaml")), ids=lambda p: p.name)
def test_every_shipped_caption_config_validates(path: Path) -> None:
    cfg = load_recaption_config(path)
    assert cfg.captioner["backend"] in CAPTIONERS and cfg.translator["backend"] in TRANSLATORS
    assert Path(cfg.captioner["path"]).is_absolute()
    assert cfg.set_definition()["captioner"]["model"].startswith(cfg.captioner["backend"] + ":")


def test_a_curated_output_on_s3_gets_the_same_sidecars_as_a_local_one(tmp_path: Path, s3: S3Bucket,
                                                                      ray_runtime) -> None:
    from test_s3_curate import connect, upload

    out = curate(tmp_path, 12)
    (out / "_lock").unlink()  # the local run's lock file: on S3 it would read as another run's lease
    url = upload(out, s3, "curated")
    keys = {"endpoint_url": s3.endpoint_url, "region": s3.region, "access_key_id": s3.access_key,
            "secret_access_key": s3.secret_key}
    remote = caption_output(url, RecaptionConfig.model_validate(fake_config(storage=keys)))
    local = caption_output(out, RecaptionConfig.model_validate(fake_config()), use_ray=False)
    assert (remote.parts_done, remote.rows) == (local.parts_done, local.rows) == (2, 12)
    joined = connect(s3).sql(f"SELECT key, recaption_zh FROM '{url}/shards/*.parquet' "
                             f"JOIN '{url}/captions/*.parquet' USING (key) ORDER BY key").fetchall()
    assert joined == sorted((k, r["recaption_zh"]) for k, r in sidecar_rows(out).items())
    again = caption_output(url, RecaptionConfig.model_validate(fake_config(storage=keys)))
    assert again.parts_skipped == 2 and again.parts_done == 0
    assert secret_free(s3, keys["secret_access_key"])


def secret_free(s3: S3Bucket, secret: str) -> bool:
    """No object of the bucket holds the secret key (the set's stamp dumps it as ******)."""
    fs = s3.filesystem()
    from pyarrow import fs as pafs

    for info in fs.get_file_info(pafs.FileSelector(s3.path(""), recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as fh:
                if secret.encode() in fh.read():
                    return False
    return True


def test_the_readme_caption_queries_run_on_a_captioned_output(tmp_path: Path) -> None:
    from test_readme_queries import readme_block

    out = curate(tmp_path, 12)
    caption_output(out, RecaptionConfig.model_validate(fake_config({"fail_on_caption": "photo 5 "})), use_ray=False)
    queries = [q.strip() for q in readme_block("machine captions next to the originals").split(";") if "SELECT" in q]
    assert len(queries) == 2
    con = duckdb.connect()
    side_by_side, per_model = (con.sql(q.replace("'out/", f"'{out}/")).fetchall() for q in queries)
    rows = sidecar_rows(out)
    assert len(side_by_side) == 10 and all(zh == rows[k]["recaption_zh"] for k, _, zh, _ in side_by_side)
    # the row the model raised on has no caption and so no model: it groups apart, with its error
    assert sorted(per_model, key=str) == sorted([(rows["0000"]["caption_model"], 11, 0, 0, 0), (None, 1, 1, 0, 0)],
                                                key=str)


def test_the_rows_ocr_text_reaches_the_captioner_and_stays_verbatim_in_chinese(tmp_path: Path) -> None:
    out = curate(tmp_path, 6)
    part = next((out / "shards").glob("*.parquet"))
    table = pq.read_table(part)
    ocr = ["春节快乐", None, "SALE 50%", "", "故宫", "Hello “world”"]
    pq.write_table(table.append_column("ocr_text", pa.array(ocr, pa.string())), part, row_group_size=4)
    caption_output(out, RecaptionConfig.model_validate(fake_config()), use_ray=False)
    rows = [sidecar_rows(out)[k] for k in table.column("key").to_pylist()]
    for r, text in zip(rows, ocr, strict=True):
        if text:
            assert f'with the text "{text}"' in r["recaption_en"]
            assert text in r["recaption_zh"] and r["spans_kept"] is True
        else:
            assert "with the text" not in r["recaption_en"] and r["spans_kept"] is None
    assert "“春节快乐”" in rows[0]["recaption_zh"]


def test_a_resumed_part_counts_its_checkpointed_errors_as_rows_tried(tmp_path: Path) -> None:
    """3 of a part's 6 rows fail (not most of them), all 3 in its first row group: resumed from that
    group's checkpoint, the part still completes with the same 3 errors (a checkpoint's rows count as tried)."""
    out = curate(tmp_path, 6)
    part = next((out / "shards").glob("*.parquet"))
    rows = pq.read_table(part).to_pylist()
    for r in rows[:3]:
        r["caption"] = "BAD"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part, row_group_size=4)
    cfg = RecaptionConfig.model_validate(fake_config({"fail_on_caption": "BAD"}))
    assert caption_output(out, cfg, use_ray=False).errors == {"recaption": 3}
    reference = sidecar_rows(out)
    ckpt = out / "captions" / "_partial" / part.stem / f"size-{part.stat().st_size}"
    ckpt.mkdir(parents=True)
    pq.write_table(pq.read_table(out / "captions" / part.name).slice(0, 4), ckpt / "g00000.parquet")
    (out / "captions" / part.name).unlink()  # as a kill after the first row group leaves it
    (out / "captions" / "_manifest" / f"{part.stem}.json").unlink()
    again = caption_output(out, cfg, use_ray=False)
    assert again.resumed_groups == 1 and again.errors == {"recaption": 3} and again.failed == {}
    assert sidecar_rows(out) == reference
