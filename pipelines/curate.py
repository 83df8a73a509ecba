"""The `curate` flow (deployment `curate/laion`): coarse Prefect tasks over groups of source
shards, all fed to one bounded stream of Ray shard tasks.

Prefect stalls at thousands of tasks and pulls returned data back to the flow, so a task
here is a group of source shards (``shards_per_task``) and passes only paths and counts.
The groups do not wait for each other: they run at once, in Prefect's thread pool, and
share one ``tasks.dispatch.Dispatcher`` (at most ``run.workers`` shards in flight in all, the
model pools started once per flow run), so a straggler holds one slot, not the cluster.
Each group is retried as configured (``run.task_retries``) by Prefect alone: Ray does not
retry its shard tasks here, so a shard that keeps failing runs ``task_retries + 1`` times in
all. Finished shards are in the manifest, so a retry, or a new run after a killed worker,
redoes only unfinished shards. A group that still fails is recorded and the run goes on;
the flow then ends Failed, saying which shards failed and why.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import ray
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote

from schemas.config import load_config
from schemas.recaption import RecaptionConfig, load_recaption_config
from tasks.attempts import sweep_uncommitted
from tasks.card import write_card
from tasks.cluster import cluster_address
from tasks.dedupe import dedupe_keys
from tasks.lock import output_lock
from tasks.report import report_link, write_report
from tasks.runner import RunAborted, RunContext, check_out_outside_source, check_run, open_run
from tasks.shards import Manifest
from tasks.sources import SourceShard, discover
from tasks.stats import compute_stats, format_markdown


class ShardsFailed(RuntimeError):
    """Some shards of a group failed after Ray's retries; Prefect retries the group."""


class ProgressArtifact:
    """A flow run's progress artifact: ``done`` of ``total`` as a percent (the caption flow's too)."""

    def __init__(self, key: str, description: str, done: int, total: int):
        self.done, self.total = done, total
        self.id = create_progress_artifact(progress=self.percent(), key=key, description=description)

    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 1) if self.total else 100.0

    def update(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, self.total if total is None else total
        update_progress_artifact(self.id, progress=self.percent())


class _Progress:
    """Rows done and left, in the logs and a progress artifact, after every shard."""

    def __init__(self, total_shards: int, done_before: int):
        self.lock = threading.Lock()  # groups report from their own threads
        self.rows, self.kept = 0, 0
        self.fresh = 0  # shards done in this run, for the rows-per-shard estimate
        self.bar = ProgressArtifact("curate-progress", "source shards done", done_before, total_shards)

    def shard_done(self, rows: int, kept: int) -> None:
        with self.lock:
            self.fresh += 1
            self.rows, self.kept = self.rows + rows, self.kept + kept
            self.bar.update(self.bar.done + 1)
            left = (self.bar.total - self.bar.done) * self.rows / self.fresh
            get_run_logger().info(
                "shards %d/%d (%.1f%%) | rows done %d (kept %d, rejected %d) | rows left ~%d",
                self.bar.done, self.bar.total, self.bar.percent(), self.rows, self.kept, self.rows - self.kept,
                math.ceil(left))


@task(name="curate-shard-group", persist_result=False, cache_policy=NO_CACHE)
def curate_group(run: RunContext, shards: list[SourceShard], progress: _Progress) -> dict[str, Any]:
    """The group's shards not yet done (a retry skips what its first try finished)."""
    done = Manifest(run.store).done_ids()
    todo = [s for s in shards if s.shard_id not in done]

    def finished(result) -> None:
        run.summary.add(result)
        progress.shard_done(result.rows, result.kept)

    try:
        failed = run.dispatcher.run_shards(todo, finished)
    except RunAborted as exc:  # no retry gets past it: tell the flow to stop, do not raise
        return {"aborted": str(exc)}
    if failed:
        raise ShardsFailed("; ".join(f"{k}: {v}" for k, v in failed.items()))
    return {"shards": len(todo)}


@task(name="finalize", persist_result=False, cache_policy=NO_CACHE)
def finalize(run: RunContext) -> dict[str, Any]:
    """Leftovers of attempts swept, one cross-shard key pass, then the stats table as an artifact, and
    ``out/report.html`` (tasks/report.py) with an artifact linking it."""
    out = run.out
    sweep_uncommitted(run.store)
    moved = dedupe_keys(run.store)
    write_card(run.store)
    stats = compute_stats(out, run.cfg.storage)
    stats["duplicates_moved"] = moved
    create_markdown_artifact(markdown=format_markdown(stats), key="curate-summary",
                             description=f"curation summary of {out}")
    try:  # the curation is done whatever happens here: a report that fails is said, not a failed run
        report = write_report(out, run.cfg.storage)
    except Exception as exc:
        get_run_logger().warning("the report was not written: %s: %s", type(exc).__name__, exc)
    else:
        create_markdown_artifact(markdown=f"# Curation report\n\n[{report}]({report_link(report)}): counts, reject "
                                 "reasons with thumbnails, signal histograms with the rules' bounds, buckets, kept "
                                 "images, machine captions\n", key="curate-report",
                                 description=f"curation report of {out}")
        stats["report"] = report
    return stats


def _groups(shards: list[SourceShard], size: int) -> list[list[SourceShard]]:
    return [shards[i : i + size] for i in range(0, len(shards), size)]


@flow(name="curate", log_prints=True)
def curate(source: str, out: str, config: str | None = None, mode: str = "curate",
           shards_per_task: int = 64, caption_config: str | None = None) -> State:
    """Curate ``source`` into ``out`` (``mode="analyze"``: every signal, no rule). Holds the
    output's lock for the whole curation, so a second run on ``out`` refuses at start. With
    ``caption_config`` (configs/recaption-*.yaml), a curation that succeeded is then captioned
    (pipelines/caption.py) in this flow run; a failed caption pass fails the flow run."""
    cfg = load_config(config)  # a bad config fails here, before any work
    captions = _caption_config(caption_config)  # and so does a caption config or a model folder missing
    # and so does resuming `out` with another config, or a run already working on it
    check_run(source, out, cfg, mode)
    shards = discover(source, cfg.source, cfg.storage)
    check_out_outside_source(source, out, shards)
    ray_ours = not ray.is_initialized() and cluster_address(cfg.run) is None
    with output_lock(out, f"prefect flow curate --source {source}", storage=cfg.storage):
        run = open_run(source, out, cfg, mode=mode, shards=shards, ray_retries=0)
        try:
            state = _curate_groups(run, cfg.run.task_retries, shards_per_task)
        finally:
            run.dispatcher.close()
    if captions is None or not state.is_completed():
        return state
    from pipelines.caption import caption_state  # late: it imports this module

    if ray_ours and ray.is_initialized():  # sized for curation's pools: the pass starts one sized for its own
        ray.shutdown()
    captioned = caption_state(out, captions)
    if not captioned.is_completed():  # curation stays done: a rerun skips it and captions what is left
        return Failed(message=f"{state.message}; the caption pass failed: {captioned.message}")
    return Completed(message=f"{state.message}; {captioned.message}",
                     data={**state.result(), "captions": captioned.result()})


def _caption_config(path: str | None) -> RecaptionConfig | None:
    """The caption config, its model folders checked: a missing one fails before curation, not after."""
    if path is None:
        return None
    from captioners.recaption import caption_pass

    captions = load_recaption_config(path)
    for plan in caption_pass(captions).stages:
        plan.stage.check()
    return captions


def _curate_groups(run: RunContext, retries: int, shards_per_task: int) -> State:
    logger = get_run_logger()
    summary = run.summary
    logger.info("%d source shards, %d already done; %d per task", summary.shards_total, summary.shards_skipped,
                shards_per_task)
    progress = _Progress(summary.shards_total, summary.shards_skipped)
    retrying = curate_group.with_options(retries=retries, retry_delay_seconds=1)
    # quote(): Prefect would walk (and copy) the run's dataclasses looking for futures in them
    futures = [retrying.submit(quote(run), group, quote(progress))
               for group in _groups(run.todo, max(1, shards_per_task))]
    failed: list[str] = []
    for future in futures:
        state = future.wait() or future.state
        if not state.is_completed():  # failed after its retries, or crashed
            failed.append(str(state.message or state.name))
            logger.error("a shard group failed after retries: %s", state.message)
    if run.dispatcher.aborted:
        logger.error("the run stopped: %s", run.dispatcher.aborted)
        return Failed(message=f"the run stopped: {run.dispatcher.aborted}")
    stats = finalize(quote(run))
    if failed:
        return Failed(message=f"{len(failed)} shard group(s) failed; the rest is done: " + " | ".join(failed),
                      data=stats)
    return Completed(message=f"kept {stats['kept']}, rejected {stats['rejected']}", data=stats)
