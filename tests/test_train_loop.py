"""The training loop on the tiny preset, from real curated shards: it trains, checkpoints, resumes
exactly after a kill -9, exports a folder KolorsPipeline loads and samples, and runs under Ray
Train with two gloo workers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import photo_samples, write_webdataset
from safetensors.torch import load_file

from schemas.config import ConfigError, CurateConfig
from tasks.runner import run
from trainer.checkpoint import latest_checkpoint, list_checkpoints
from trainer.config import load_train_config
from trainer.export import load_pipeline
from trainer.loop import LOSS_LOG, RESULT_FILE, Conditioning, diffusion_loss, train
from trainer.schedules import scheduler_for_stage

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`t2i analyze` output of the test photos (cheap signals only): what a user trains on first."""
    root = tmp_path_factory.mktemp("analyzed")
    source = write_webdataset(root / "src" / "00000.tar", photo_samples())
    cfg = CurateConfig(signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}}, rules={})
    run(source.parent, root / "out", cfg, mode="analyze", use_ray=False)
    return root / "out"


def tiny_config(shards: Path, **extra):
    data = {"shards": [str(shards)], "resolution": 64, "bucketed": False, "batch_size": 2,
            **extra.pop("data", {})}
    base = {"stage": "concept", "model": {"preset": "tiny"}, "data": data, "steps": 4, "checkpoint_every": 2,
            "log_every": 1, "sample_steps": 1, "sample_prompts": ["一只猫"], "optim": {"lr": 1e-3, "grad_accum": 2},
            "ema_decay": 0.9}
    return load_train_config(None, **{**base, **extra})


def unet_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / LOSS_LOG).read_text().splitlines())]


def test_stage_defaults_follow_the_recipe(tmp_path: Path) -> None:
    concept = load_train_config(None, stage="concept", model={"path": "/nonexistent"})
    quality = load_train_config(None, stage="quality", model={"path": "/nonexistent"})
    assert (concept.data.resolution, concept.data.bucketed, concept.data.min_short_side) == (512, False, None)
    assert (quality.data.resolution, quality.data.bucketed, quality.data.min_short_side) == (1024, True, 1024)
    tiny = load_train_config(None, stage="quality", model={"preset": "tiny"})
    assert (tiny.data.resolution, tiny.data.bucketed, tiny.data.min_short_side) == (128, True, None)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"stage": "quality", "data": {"resolution": 768}, "model": {"preset": "tiny"}}))
    assert load_train_config(path).data.resolution == 768  # the file wins over stage and preset defaults
    assert load_train_config(path, data={"resolution": 256}).data.resolution == 256  # a flag wins over the file


@pytest.mark.parametrize("bad", [{"stage": "final"}, {"lerning_rate": 1}, {"model": {"preset": "tiny", "path": "x"}},
                                 {"optim": {"grad_accum": 0}}])
def test_bad_config_is_a_clear_error(tmp_path: Path, bad: dict) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"train\.yaml"):
        load_train_config(path)


def test_missing_model_folder_names_the_path(tmp_path: Path, shards: Path) -> None:
    cfg = load_train_config(None, model={"path": str(tmp_path / "kolors")}, data={"shards": [str(shards)]})
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "kolors"))):
        train(cfg, tmp_path / "run")


def test_min_snr_weighting_downweights_easy_timesteps() -> None:
    """With a predictor that outputs zeros the per-sample MSE is the noise's power, so the weighted
    loss must equal it times min(snr, gamma) / snr at the drawn timesteps."""
    sched = scheduler_for_stage("concept")
    zero = lambda x, t, e, added_cond_kwargs, return_dict: (torch.zeros_like(x),)  # noqa: E731
    latents = torch.zeros(16, 4, 8, 8)
    cond = Conditioning(torch.zeros(16, 3, 8), torch.zeros(16, 8), torch.zeros(16, 6))
    plain = diffusion_loss(zero, sched, latents, cond, torch.Generator().manual_seed(1), None, None)
    weighted = diffusion_loss(zero, sched, latents, cond, torch.Generator().manual_seed(1), 5.0, None)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    ab = sched.alphas_cumprod[t]
    snr = ab / (1 - ab)
    expected = (noise.pow(2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr).mean()
    assert plain.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted.item() < plain.item()


def test_trains_checkpoints_exports_and_kolors_pipeline_samples(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "run"
    result = train(tiny_config(shards, stage="quality", data={"bucketed": True}), out)
    assert result.steps == 4 and result.resumed_from == 0
    assert [c.step for c in list_checkpoints(out)] == [2, 4]
    # `t2i analyze` output, no caption pass: the run says it trained on originals only
    assert json.loads((out / RESULT_FILE).read_text())["captions"] == result.captions
    assert (result.captions["machine_rows"], result.captions["original_share"]) == (0, 1.0)
    assert result.captions["rows"] > 0 and "no caption set 'captions'" in result.captions["warning"]
    assert (out / "checkpoints" / "step-000004" / "samples" / "00.png").is_file()
    base = load_file(out / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = unet_weights(out)
    assert any(not torch.equal(base[k], trained[k]) for k in base), "training changed no weight"
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4]
    pipe = load_pipeline(out / "model")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.num_train_timesteps == 1100 and pipe.scheduler.config.beta_end == 0.014
    image = pipe("一只猫", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_stopped_run_resumes_to_the_same_weights(tmp_path: Path, shards: Path) -> None:
    whole = tmp_path / "whole"
    train(tiny_config(shards), whole)
    parts = tmp_path / "parts"
    first = train(tiny_config(shards, steps=2), parts)
    assert first.steps == 2
    second = train(tiny_config(shards), parts)
    assert second.resumed_from == 2 and second.steps == 4
    assert losses(parts) == losses(whole)
    a, b = unet_weights(whole), unet_weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.returncode}\n{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.1)


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path: Path, shards: Path) -> None:
    """`t2i train` killed with SIGKILL after a checkpoint resumes from it and ends bit-identical."""
    cfg_path = tmp_path / "train.yaml"
    cfg = tiny_config(shards, checkpoint_every=1, keep_checkpoints=3, sample_prompts=[])
    # what was set only: a file naming data.caption.sidecar_set requires the set (the shards have none)
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"steps"}, exclude_unset=True)))
    cmd = [sys.executable, "-m", "t2i.cli", "train", "--config", str(cfg_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed), "--steps", "1000"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (c := latest_checkpoint(killed)) is not None and c.step >= 3, 120, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stopped_at = latest_checkpoint(killed).step
    target = str(stopped_at + 2)
    whole = tmp_path / "whole"
    # the resumed run and the uninterrupted one are independent processes: run them side by side
    both = [subprocess.Popen([*cmd, "--out", str(out), "--steps", target], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for out in (killed, whole)]
    for out, p in zip((killed, whole), both, strict=True):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{out.name}: {p.returncode}\n{err.decode(errors='replace')[-3000:]}"
    assert losses(killed) == losses(whole)
    assert [s for s, _ in losses(killed)] == list(range(1, stopped_at + 3))
    a, b = unet_weights(whole), unet_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ray_train_two_gloo_workers(tmp_path: Path, shards: Path, ray_runtime) -> None:
    from trainer.distributed import run_training

    out = tmp_path / "ddp"
    cfg = tiny_config(shards, steps=2, scale={"workers": 2}, data={"batch_size": 1}, sample_prompts=[])
    result = run_training(cfg, out)  # the default caption set stays a default in the workers: no error
    assert result.steps == 2 and Path(result.model_dir).is_dir()
    assert result.captions["rows"] > 0 and result.captions["machine_rows"] == 0  # rank 0's report
    records = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2]
    load_pipeline(out / "model")


def test_model_path_loads_a_local_kolors_folder_and_bf16_autocast_runs(tmp_path: Path, shards: Path) -> None:
    """model.path takes a KolorsPipeline folder from disk (here the tiny one a first run saved);
    mixed_precision bf16 runs under CPU autocast and still learns finite losses."""
    first = tmp_path / "first"
    train(tiny_config(shards, steps=1, sample_prompts=[]), first)
    cfg = tiny_config(shards, steps=2, sample_prompts=[], model={"path": str(first / "model")},
                      mixed_precision="bf16", ema_decay=None)
    result = train(cfg, tmp_path / "from-folder")
    assert not (tmp_path / "from-folder" / "base").exists()  # nothing was built: the folder was used
    assert result.steps == 2 and all(loss == loss and loss < 10 for _, loss in losses(tmp_path / "from-folder"))
    load_pipeline(tmp_path / "from-folder" / "model")


def test_resume_takes_the_configs_lr_survives_a_torn_log_line_and_refuses_another_stage(tmp_path: Path,
                                                                                        shards: Path) -> None:
    out = tmp_path / "run"
    train(tiny_config(shards, steps=2, sample_prompts=[], ema_decay=None), out)
    with (out / LOSS_LOG).open("a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of an append
    result = train(tiny_config(shards, steps=3, sample_prompts=[], ema_decay=None, optim={"lr": 1e-5}), out)
    assert result.resumed_from == 2
    records = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == [1e-3, 1e-3, 1e-5]  # lowering lr on resume takes effect
    with pytest.raises(ValueError, match="stage 'concept'"):
        train(tiny_config(shards, steps=4, sample_prompts=[], ema_decay=None, stage="quality"), out)


def test_fp16_variant_folder_loads(tmp_path: Path, shards: Path) -> None:
    """Kwai-Kolors/Kolors-diffusers ships only *.fp16.safetensors: model.variant reads such a folder."""
    first = tmp_path / "first"
    train(tiny_config(shards, steps=1, sample_prompts=[], ema_decay=None), first)
    variant_dir = tmp_path / "kolors-fp16"
    load_pipeline(first / "model").save_pretrained(variant_dir, variant="fp16")
    assert list((variant_dir / "unet").glob("*.fp16.safetensors"))
    with pytest.raises(OSError):
        train(tiny_config(shards, steps=1, sample_prompts=[], model={"path": str(variant_dir)}), tmp_path / "a")
    cfg = tiny_config(shards, steps=1, sample_prompts=[], model={"path": str(variant_dir), "variant": "fp16"})
    assert train(cfg, tmp_path / "b").steps == 1


def test_config_objects_and_preset_overrides(tmp_path: Path) -> None:
    from trainer.config import TrainConfig
    from trainer.data import DataConfig

    built = TrainConfig(stage="quality", model={"path": "/m"}, data=DataConfig(batch_size=8))
    assert (built.data.resolution, built.data.min_short_side, built.data.batch_size) == (1024, 1024, 8)
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump({"stage": "quality", "model": {"path": "/models/kolors"}}))
    dry = load_train_config(path, model={"preset": "tiny"})
    assert dry.model.preset == "tiny" and dry.model.path is None and dry.data.resolution == 128
