"""Fan a source out over Ray, one task per source shard, skipping shards already done.

Tasks get a shard (a path) and the config and return a few counts, so the driver's
memory does not grow with the data. At most ``run.workers`` shard tasks are in flight: a
task that waits on a model pool gives its CPU back to Ray, which would otherwise start
another shard (and its memory) in its place. A shard that fails after its retries is
recorded in the summary and the rest of the run goes on; a failure that every shard would
meet (a signal failing on most rows, a full or read-only output) stops the run at once
(``RunAborted``).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from schemas.config import ConfigError, CurateConfig, config_differences
from tasks.actors import Pools, pool_resources, start_pools, stop_pools
from tasks.chain import SignalFailing
from tasks.cluster import cluster_address, ensure_ray
from tasks.dedupe import dedupe_keys
from tasks.lock import note_ray, output_lock, watch_ray
from tasks.process import ShardResult, process_shard
from tasks.shards import Manifest, write_atomic
from tasks.signals import build_signals, registry, unavailable_signals
from tasks.sources import SourceShard, discover, fingerprint

log = logging.getLogger(__name__)

# Called with None once the work starts (Ray joined, the run stamped), then after every shard.
Progress = Callable[[ShardResult | None, "RunSummary"], None]


class RunConfigMismatch(RuntimeError):
    """The output folder holds a run made with another config or mode."""


class SourceChangedSinceDone(RuntimeError):
    """Shards recorded as done have changed since, and ``source.changed`` is ``refuse``."""


class RunAborted(RuntimeError):
    """A failure no retry or other shard can get past: the run stopped; a rerun resumes."""


# Errors of a file system that every shard would meet: a full or read-only one, and (for paths
# in the output only: a source file one cannot read is that shard's problem) a permission error.
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM})


def fatal_reason(exc: BaseException, out: str | Path) -> str | None:
    """The message to stop the run with, or None for a failure of this shard alone."""
    if isinstance(exc, SignalFailing):
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    in_out = bool(exc.filename) and Path(str(exc.filename)).resolve().is_relative_to(Path(out).resolve())
    if exc.errno in FULL_OR_READ_ONLY or (exc.errno in NOT_PERMITTED and in_out):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot write the output{where}: {exc.strerror or exc}"
    return None


@dataclass
class Fatal:
    """What a shard task returns instead of raising, so that Ray does not retry it."""

    shard_id: str
    message: str


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


# Settings that change where and how the work runs, not which rows are kept: free to change on resume.
RESUMABLE = ("run", "output", "source.changed")


def _as_read_now(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config as the current code reads it: defaults added since the run started
    filled in, each signal's parameters with their defaults (``ocr: {}`` is ``det_side: 320``)."""
    try:
        data = CurateConfig.model_validate(cfg).model_dump(mode="json")
    except ValueError:  # a key this code no longer knows: compare as stored
        return cfg
    known = registry()
    data["signals"] = {name: known[name].Params.model_validate(params or {}).model_dump(mode="json")
                       for name, params in data["signals"].items()}
    return data


def guard_run_config(out: Path, mode: str, cfg: CurateConfig, source: str, *, write: bool = True) -> None:
    """Resuming with another config would mix two curations in one folder: refuse, naming the
    settings that differ. ``write=False`` only checks (nothing is written before the run is
    sure to start)."""
    stamp = out / "_run.json"
    current = {"mode": mode, "source": str(Path(source).resolve()), "config": cfg.model_dump(mode="json")}
    if stamp.exists():
        before = json.loads(stamp.read_text())
        differ = config_differences(_as_read_now(before.get("config", {})), _as_read_now(current["config"]),
                                    RESUMABLE)
        differ += [k for k in ("mode", "source") if before.get(k) != current[k]]
        if differ:
            raise RunConfigMismatch(
                f"{out} holds a {before.get('mode')} run of {before.get('source')} that differs in "
                f"{', '.join(differ)}; use a new --out, or remove the folder to start over"
            )
        return
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(stamp, json.dumps(current, indent=1, sort_keys=True).encode())


def _process_guarded(shard: SourceShard, cfg: CurateConfig, out: str, pools: Pools | None,
                     skip: frozenset[str]) -> ShardResult | Fatal:
    """One shard; a fatal failure comes back as ``Fatal`` (not retried), anything else raises."""
    try:
        return process_shard(shard, cfg, Path(out), pools, skip)
    except Exception as exc:
        if (message := fatal_reason(exc, out)) is not None:
            return Fatal(shard.shard_id, message)
        raise


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
    ``dedupe=False`` leaves the cross-shard key pass to the caller, to run once at the end.
    Holds the output's lock throughout (``tasks.lock``)."""
    started = time.perf_counter()
    if mode == "analyze":
        cfg = cfg.without_rules()
    elif mode != "curate":
        raise ValueError(f"mode must be curate or analyze, not {mode!r}")
    out = Path(out)
    skip = plan_signals(cfg)
    shards = shards if shards is not None else discover(source, cfg.source)
    guard_run_config(out, mode, cfg, str(source), write=False)
    with output_lock(out, f"t2i {mode} --source {source}"):
        todo = plan_shards(out, shards, cfg)
        summary = RunSummary(mode, str(source), str(out), len(shards), len(shards) - len(todo))
        models = [s for s in build_signals(cfg.signals) if s.uses_actor and s.name not in skip]
        if todo and use_ray:  # join (or start) Ray before anything is written
            pool_cpus, pool_gpus = pool_resources(models)
            if not ray.is_initialized() and cluster_address(cfg.run) is None:
                watch_ray()  # before ray.init: a driver killed while Ray starts leaves nothing either
            ensure_ray(cfg.run, extra_cpus=pool_cpus)
            note_ray(out)
            _check_fits(pool_cpus, pool_gpus)
        guard_run_config(out, mode, cfg, str(source))
        shutil.rmtree(out / "_tmp", ignore_errors=True)  # attempts of killed runs (the lock says none is live)

        def finished(result: ShardResult) -> None:
            summary.add(result)
            if progress:
                progress(result, summary)

        if progress:
            progress(None, summary)

        if use_ray:
            _run_on_ray(todo, cfg, out, summary, finished, skip, models)
        else:
            _run_here(todo, cfg, out, summary, finished, skip)
        summary.duplicates_moved = dedupe_keys(out) if dedupe else 0
    summary.kept -= summary.duplicates_moved
    summary.rejected += summary.duplicates_moved
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def plan_shards(out: Path, shards: list[SourceShard], cfg: CurateConfig) -> list[SourceShard]:
    """The shards to do: those not done, and those done whose source file changed since
    (``source.changed: recurate``; ``refuse`` raises, naming them)."""
    manifest = Manifest(out)
    done = manifest.done_ids()
    changed = [s for s in shards if s.shard_id in done and _changed(manifest, s)]
    if changed and cfg.source.changed == "refuse":
        names = ", ".join(s.path for s in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise SourceChangedSinceDone(
            f"{len(changed)} source shard(s) changed since they were curated into {out}: {names}; set "
            "source.changed: recurate to curate them again (their old rows are replaced), or use a new --out")
    for shard in changed:
        log.warning("%s changed since it was curated; curating it again", shard.path)
        manifest.forget(shard.shard_id)
    redo = {s.shard_id for s in changed}
    return [s for s in shards if s.shard_id not in done or s.shard_id in redo]


def _changed(manifest: Manifest, shard: SourceShard) -> bool:
    recorded = manifest.entry(shard.shard_id).get("fingerprint")
    if not recorded:  # recorded by a version that kept no fingerprint: nothing to compare
        return False
    try:
        return fingerprint(shard) != recorded
    except OSError:
        return True


def _run_here(todo: list[SourceShard], cfg: CurateConfig, out: Path, summary: RunSummary,
              finished: Callable[[ShardResult], None], skip: frozenset[str]) -> None:
    for shard in todo:
        try:
            result = _process_guarded(shard, cfg, str(out), None, skip)
        except Exception as exc:
            log.exception("shard %s failed", shard.shard_id)
            summary.failed[shard.shard_id] = f"{type(exc).__name__}: {exc}"
            continue
        if isinstance(result, Fatal):
            raise RunAborted(f"shard {result.shard_id}: {result.message}")
        finished(result)


def _run_on_ray(todo: list[SourceShard], cfg: CurateConfig, out: Path, summary: RunSummary,
                finished: Callable[[ShardResult], None], skip: frozenset[str], models: list) -> None:
    if not todo:
        return
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
    remote = ray.remote(_process_guarded).options(num_cpus=1, max_retries=cfg.run.task_retries,
                                                   retry_exceptions=cfg.run.task_retries > 0)
    cfg_ref = ray.put(cfg)
    pending: dict[Any, SourceShard] = {}
    queue = list(reversed(todo))
    while queue or pending:
        while queue and len(pending) < cfg.run.workers:
            shard = queue.pop()
            pending[remote.remote(shard, cfg_ref, str(out), pools, skip)] = shard
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            shard = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                log.error("shard %s failed: %s", shard.shard_id, cause)
                summary.failed[shard.shard_id] = f"{type(cause).__name__}: {cause}"
                continue
            if isinstance(result, Fatal):
                for other in pending:
                    ray.cancel(other, force=True)
                raise RunAborted(f"shard {result.shard_id}: {result.message}")
            finished(result)
