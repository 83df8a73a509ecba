"""Run the loop on one process, or across ``scale.workers`` Ray Train workers with DDP.

Ray Train's TorchTrainer starts the workers, sets up the torch process group (gloo on CPUs, nccl
on GPUs) and calls ``trainer.loop.train`` on each; the loop itself only asks torch.distributed for
its rank. Checkpoints and the export go to ``out`` from rank 0, so on a multi-node cluster ``out``
must be a shared filesystem (the same path on every node).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from schemas.config import RunConfig
from trainer.config import TrainConfig
from trainer.loop import RESULT_FILE, TrainResult, train


def _worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker; rank 0 leaves the result in ``out/train-result.json``."""
    train(TrainConfig.model_validate(config["cfg"]), Path(config["out"]))


def run_training(cfg: TrainConfig, out: str | Path) -> TrainResult:
    """``train`` here when ``scale.workers`` is 1, else a TorchTrainer over that many workers."""
    out = Path(out).resolve()
    started = time.perf_counter()
    if cfg.scale.workers == 1:
        return train(cfg, out)
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tasks.cluster import ensure_ray
    from trainer.caption_mix import check_caption_set
    from trainer.row_index import shard_files

    check_caption_set(shard_files(cfg.data.shards), cfg.data.caption)  # before any worker starts
    ensure_ray(RunConfig(workers=cfg.scale.workers, ray_address=cfg.scale.ray_address))
    backend = cfg.scale.backend or ("nccl" if cfg.scale.use_gpu else "gloo")
    trainer = TorchTrainer(
        _worker,
        # only what was set: defaults stay defaults in the workers (a caption set the config names
        # must exist, the default one may be missing: trainer/caption_mix.py)
        train_loop_config={"cfg": cfg.model_dump(mode="json", exclude_unset=True), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=cfg.scale.workers, use_gpu=cfg.scale.use_gpu),
        torch_config=TorchConfig(backend=backend),
        run_config=RayRunConfig(storage_path=str(out / "ray"), name="train"),
    )
    fitted = trainer.fit()
    if fitted.error is not None:
        raise RuntimeError(f"distributed training failed: {fitted.error}") from fitted.error
    result = TrainResult(**json.loads((out / RESULT_FILE).read_text()))
    result.seconds = round(time.perf_counter() - started, 2)  # with worker start-up, unlike rank 0's own figure
    return result
