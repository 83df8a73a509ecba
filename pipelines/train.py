"""The `train` flow: one coarse task that trains a stage and exports a KolorsPipeline folder.

Training is one long job, so it is one Prefect task (a task per step would flood the server).
Its retries resume from the latest checkpoint in ``out``, so a killed worker costs at most
``checkpoint_every`` steps. The loss curve and the export path come back as artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from trainer.config import load_train_config


def train_overrides(shards: list[str] | str | None, stage: str | None, preset: str | None,
                    steps: int | None, workers: int | None) -> dict[str, Any]:
    """Command-line / flow parameters as config keys (None leaves the file's value)."""
    if isinstance(shards, str):
        shards = [shards]
    return {"stage": stage, "steps": steps, "model": {"preset": preset} if preset else None,
            "data": {"shards": list(shards)} if shards else None,
            "scale": {"workers": workers} if workers else None}


@task(name="train-stage", persist_result=False)
def train_stage(out: str, config: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    from trainer.distributed import run_training

    cfg = load_train_config(config, **overrides)
    result = run_training(cfg, out)
    return result.__dict__


def _captions_line(captions: dict[str, Any] | None) -> str:
    """The caption mix the run trained on (trainer/caption_mix.py), with its warning if any."""
    if not captions:
        return "(no caption report)"
    warning = captions.get("warning")
    return captions["report"] + (f"\n\n**Warning**: original captions only (100:0). {warning}" if warning else "")


def _loss_table(log_path: Path, rows: int = 20) -> str:
    if not log_path.is_file():
        return "(no loss logged)"
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    every = max(1, len(records) // rows)
    lines = ["| step | loss |", "|---:|---:|"]
    lines += [f"| {r['step']} | {r['loss']:.4f} |" for r in records[::every]]
    return "\n".join(lines)


@flow(name="train", log_prints=True)
def train(out: str, shards: list[str] | None = None, stage: str | None = None, config: str | None = None,
          preset: str | None = None, steps: int | None = None, workers: int | None = None) -> dict[str, Any]:
    """Train ``stage`` (concept | quality) on curated ``shards`` into ``out``; resumes if ``out`` has checkpoints."""
    logger = get_run_logger()
    overrides = train_overrides(shards, stage, preset, steps, workers)
    cfg = load_train_config(config, **overrides)  # a bad config fails here, before any work
    logger.info("stage %s, %d steps, %s, data %s", cfg.stage, cfg.steps,
                cfg.model.preset or cfg.model.path, cfg.data.shards)
    result = train_stage.with_options(retries=1, retry_delay_seconds=2)(out, config, overrides)
    create_markdown_artifact(
        key="train-summary",
        markdown=f"## train ({cfg.stage})\n\nsteps {result['steps']}, final loss {result['loss']}, "
                 f"model: `{result['model_dir']}`\n\n{_captions_line(result.get('captions'))}\n\n"
                 + _loss_table(Path(result["log_path"])),
        description="loss curve and export path",
    )
    return result
