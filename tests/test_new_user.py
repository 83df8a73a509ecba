"""What a new user runs into in the first hour (issue 11), each checked on a real run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from conftest import PHOTOS, photo_samples, write_webdataset

from schemas.config import CurateConfig, SourceConfig
from tasks.runner import run
from tasks.sources import discover, read_shard

CHEAP = "signals: {resolution: {}, caption: {}}\n"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], capture_output=True, text=True)


def folder_source(root: Path, n: int = 3, caption: str = "a photo\n") -> Path:
    for p in PHOTOS[:n]:
        (root / p.name).parent.mkdir(parents=True, exist_ok=True)
        (root / p.name).write_bytes(p.read_bytes())
        (root / p.name).with_suffix(".txt").write_text(caption)
    return root


def test_a_source_mixing_tars_and_images_says_what_it_left_out(tmp_path, caplog):
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    folder_source(tmp_path / "src" / "loose", n=2)
    with caplog.at_level(logging.WARNING, logger="tasks.sources"):
        shards = discover(tmp_path / "src", SourceConfig())
    assert [s.kind for s in shards] == ["webdataset"]
    assert "reading its 1 .tar files as webdataset; left out 2 image files" in caplog.text


def test_img2dataset_sidecar_parquet_beside_tars_is_not_a_warning(tmp_path, caplog):
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"key": ["x"]}), tmp_path / "src" / "00000.parquet")
    with caplog.at_level(logging.INFO, logger="tasks.sources"):
        discover(tmp_path / "src", SourceConfig())
    assert "left out 1 .parquet files" in caplog.text
    assert all(r.levelno < logging.WARNING for r in caplog.records if r.name == "tasks.sources")


def test_an_output_inside_a_folder_source_is_refused_before_anything_is_written(tmp_path):
    src = folder_source(tmp_path / "photos")
    (tmp_path / "c.yaml").write_text(CHEAP)
    result = cli("curate", "--source", str(src), "--out", str(src / "curated"), "--config", str(tmp_path / "c.yaml"),
                 "--no-ray")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --out ") and "inside the folder source" in \
        result.stderr
    assert not (src / "curated").exists()


def test_a_rerun_with_everything_done_reports_the_outputs_totals(tmp_path):
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    cfg = CurateConfig.model_validate({"signals": {"resolution": {}, "caption": {}}})
    first = run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)
    again = run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)
    assert (again.shards_done, again.kept, again.rejected) == (0, 0, 0)  # this run did nothing
    assert (again.output_kept, again.output_rejected) == (first.kept, first.rejected) == \
        (first.output_kept, first.output_rejected)
    assert first.kept + first.rejected == len(PHOTOS)


def test_a_resume_refused_for_a_changed_setting_names_it(tmp_path):
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    (tmp_path / "a.yaml").write_text(CHEAP)
    (tmp_path / "b.yaml").write_text(CHEAP + "source: {unreadable: salvage}\n")
    base = ["curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-ray", "--config"]
    assert cli(*base, str(tmp_path / "a.yaml")).returncode == 0
    refused = cli(*base, str(tmp_path / "b.yaml"))
    assert refused.returncode == 2 and "differs in source.unreadable" in refused.stderr, refused.stderr


def test_stats_on_a_folder_that_is_not_an_output_is_an_error(tmp_path):
    folder_source(tmp_path / "photos")
    result = cli("stats", str(tmp_path / "photos"))
    assert result.returncode == 2 and "is not a t2i curate or analyze output" in result.stderr
    assert result.stdout == ""


def test_folder_captions_lose_a_trailing_newline_only(tmp_path):
    src = folder_source(tmp_path / "photos", n=2, caption="a cat\non a mat\n")
    (src / PHOTOS[1].name).with_suffix(".txt").write_text("windows line end\r\n")
    shards = discover(src, SourceConfig())
    captions = [c for s in shards for b in read_shard(s, SourceConfig()) for c in b.column("caption").to_pylist()]
    assert sorted(captions) == ["a cat\non a mat", "windows line end"]


def test_summary_json_has_the_totals(tmp_path):
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    (tmp_path / "c.yaml").write_text(CHEAP)
    args = ["curate", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-ray", "--config",
            str(tmp_path / "c.yaml")]
    first, again = json.loads(cli(*args).stdout), json.loads(cli(*args).stdout)
    assert again["output_kept"] == first["kept"] and again["output_rejected"] == first["rejected"]


def test_the_readme_config_block_is_a_valid_config_with_the_codes_defaults():
    """The README's annotated config is what the code reads: it validates, and each value it shows
    for source, decode, output and run is the default (a user copying it changes nothing)."""
    import re

    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "signals:" in b and "rules:" in b)
    shown = yaml.safe_load(block)
    cfg = CurateConfig.model_validate(shown)
    defaults = CurateConfig().model_dump()
    for section in ("source", "decode", "output", "run"):
        for key, value in (shown.get(section) or {}).items():
            assert defaults[section][key] == value, f"README shows {section}.{key}: {value}"
    assert cfg.source.unreadable == "fail" and "salvage" in block
