"""The `curate` flow (deployment `curate/laion`): coarse Prefect tasks over groups of source
shards, Ray fan-out inside each task.

Prefect stalls at thousands of tasks and pulls returned data back to the flow, so a task
here is a group of source shards (``shards_per_task``) and passes only paths and counts.
Each group is retried as configured (``run.task_retries``); finished shards are in the
manifest, so a retry, or a new run after a killed worker, redoes only unfinished shards.
A group that still fails is recorded and the run goes on; the flow then ends Failed,
saying which shards failed and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.states import Completed, Failed, State

from schemas.config import load_config
from tasks.dedupe import dedupe_keys
from tasks.lock import output_lock
from tasks.runner import RunAborted, RunSummary, guard_run_config, run
from tasks.sources import SourceShard, discover
from tasks.stats import compute_stats, format_markdown


class ShardsFailed(RuntimeError):
    """Some shards of a group failed after Ray's retries; Prefect retries the group."""


class _Progress:
    """Rows done and left, in the logs and a progress artifact, after every shard."""

    def __init__(self, total_shards: int, done_before: int):
        self.total, self.done, self.rows, self.kept = total_shards, done_before, 0, 0
        self.fresh = 0  # shards done in this run, for the rows-per-shard estimate
        self.artifact = create_progress_artifact(progress=self.percent(), key="curate-progress",
                                                 description="source shards done")

    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 1) if self.total else 100.0

    def shard_done(self, rows: int, kept: int) -> None:
        self.done, self.fresh, self.rows, self.kept = self.done + 1, self.fresh + 1, self.rows + rows, self.kept + kept
        left = (self.total - self.done) * self.rows / self.fresh
        update_progress_artifact(self.artifact, progress=self.percent())
        get_run_logger().info(
            "shards %d/%d (%.1f%%) | rows done %d (kept %d, rejected %d) | rows left ~%d",
            self.done, self.total, self.percent(), self.rows, self.kept, self.rows - self.kept, math.ceil(left))


@task(name="curate-shard-group", persist_result=False)
def curate_group(source: str, out: str, config: str | None, mode: str, shards: list[dict[str, Any]],
                 progress: Any = None) -> dict[str, Any]:
    cfg = load_config(config)
    group = [SourceShard(s["shard_id"], s["kind"], s["path"], tuple(s["members"])) for s in shards]

    def report(result, _summary: RunSummary) -> None:
        if progress is not None and result is not None:
            progress.shard_done(result.rows, result.kept)

    try:
        summary = run(source, out, cfg, mode=mode, shards=group, dedupe=False, progress=report)
    except RunAborted as exc:  # no retry gets past it: tell the flow to stop, do not raise
        return {"aborted": str(exc)}
    if summary.failed:
        raise ShardsFailed("; ".join(f"{k}: {v}" for k, v in summary.failed.items()))
    return summary.to_dict()


@task(name="finalize", persist_result=False)
def finalize(out: str) -> dict[str, Any]:
    """One cross-shard key pass, then the stats table as an artifact."""
    moved = dedupe_keys(out)
    stats = compute_stats(out)
    stats["duplicates_moved"] = moved
    create_markdown_artifact(markdown=format_markdown(stats), key="curate-summary",
                             description=f"curation summary of {out}")
    return stats


def _groups(shards: list[SourceShard], size: int) -> list[list[dict[str, Any]]]:
    return [[asdict(s) for s in shards[i : i + size]] for i in range(0, len(shards), size)]


@flow(name="curate", log_prints=True)
def curate(source: str, out: str, config: str | None = None, mode: str = "curate",
           shards_per_task: int = 64) -> State:
    """Curate ``source`` into ``out`` (``mode="analyze"``: every signal, no rule). Holds the
    output's lock for the whole flow run, so a second run on ``out`` refuses at start."""
    cfg = load_config(config)  # a bad config fails here, before any work
    shards = discover(source, cfg.source)
    # and so does resuming `out` with another config, or a run already working on it
    guard_run_config(Path(out), mode, cfg.without_rules() if mode == "analyze" else cfg, source, write=False)
    with output_lock(out, f"prefect flow curate --source {source}"):
        return _curate_locked(source, out, config, mode, shards_per_task, cfg, shards)


def _curate_locked(source: str, out: str, config: str | None, mode: str, shards_per_task: int, cfg: Any,
                   shards: list[SourceShard]) -> State:
    logger = get_run_logger()
    from tasks.shards import Manifest

    done_before = len({s.shard_id for s in shards} & Manifest(Path(out)).done_ids())
    logger.info("%d source shards, %d already done; %d per task", len(shards), done_before, shards_per_task)
    progress = _Progress(len(shards), done_before)
    failed: list[str] = []
    retrying = curate_group.with_options(retries=cfg.run.task_retries, retry_delay_seconds=1)
    for group in _groups(shards, max(1, shards_per_task)):
        state = retrying(source, out, config, mode, group, progress, return_state=True)
        if state.is_failed():
            failed.append(str(state.message or state.name))
            logger.error("a shard group failed after retries: %s", state.message)
        elif aborted := state.result().get("aborted"):
            logger.error("the run stopped: %s", aborted)
            return Failed(message=f"the run stopped: {aborted}")
    stats = finalize(out)
    if failed:
        return Failed(message=f"{len(failed)} shard group(s) failed; the rest is done: " + " | ".join(failed),
                      data=stats)
    return Completed(message=f"kept {stats['kept']}, rejected {stats['rejected']}", data=stats)
