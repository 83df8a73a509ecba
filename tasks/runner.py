"""A curation run: check the output's stamp, plan the shards, get Ray, then stream the shards
through one ``tasks.dispatch.Dispatcher``, then the cross-shard key pass.

Tasks get a shard (a path) and the config and return a few counts, so the driver's memory
does not grow with the data. A shard that fails after its retries is recorded in the summary
and the rest of the run goes on; a failure every shard would meet stops the run at once
(``RunAborted``). ``run`` is the CLI's whole run; the Prefect flow opens a run with
``open_run`` and feeds its groups to the same dispatcher from several threads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from schemas.config import ConfigError, CurateConfig, RunConfig, config_differences
from tasks.actors import pool_resources, pool_specs
from tasks.attempts import drop_committed, sweep_uncommitted
from tasks.card import write_card
from tasks.cluster import cluster_address, ensure_ray
from tasks.dedupe import dedupe_keys, recover, twins_of
from tasks.dispatch import Dispatcher, RunAborted
from tasks.lock import note_ray, output_lock, watch_ray
from tasks.process import ShardResult
from tasks.shards import Manifest
from tasks.signals import build_signals, registry, unavailable_signals
from tasks.sources import SourceShard, discover, fingerprint
from tasks.storage import Store, as_store, location
from tasks.storage_retry import retry_tally

log = logging.getLogger(__name__)

__all__ = ["RunAborted", "RunConfigMismatch", "RunContext", "RunSummary", "SourceChangedSinceDone",
           "guard_run_config", "open_run", "plan_shards", "run"]

# Called with None once the work starts (Ray joined, the run stamped), then after every shard.
Progress = Callable[[ShardResult | None, "RunSummary"], None]


class RunConfigMismatch(RuntimeError):
    """The output folder holds a run made with another config or mode."""


class SourceChangedSinceDone(RuntimeError):
    """Shards recorded as done have changed since, and ``source.changed`` is ``refuse``."""


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
    output_kept: int = 0  # the whole output's totals after the run (earlier runs' shards included)
    output_rejected: int = 0
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # shard_id -> error
    storage_retries: int = 0  # storage calls tried again after a transient error (shards' and the driver's)
    units_retried: int = 0  # failed tries of shards or parts that were tried again (run.task_retries)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, result: ShardResult) -> None:
        """Thread-safe: the Prefect flow's groups report from their own threads."""
        with self._lock:
            self._add(result)

    def _add(self, result: ShardResult) -> None:
        self.shards_done += 1
        self.kept += result.kept
        self.rejected += result.rejected
        self.storage_retries += result.storage_retries

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"} | {"failed": dict(self.failed)}


# Settings that change where and how the work runs, not which rows are kept: free to change on resume.
STAMP = "_run.json"
RESUMABLE = ("run", "output", "source.changed", "storage")


def _as_read_now(cfg: dict[str, Any]) -> dict[str, Any]:
    """A stored config as the current code reads it: defaults added since the run started
    filled in, each signal's parameters with their defaults (``ocr: {}`` is ``det_side: 256``)."""
    try:
        data = CurateConfig.model_validate(cfg).model_dump(mode="json")
    except ValueError:  # a key this code no longer knows: compare as stored
        return cfg
    known = registry()
    data["signals"] = {name: known[name].Params.model_validate(params or {}).model_dump(mode="json")
                       for name, params in data["signals"].items()}
    return data


def guard_run_config(out: Store | str | Path, mode: str, cfg: CurateConfig, source: str, *,
                     write: bool = True) -> None:
    """Resuming with another config would mix two curations in one folder: refuse, naming the
    settings that differ. ``write=False`` only checks (nothing is written before the run is
    sure to start). The stamp holds no secret: ``storage`` keys dump as ``**********``."""
    store = as_store(out, cfg.storage)
    current = {"mode": mode, "source": location(source), "config": cfg.model_dump(mode="json")} | signals_here(cfg)
    if store.exists(STAMP):
        before = json.loads(store.read_bytes(STAMP))
        differ = config_differences(_as_read_now(before.get("config", {})), _as_read_now(current["config"]),
                                    RESUMABLE)
        differ += [k for k in ("mode", "source") if before.get(k) != current[k]]
        if differ:
            raise RunConfigMismatch(
                f"{store} holds a {before.get('mode')} run of {before.get('source')} that differs in "
                f"{', '.join(differ)}; use a new --out, or remove the folder to start over"
            )
        if mixed := _mixes(before, current):
            raise RunConfigMismatch(
                f"{store} would mix rows scored two ways: {'; '.join(mixed)}. Resume where the same models run, "
                "or curate into a new --out (without the signals that cannot run there)")
        return
    if write:
        store.write_bytes(STAMP, json.dumps(current, indent=1, sort_keys=True).encode())


def signals_here(cfg: CurateConfig) -> dict[str, dict[str, str]]:
    """What the stamp records of the signals as they run here: those left empty (and why), and each
    model's id (``Signal.model_id``)."""
    built = build_signals(cfg.signals)
    empty = {s.name: why for s in built if (why := s.unavailable())}
    return {"left_empty": empty,
            "models": {s.name: mid for s in built if s.name not in empty and (mid := s.model_id())}}


def _mixes(before: dict[str, Any], now: dict[str, dict[str, str]]) -> list[str]:
    """How resuming here would score rows unlike the output's earlier shards: a signal that ran
    then and cannot now (or the reverse), or another model at the same path. Stamps of versions
    that recorded neither are not compared."""
    if "left_empty" not in before:
        log.warning("the output's stamp predates its record of signals left empty and model ids: not compared")
        return []
    was, empty = before["left_empty"], now["left_empty"]
    mixed = [f"signal {n} cannot run here ({empty[n]}) but the output's shards so far have it"
             for n in sorted(set(empty) - set(was))]
    mixed += [f"signal {n} was left empty in the output's shards so far ({was[n]}) but runs here"
              for n in sorted(set(was) - set(empty))]
    models = before.get("models", {})
    mixed += [f"signal {n}'s model is {now['models'].get(n)} here, {models[n]} in the output's shards so far"
              for n in sorted(models) if n not in empty and now["models"].get(n) != models[n]]
    return mixed


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


@dataclass
class RunContext:
    """One run, opened: what ``run`` and the Prefect flow's groups share."""

    source: str
    out: str  # a local absolute path or an object-store URL: what shard tasks on any node open
    cfg: CurateConfig  # as run (analyze: without rules)
    mode: str
    todo: list[SourceShard]
    summary: RunSummary
    dispatcher: Dispatcher
    store: Store


def check_run(source: str | Path, out: str | Path, cfg: CurateConfig, mode: str) -> CurateConfig:
    """What can refuse a run, checked before anything (the lock included) is written: the mode,
    the signals that cannot run here, the output's store (credentials, bucket) and stamp.
    Returns the config as run."""
    if mode == "analyze":
        cfg = cfg.without_rules()
    elif mode != "curate":
        raise ValueError(f"mode must be curate or analyze, not {mode!r}")
    plan_signals(cfg)
    store = as_store(out, cfg.storage)
    store.check()
    guard_run_config(store, mode, cfg, str(source), write=False)
    return cfg


class OutputInsideSource(ConfigError):
    """``--out`` below a folder or Parquet source: a second run would read its own output as input."""


def check_out_outside_source(source: str | Path, out: str | Path, shards: list[SourceShard]) -> None:
    """A folder or Parquet source is every image or .parquet below it, the output's included: refuse
    an output inside it (a tar source ignores the output's .parquet files, so it may hold one)."""
    if not shards or shards[0].kind in ("webdataset", "synth"):
        return
    src, dst = location(source), location(out)
    if dst == src or dst.startswith(src.rstrip("/") + "/"):
        raise OutputInsideSource(
            f"--out {dst} is inside the {shards[0].kind} source {src}: a later run would read the output as input; "
            "put the output elsewhere")


def open_run(source: str | Path, out: str | Path, cfg: CurateConfig, *, mode: str = "curate",
             shards: list[SourceShard] | None = None, use_ray: bool = True,
             ray_retries: int | None = None) -> RunContext:
    """Everything before the first shard: check the config against the output's stamp, plan the
    shards (refusing or forgetting changed ones), join or start Ray, stamp the run, clear the
    attempts of killed runs. Call with the output's lock held. ``ray_retries`` defaults to
    ``run.task_retries``."""
    cfg = check_run(source, out, cfg, mode)
    store = as_store(out, cfg.storage)
    out = store.url()  # shard tasks on other nodes (other working directories) get this
    skip = frozenset(unavailable_signals(build_signals(cfg.signals), cfg.rules))  # check_run warned
    shards = shards if shards is not None else discover(source, cfg.source, cfg.storage)
    recover(store)  # a duplicate pass killed last time is finished before anything else
    plan = plan_shards(store, shards, cfg)
    todo = plan.todo
    models = [s for s in build_signals(cfg.signals) if s.uses_actor and s.name not in skip]
    if todo and use_ray:  # join (or start) Ray before anything is written
        join_ray(cfg.run, out, pool_resources(pool_specs(models))[0])
    guard_run_config(store, mode, cfg, str(source))
    sweep_uncommitted(store)  # attempts of killed runs (the lock says none is live)
    summary = RunSummary(mode, str(source), out, len(shards), len(shards) - len(todo))
    summary.failed.update(plan.unreadable)
    retries = cfg.run.task_retries if ray_retries is None else ray_retries
    dispatcher = Dispatcher.for_curation(cfg, out, skip, models, use_ray=use_ray, ray_retries=retries)
    if todo and use_ray:
        dispatcher.start()  # pools up (weights load) before any group: a failure here is the run's
    return RunContext(str(source), out, cfg, mode, todo, summary, dispatcher, store)


def join_ray(run_cfg: RunConfig, out: str, pool_cpus: float) -> None:
    """Join the cluster, or start a local runtime whose processes a killed driver does not leave
    behind (tasks/lock.py tags them with the output)."""
    if not ray.is_initialized() and cluster_address(run_cfg) is None:
        watch_ray()  # before ray.init: a driver killed while Ray starts leaves nothing either
        note_ray(out)  # the tag, for the next run, should the reaper itself be killed
    ensure_ray(run_cfg, extra_cpus=pool_cpus)
    note_ray(out)


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
    """Curate (or, with mode="analyze", score without rules) every not-yet-done shard;
    ``shards`` limits the run to some of the source's shards. Holds the output's lock
    throughout (``tasks.lock``)."""
    started = time.perf_counter()
    check_run(source, out, cfg, mode)
    shards = shards if shards is not None else discover(source, cfg.source, cfg.storage)  # a bad source: no lock
    check_out_outside_source(source, out, shards)
    with retry_tally() as driver, output_lock(out, f"t2i {mode} --source {source}", storage=cfg.storage):
        ctx = open_run(source, out, cfg, mode=mode, shards=shards, use_ray=use_ray)
        summary = ctx.summary

        def finished(result: ShardResult) -> None:
            summary.add(result)
            if progress:
                progress(result, summary)

        if progress:
            progress(None, summary)
        try:
            summary.failed.update(ctx.dispatcher.run_shards(ctx.todo, finished))
        finally:
            ctx.dispatcher.close()
            summary.units_retried += ctx.dispatcher.units_retried
            summary.storage_retries += ctx.dispatcher.failed_tries_storage_retries
        sweep_uncommitted(ctx.store)  # attempts that lost their node: a listing now shows committed parts only
        summary.duplicates_moved = dedupe_keys(ctx.store) if dedupe else 0
        write_card(ctx.store)  # after the key pass: the parts as they stay
    summary.kept -= summary.duplicates_moved
    summary.rejected += summary.duplicates_moved
    entries = Manifest(as_store(out, cfg.storage)).entries()
    summary.output_kept = sum(e.get("kept", 0) for e in entries)
    summary.output_rejected = sum(e.get("rejected", 0) for e in entries)
    summary.storage_retries += driver.retries
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


@dataclass
class Plan:
    """The shards a run does, and the done ones whose source could not be checked (listed as
    failed: neither redone nor dropped)."""

    todo: list[SourceShard]
    unreadable: dict[str, str] = field(default_factory=dict)


def plan_shards(out: Store | str | Path, shards: list[SourceShard], cfg: CurateConfig) -> Plan:
    """The shards to do: those not done, and those done whose source file changed since
    (``source.changed: recurate``; ``refuse`` raises, naming them). A changed shard takes with it
    the done shards holding ``duplicate_key`` rejects of the keys it kept (``dedupe.twins_of``):
    redone, their rows come back to the kept side where the changed shard no longer holds the
    key, first occurrence kept as always. A source that cannot be read is an error, never
    "changed"."""
    store = as_store(out, cfg.storage)
    manifest = Manifest(store)
    done = manifest.done_ids()
    plan, changed = Plan([]), []
    for shard in (s for s in shards if s.shard_id in done):
        try:
            if _changed(manifest, shard, cfg):
                changed.append(shard)
        except OSError as exc:
            log.error("cannot tell whether %s changed: %s", shard.path, exc)
            plan.unreadable[shard.shard_id] = f"cannot read the source {shard.path} to check it: {exc}"
    if changed and cfg.source.changed == "refuse":
        names = ", ".join(s.path for s in changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise SourceChangedSinceDone(
            f"{len(changed)} source shard(s) changed since they were curated into {store}: {names}; set "
            "source.changed: recurate to curate them again (their old rows are replaced), or use a new --out")
    redo = _with_twins(store, changed, shards, done)
    plan.todo = [s for s in shards if (s.shard_id not in done or s.shard_id in redo)
                 and s.shard_id not in plan.unreadable]
    return plan


def _with_twins(store: Store, changed: list[SourceShard], shards: list[SourceShard], done: set[str]) -> set[str]:
    """Forget the changed shards and the done shards holding duplicates of their kept keys; the
    twins first, so a kill in between leaves the changed shards to find them again next time."""
    if not changed:
        return set()
    listed = {s.shard_id for s in shards}
    twins = twins_of(store, {s.shard_id for s in changed}) & done
    for shard_id in sorted(twins - listed):
        log.warning("shard %s holds duplicates of keys a changed shard kept, but its source is gone: its "
                    "duplicate_key rejects stay as they are", shard_id)
    twins &= listed
    for shard_id in sorted(twins - {s.shard_id for s in changed}):
        log.warning("shard %s is curated again: it holds duplicates of keys a changed shard kept", shard_id)
        drop_committed(store, shard_id)
    for shard in changed:
        log.warning("%s changed since it was curated; curating it again", shard.path)
        drop_committed(store, shard.shard_id)
    return twins | {s.shard_id for s in changed}


def _changed(manifest: Manifest, shard: SourceShard, cfg: CurateConfig) -> bool:
    """Whether a done shard's source differs from what its entry recorded; raises ``OSError`` when
    the source cannot be read (an object store's transient errors were retried for
    ``storage.retry_s`` below): an error is not a change."""
    recorded = manifest.entry(shard.shard_id).get("fingerprint")
    if not recorded:  # recorded by a version that kept no fingerprint: nothing to compare
        return False
    return fingerprint(shard, cfg.storage) != recorded
