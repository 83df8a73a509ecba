"""A resume never mixes rows scored two ways (issue 23, item 4): a signal of the output that cannot
run on the resuming host, one that could not run then and can now, and other weights at the same
path are refused at start, naming the signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import photo_samples, write_webdataset
from tiny_models import write_aesthetic_head

from schemas.config import CurateConfig
from tasks.runner import STAMP, RunConfigMismatch, run
from tasks.signals.quality import Quality
from tasks.sources import discover

SIGNALS = {"resolution": {}, "sharpness": {}, "quality": {}}


def source(root: Path) -> Path:
    for t in range(2):
        write_webdataset(root / f"{t:05d}.tar", photo_samples(f"{t}"))
    return root


def first_shard_only(src: Path, out: Path, cfg: CurateConfig) -> None:
    """A run killed after one shard, as far as the output is concerned."""
    run(src, out, cfg, use_ray=False, shards=discover(src, cfg.source)[:1])


def test_a_signal_that_cannot_run_on_the_resuming_host_is_refused(tmp_path, monkeypatch):
    src, cfg = source(tmp_path / "src"), CurateConfig(rules={}, signals=SIGNALS)
    first_shard_only(src, tmp_path / "out", cfg)
    stamp = json.loads((tmp_path / "out" / STAMP).read_text())
    assert stamp["left_empty"] == {} and stamp["models"]["quality"].startswith("svm.txt+normalize.pickle@")

    monkeypatch.setattr(Quality, "unavailable", lambda self: "quality: libsvm is not installed")
    with pytest.raises(RunConfigMismatch, match=r"signal quality cannot run here \(quality: libsvm is not installed\)"):
        run(src, tmp_path / "out", cfg, use_ray=False)
    assert len(list((tmp_path / "out" / "_manifest").glob("*.json"))) == 1  # nothing more was written


def test_a_signal_left_empty_then_and_runnable_now_is_refused(tmp_path, monkeypatch):
    src, cfg = source(tmp_path / "src"), CurateConfig(rules={}, signals=SIGNALS)
    with monkeypatch.context() as m:
        m.setattr(Quality, "unavailable", lambda self: "quality: libsvm is not installed")
        first_shard_only(src, tmp_path / "out", cfg)
        assert run(src, tmp_path / "same-host", cfg, use_ray=False).shards_done == 2  # the same host resumes
    with pytest.raises(RunConfigMismatch, match="signal quality was left empty in the output's shards so far"):
        run(src, tmp_path / "out", cfg, use_ray=False)


def test_other_weights_at_the_same_path_are_refused_naming_both(tmp_path):
    pytest.importorskip("torch")
    from tiny_models import tiny_aesthetic_params

    params = tiny_aesthetic_params(tmp_path / "model")
    src = source(tmp_path / "src")
    cfg = CurateConfig(rules={}, signals={"resolution": {}, "aesthetic": params})
    first_shard_only(src, tmp_path / "out", cfg)
    before = json.loads((tmp_path / "out" / STAMP).read_text())["models"]["aesthetic"]

    head = Path(params["mlp_weights"])
    head.rename(tmp_path / "head-kept")
    write_aesthetic_head(head, seed=7)  # retrained head, same path and size
    with pytest.raises(RunConfigMismatch, match="signal aesthetic's model is .* here, " + before.replace("+", r"\+")):
        run(src, tmp_path / "out", cfg, use_ray=False)
    (tmp_path / "head-kept").replace(head)
    assert run(src, tmp_path / "out", cfg, use_ray=False).shards_done == 1  # the weights it was made with


def test_a_stamp_of_an_older_version_is_not_compared(tmp_path, monkeypatch):
    src, cfg = source(tmp_path / "src"), CurateConfig(rules={}, signals=SIGNALS)
    first_shard_only(src, tmp_path / "out", cfg)
    stamp_path = tmp_path / "out" / STAMP
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({k: v for k, v in stamp.items() if k not in ("left_empty", "models")}))
    assert run(src, tmp_path / "out", cfg, use_ray=False).shards_done == 1
