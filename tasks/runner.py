"""Fan a source out over Ray, one task per source shard, skipping shards already done.

Tasks get a shard (a path) and the config and return a few counts, so the driver's
memory does not grow with the data. A bounded window of tasks in flight keeps the driver
from queueing millions of refs at once. A shard that fails after its retries is recorded
in the summary and the rest of the run goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from schemas.config import ConfigError, CurateConfig, RunConfig
from tasks.actors import Pools, pool_resources, start_pools, stop_pools
from tasks.dedupe import dedupe_keys
from tasks.process import ShardResult, process_shard
from tasks.shards import Manifest, write_atomic
from tasks.signals import build_signals, unavailable_signals
from tasks.sources import SourceShard, discover

log = logging.getLogger(__name__)

Progress = Callable[[ShardResult, "RunSummary"], None]


class RunConfigMismatch(RuntimeError):
    """The output folder holds a run made with another config or mode."""


@dataclass
class RunSummary:
    mode: str
    source: str
    out: str
    shards_total: int = 0
    shards_skipped: int = 0  # done by an earlier run
    shards_done: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates_moved: int = 0  # kept rows whose key an earlier shard already had
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # shard_id -> error

    def add(self, result: ShardResult) -> None:
        self.shards_done += 1
        self.kept += result.kept
        self.rejected += result.rejected

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"failed": dict(self.failed)}


def ensure_ray(run: RunConfig, extra_cpus: float = 0.0) -> None:
    """Join ``run.ray_address`` or RAY_ADDRESS if set, else start a local runtime with
    ``run.workers`` CPUs for shard tasks plus what the model actor pools reserve (a shard
    task waiting on an actor holds no CPU). ``address="local"`` never attaches to a stale
    cluster file."""
    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=run.workers + math.ceil(extra_cpus), include_dashboard=False,
                 runtime_env=env, log_to_driver=False)


# Settings that change where and how the work runs, not which rows are kept: free to change on resume.
_RESUMABLE_SECTIONS = ("run", "output")


def _what_decides(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as the current code reads it (defaults added since the run started filled in),
    without the sections a resume may change."""
    data = {k: v for k, v in cfg.items() if k not in _RESUMABLE_SECTIONS}
    return {k: v for k, v in CurateConfig.model_validate(data).model_dump(mode="json").items()
            if k not in _RESUMABLE_SECTIONS}


def guard_run_config(out: Path, mode: str, cfg: CurateConfig, source: str) -> None:
    """Resuming with another config would mix two curations in one folder: refuse, naming what differs."""
    stamp = out / "_run.json"
    current = {"mode": mode, "source": str(Path(source).resolve()), "config": cfg.model_dump(mode="json")}
    if stamp.exists():
        before = json.loads(stamp.read_text())
        try:
            before_cfg = _what_decides(before.get("config", {}))
        except ValueError:  # a key this code no longer knows
            before_cfg = before.get("config", {})
        now_cfg = _what_decides(current["config"])
        differ = sorted(k for k in before_cfg.keys() | now_cfg.keys() if before_cfg.get(k) != now_cfg.get(k))
        differ += [k for k in ("mode", "source") if before.get(k) != current[k]]
        if differ:
            raise RunConfigMismatch(
                f"{out} holds a {before.get('mode')} run of {before.get('source')} that differs in "
                f"{', '.join(differ)}; use a new --out, or remove the folder to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(stamp, json.dumps(current, indent=1, sort_keys=True).encode())


def _process_remote(shard: SourceShard, cfg: CurateConfig, out: str, pools: Pools,
                    skip: frozenset[str]) -> ShardResult:
    return process_shard(shard, cfg, Path(out), pools, skip)


def plan_signals(cfg: CurateConfig) -> frozenset[str]:
    """The signals to leave empty (weights missing, say), each with one warning; a rule on
    one of them is a ConfigError before any work."""
    try:
        missing = unavailable_signals(build_signals(cfg.signals), cfg.rules)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    for name, why in missing.items():
        log.warning("signal %s is left empty: %s", name, why)
    return frozenset(missing)


def run(
    source: str | Path,
    out: str | Path,
    cfg: CurateConfig,
    *,
    mode: str = "curate",
    progress: Progress | None = None,
    use_ray: bool = True,
    shards: list[SourceShard] | None = None,
    dedupe: bool = True,
) -> RunSummary:
    """Curate (or, with mode="analyze", score without rules) every not-yet-done shard.
    ``shards`` limits the run to some of the source's shards (the Prefect flow's groups);
    ``dedupe=False`` leaves the cross-shard key pass to the caller, to run once at the end."""
    started = time.perf_counter()
    if mode == "analyze":
        cfg = cfg.without_rules()
    elif mode != "curate":
        raise ValueError(f"mode must be curate or analyze, not {mode!r}")
    out = Path(out)
    skip = plan_signals(cfg)
    shards = shards if shards is not None else discover(source, cfg.source)
    guard_run_config(out, mode, cfg, str(source))
    done = Manifest(out).done_ids()
    todo = [s for s in shards if s.shard_id not in done]
    summary = RunSummary(mode, str(source), str(out), len(shards), len(shards) - len(todo))

    def finished(result: ShardResult) -> None:
        summary.add(result)
        if progress:
            progress(result, summary)

    if not use_ray:
        for shard in todo:
            try:
                finished(process_shard(shard, cfg, out, skip=skip))
            except Exception as exc:
                log.exception("shard %s failed", shard.shard_id)
                summary.failed[shard.shard_id] = f"{type(exc).__name__}: {exc}"
    else:
        _run_on_ray(todo, cfg, out, summary, finished, skip)
    summary.duplicates_moved = dedupe_keys(out) if dedupe else 0
    summary.kept -= summary.duplicates_moved
    summary.rejected += summary.duplicates_moved
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _run_on_ray(todo: list[SourceShard], cfg: CurateConfig, out: Path, summary: RunSummary,
                finished: Callable[[ShardResult], None], skip: frozenset[str]) -> None:
    if not todo:
        return
    models = [s for s in build_signals(cfg.signals) if s.uses_actor and s.name not in skip]
    pool_cpus, pool_gpus = pool_resources(models)
    ensure_ray(cfg.run, extra_cpus=pool_cpus)
    _check_fits(pool_cpus, pool_gpus)
    pools = start_pools(models)
    try:
        _dispatch(todo, cfg, out, summary, finished, pools, skip)
    finally:
        stop_pools(pools)


def _check_fits(pool_cpus: float, pool_gpus: float) -> None:
    """Actors that hold every CPU leave shard tasks waiting forever: refuse to start."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if pool_cpus + 1 > cpus:
        raise ConfigError(
            f"the model actor pools reserve {pool_cpus:g} CPUs and a shard task needs 1, but the Ray cluster has "
            f"{cpus:g}: lower signals.<name>.actors or cpus_per_actor, or use a larger cluster")
    if pool_gpus > gpus:
        raise ConfigError(f"the model actor pools ask for {pool_gpus:g} GPUs, but the Ray cluster has {gpus:g}: "
                          "set signals.<name>.gpus_per_actor to 0 to run on CPU")


def _dispatch(todo: list[SourceShard], cfg: CurateConfig, out: Path, summary: RunSummary,
              finished: Callable[[ShardResult], None], pools: Pools, skip: frozenset[str]) -> None:
    remote = ray.remote(_process_remote).options(num_cpus=1, max_retries=cfg.run.task_retries,
                                                  retry_exceptions=cfg.run.task_retries > 0)
    cfg_ref = ray.put(cfg)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, SourceShard] = {}
    queue = list(reversed(todo))
    while queue or pending:
        while queue and len(pending) < window:
            shard = queue.pop()
            pending[remote.remote(shard, cfg_ref, str(out), pools, skip)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            shard = pending.pop(ref)
            try:
                finished(ray.get(ref))
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                log.error("shard %s failed: %s", shard.shard_id, cause)
                summary.failed[shard.shard_id] = f"{type(cause).__name__}: {cause}"
