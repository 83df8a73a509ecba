"""`prefect deployment run caption/sidecars` (and `curate/laion` with `caption_config`) against a
real Prefect server and process worker (the stack of tests/test_prefect_flow.py), with the tiny
random models (captioners/tiny.py): sidecars per part, artifacts, a missing model failing the run; and
`synth/words` on the same stack."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import test_prefect_flow as flow_tests
import yaml
from conftest import PHOTOS

from schemas.config import CurateConfig
from tasks.runner import run

ROOT = Path(__file__).resolve().parent.parent
CURATE = {"signals": {"resolution": {}}, "rules": {}, "source": {"folder_chunk": 6}, "output": {"row_group_rows": 4}}
deployment_run, client = flow_tests.deployment_run, flow_tests.client


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from captioners.tiny import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def tiny_yaml(path: Path, models: dict[str, Path], captioner_path: str | None = None) -> Path:
    """configs/recaption-tiny.yaml with absolute model paths (the worker runs elsewhere)."""
    cfg = yaml.safe_load((ROOT / "configs" / "recaption-tiny.yaml").read_text(encoding="utf-8"))
    cfg["captioner"]["path"] = captioner_path or str(models["qwen2-vl"])
    cfg["translator"]["path"] = str(models["marian-ct2"])
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def source(root: Path, images: int = 12) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(images):
        p = PHOTOS[i % len(PHOTOS)]
        (src / f"{i:04d}{p.suffix}").write_bytes(p.read_bytes())
        (src / f"{i:04d}.txt").write_text(f"photo {i} of 故宫", encoding="utf-8")
    return src


def curated(root: Path) -> Path:
    run(source(root), root / "out", CurateConfig.model_validate(CURATE), use_ray=False)
    return root / "out"


def check_sidecars(out: Path) -> int:
    """One sidecar per part, with the part's keys in its order, a caption per row; returns the rows."""
    parts = sorted((out / "shards").glob("*.parquet"))
    assert parts and sorted(p.name for p in (out / "captions").glob("*.parquet")) == [p.name for p in parts]
    for part in parts:
        sidecar = pq.read_table(out / "captions" / part.name)
        assert sidecar.column("key").to_pylist() == pq.read_table(part, columns=["key"]).column("key").to_pylist()
        assert all(sidecar.column("recaption_en").to_pylist()), part.name
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


def latest_run(env: dict):
    with client(env) as c:
        latest = max(c.read_flow_runs(), key=lambda r: r.created)
        return latest, {a.key: a for a in c.read_artifacts()}


def test_caption_deployment_writes_a_sidecar_per_part_and_a_summary(tmp_path: Path, stack, tiny) -> None:
    _, _, env = stack
    out = curated(tmp_path)
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny)
    result = deployment_run(env, f"shards={out}", f"config={cfg}", name="caption/sidecars")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    rows = check_sidecars(out)
    assert rows == 12
    latest, artifacts = latest_run(env)
    assert latest.state.is_completed() and f"holds {rows} rows" in latest.state.message, latest.state.message
    assert {"caption-summary", "caption-progress"} <= artifacts.keys()
    assert f"| rows in the captions set | {rows} |" in artifacts["caption-summary"].data
    assert artifacts["caption-progress"].data == 100.0


def test_curate_deployment_with_a_caption_config_curates_then_captions(tmp_path: Path, stack, tiny) -> None:
    _, _, env = stack
    src = source(tmp_path)
    (tmp_path / "c.yaml").write_text(json.dumps(CURATE))
    caption_cfg = tiny_yaml(tmp_path / "captions.yaml", tiny)
    result = deployment_run(env, f"source={src}", f"out={tmp_path / 'out'}", f"config={tmp_path / 'c.yaml'}",
                            f"caption_config={caption_cfg}")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    assert check_sidecars(tmp_path / "out") == 12
    latest, _ = latest_run(env)
    assert latest.state.is_completed() and "kept 12" in latest.state.message and "captioned" in latest.state.message
    with client(env) as c:
        tasks = {t.name.rsplit("-", 1)[0] for t in c.read_task_runs() if t.flow_run_id == latest.id}
    assert {"curate-shard-group", "finalize", "caption-parts"} <= tasks, tasks


def test_a_missing_captioner_folder_fails_the_run_naming_it_and_writes_nothing(tmp_path: Path, stack,
                                                                               tiny) -> None:
    _, _, env = stack
    out = curated(tmp_path)
    missing = tmp_path / "no-such-model"
    cfg = tiny_yaml(tmp_path / "c.yaml", tiny, captioner_path=str(missing))
    result = deployment_run(env, f"shards={out}", f"config={cfg}", name="caption/sidecars")
    assert result.returncode != 0 and "Failed" in result.stdout, result.stdout[-2000:]
    latest, _ = latest_run(env)
    assert latest.state.is_failed() and f"{missing} does not exist" in latest.state.message, latest.state.message
    assert "Traceback" not in latest.state.message
    assert not (out / "captions").exists()


def test_synth_deployment_renders_words_and_reports_pass_rates(tmp_path: Path, stack) -> None:
    """`prefect deployment run synth/words` (on this module's server: one stack for both flows)."""
    _, _, env = stack
    (tmp_path / "s.yaml").write_text(json.dumps({"synth": {"words_per_shard": 3, "sizes": [[512, 512]]}}))
    result = deployment_run(env, f"out={tmp_path / 'out'}", "words=6", f"config={tmp_path / 's.yaml'}",
                            name="synth/words")
    assert result.returncode == 0 and "Completed" in result.stdout, result.stdout[-2000:]
    latest, artifacts = latest_run(env)
    kept, rejected = (int(x) for x in latest.state.message.removeprefix("kept ").split(", rejected "))
    assert kept + rejected == 6 and kept > 0
    assert len(list((tmp_path / "out" / "shards").glob("*.parquet"))) == 2
    assert "## per layout" in artifacts["synth-pass-rates"].data
    assert artifacts["synth-progress"].data == 100.0
