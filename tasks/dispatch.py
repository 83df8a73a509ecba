"""The stream of shard tasks of one run: bounded in flight, shared by every caller.

A run (``tasks.runner.open_run``) owns one ``Dispatcher``: the model pools (started once per
run, stopped at its end), the config in Ray's object store, and ``run.workers`` slots. Any
number of threads may call ``run_shards`` on it at once (the Prefect flow's shard groups
do): together they never have more than ``run.workers`` shard tasks in flight, so a group
waiting on a straggler holds one slot, not the cluster, and memory stays bounded (a task that
waits on a pool gives its CPU back to Ray, which would otherwise start more shards).

A failure every shard would meet (a signal failing on most rows, a full or read-only output)
stops every caller: no more shards are started, those in flight are cancelled, and
``RunAborted`` is raised. So does an object store that stays unreachable: a unit whose storage
calls still fail after ``storage.retry_s`` (tasks/storage_retry.py), tried again and failing
again, means the store is down, and every other unit would wait out the same budget.

Units never raise to Ray: Ray prints each failed try's traceback, cut short, on the driver's
stderr (``(raylet) Task ... failed ... User exception: ...``), retried tries included. A unit
returns ``Failed`` instead, and the dispatcher tries it again itself (``run.task_retries`` times,
in Ray or in this process) and reports it in one line of its own. Ray's own retries
(``max_retries``) are left for what kills a try from outside: a worker or node lost.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from schemas.config import ConfigError, CurateConfig
from tasks.actors import (
    ModelFailing,
    Pools,
    PoolSpec,
    PoolUnavailable,
    pool_resources,
    pool_specs,
    start_pools,
    stop_pools,
)
from tasks.lock import lock_lost
from tasks.process import ShardResult, process_shard
from tasks.sources import SourceShard
from tasks.storage import is_remote, store_error_text
from tasks.storage_retry import REFUSALS, StoreUnavailable, retries_counted, retry_tally

log = logging.getLogger(__name__)

Finished = Callable[[ShardResult], None]


class RunAborted(RuntimeError):
    """A failure no retry or other shard can get past: the run stopped; a rerun resumes."""


# Errors of a file system that every shard would meet: a full or read-only one, and (for paths
# in the output only: a source file one cannot read is that shard's problem) a permission error.
FULL_OR_READ_ONLY = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
NOT_PERMITTED = frozenset({errno.EACCES, errno.EPERM})


def fatal_reason(exc: BaseException, out: str | Path) -> str | None:
    """The message to stop the run with, or None for a failure of this shard alone."""
    if isinstance(exc, ModelFailing | PoolUnavailable):  # every shard would meet a dead pool too
        return str(exc)
    if not isinstance(exc, OSError):
        return None
    if is_remote(out):
        return _store_refused(exc, str(out))
    in_out = bool(exc.filename) and Path(str(exc.filename)).resolve().is_relative_to(Path(out).resolve())
    if exc.errno in FULL_OR_READ_ONLY or (exc.errno in NOT_PERMITTED and in_out):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot write the output{where}: {exc.strerror or exc}"
    return None


def _store_refused(exc: OSError, out: str) -> str | None:
    """A refusal by the output's own bucket stops the run; one by a source's bucket is that shard's."""
    text, bucket = str(exc), urllib.parse.urlsplit(out).netloc
    if any(code in text for code in REFUSALS) and f"bucket '{bucket}'" in text:
        return f"cannot write the output {out}: {store_error_text(exc)}"
    return None


@dataclass
class Fatal:
    """What a shard task returns instead of raising, so that Ray does not retry it."""

    shard_id: str
    message: str


@dataclass
class Failed:
    """What a unit's try returns instead of raising (see the module's docstring)."""

    shard_id: str
    message: str
    store_down: bool = False  # a storage call still failed after storage.retry_s
    storage_retries: int = 0  # storage calls the try had tried again before it failed


def guarded(work: Callable[..., Any], unit_id: str, out: str) -> Any:
    """``work()``, counting its storage retries (``tasks.storage_retry.retries_counted``); a failure
    every unit would meet comes back as ``Fatal``, any other as ``Failed`` (tried again)."""
    with retry_tally():
        try:
            return work()
        except Exception as exc:
            if (message := fatal_reason(exc, out)) is not None:
                return Fatal(unit_id, message)
            return Failed(unit_id, f"{type(exc).__name__}: {exc}", store_down=isinstance(exc, StoreUnavailable),
                          storage_retries=retries_counted())


def _process_guarded(shard: SourceShard, pools: Pools | None, cfg: CurateConfig, out: str,
                     skip: frozenset[str]) -> ShardResult | Fatal:
    """One source shard of a curation run."""
    return guarded(lambda: process_shard(shard, cfg, out, pools, skip), shard.shard_id, out)


def check_fits(pool_cpus: float, pool_gpus: float) -> None:
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


class _RoomWatch:
    """Says so when a cluster that lost nodes has no CPU left for a shard task beside the model
    pools (the restarted actors took what is left): Ray then queues the shard tasks until a node
    joins, which looks like a hang. Not an error: an autoscaler may be adding the node."""

    def __init__(self, pool_cpus: float, every_s: float = 60.0):
        self.pool_cpus, self.every_s = pool_cpus, every_s
        self.last_progress = time.monotonic()
        self.warned = False

    def check(self, progressed: bool) -> None:
        now = time.monotonic()
        if progressed:
            self.last_progress, self.warned = now, False
            return
        if self.warned or now - self.last_progress < self.every_s:
            return
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if cpus - self.pool_cpus < 1:
            log.warning("no shard finished for %.0f s: the Ray cluster has %g CPUs and the model pools hold %g, "
                        "leaving none for a shard task (a node was lost?); the run waits until a node joins",
                        now - self.last_progress, cpus, self.pool_cpus)
            self.warned = True


class Dispatcher:
    """The units of one run or pass (source shards, curated parts), on Ray (``use_ray``) or in this
    process: ``work(unit, pools, *args)`` returns a result, or ``Fatal`` to stop everything."""

    def __init__(self, work: Callable[..., Any], args: tuple, out: str | Path, specs: list[PoolSpec], *,
                 workers: int, use_ray: bool, ray_retries: int, what: str = "shard"):
        """``args`` go to Ray's object store once; ``ray_retries``: the tries of a failed unit after
        its first (0 when a Prefect task retries the group, so the two do not multiply)."""
        self.work, self.args, self.out, self.specs, self.use_ray = work, args, out, specs, use_ray
        self.ray_retries, self.what = ray_retries, what
        self.slots = threading.BoundedSemaphore(workers)
        self.aborted: str | None = None
        self.units_retried = 0  # failed tries of units tried again
        self.failed_tries_storage_retries = 0  # storage retries of tries that failed (their results never came)
        self.pools: Pools | None = None
        self._start_lock = threading.Lock()
        self._remote: Any = None
        self._arg_refs: list[Any] = []
        self._room = _RoomWatch(pool_resources(specs)[0])

    @classmethod
    def for_curation(cls, cfg: CurateConfig, out: str | Path, skip: frozenset[str], models: list, *,
                     use_ray: bool, ray_retries: int) -> Dispatcher:
        return cls(_process_guarded, (cfg, str(out), skip), out, pool_specs(models), workers=cfg.run.workers,
                   use_ray=use_ray, ray_retries=ray_retries)

    def start(self) -> None:
        """Pools and the remote function, once (a run with nothing to do starts none)."""
        with self._start_lock:
            if self._remote is not None:
                return
            check_fits(*pool_resources(self.specs))
            self.pools = start_pools(self.specs)
            self._arg_refs = [ray.put(a) for a in self.args]
            self._remote = ray.remote(self.work).options(num_cpus=1, max_retries=self.ray_retries,
                                                         retry_exceptions=False)  # a unit returns Failed

    def batch_counts(self) -> dict[str, dict[str, int]]:
        """Per pool, the model batches its live actors ran and how many of them merged requests of
        several tasks (an actor that restarted counts from its restart)."""
        counts: dict[str, dict[str, int]] = {}
        for name, handles in (self.pools or {}).items():
            done = [0, 0]
            for h in handles:
                try:
                    batches, merged = ray.get(h.batch_counts.remote(), timeout=10)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    continue
                done = [done[0] + batches, done[1] + merged]
            counts[name] = {"batches": done[0], "merged": done[1]}
        return counts

    def close(self) -> None:
        if self.pools:
            stop_pools(self.pools)
        self.pools = None

    def run_shards(self, todo: list[SourceShard], finished: Finished) -> dict[str, str]:
        """Process ``todo``; returns shard_id -> error for those that failed (after Ray's retries).
        Raises ``RunAborted`` if the run was stopped (by this call or another)."""
        if not todo:
            return {}
        failed = self._on_ray(todo, finished) if self.use_ray else self._here(todo, finished)
        if self.aborted:
            raise RunAborted(self.aborted)
        return failed

    def _abort(self, result: Fatal) -> None:
        self.aborted = self.aborted or f"{self.what} {result.shard_id}: {result.message}"

    def _store_down(self, result: Failed, failed: dict[str, str]) -> None:
        """Stop handing out units: each would wait out the same budget and fail the same way."""
        detail = result.message.removeprefix(f"{StoreUnavailable.__name__}: ")
        self.aborted = self.aborted or (f"{detail}; no more {self.what}s were started; failed {self.what}s: "
                                        f"{', '.join(sorted(failed))}; run again to resume")

    def _check_lock(self) -> None:
        """A lost lease (the object store unreachable for its ttl, or the lock taken over) means
        another run may now own the output: stop handing out shards. Shards already in flight
        may still commit; their parts have names of their own, so neither run's files clash."""
        if not self.aborted and lock_lost(self.out):
            self.aborted = f"the lock on {self.out} was lost (see the log); run again to resume"

    def _here(self, todo: list[SourceShard], finished: Finished) -> dict[str, str]:
        failed: dict[str, str] = {}
        for shard in todo:
            tried, again = 0, True
            while again:
                self._check_lock()
                if self.aborted:
                    return failed
                tried += 1
                again = self._collect(lambda s=shard: self.work(s, None, *self.args), shard, failed, finished, tried)
        return failed

    def _on_ray(self, todo: list[SourceShard], finished: Finished) -> dict[str, str]:
        self.start()
        failed: dict[str, str] = {}
        pending: dict[Any, tuple[SourceShard, int]] = {}  # a try in flight, and how many tries that makes
        queue = [(shard, 1) for shard in reversed(todo)]
        while (queue and not self.aborted) or pending:
            self._check_lock()
            if self.aborted:  # another caller (or this one) stopped the run
                for ref in pending:
                    ray.cancel(ref, force=True)
                # gone before the lock is released: a next run must not meet them in _tmp/
                ray.wait(list(pending), num_returns=len(pending), timeout=60)
                for _ in pending:
                    self.slots.release()
                break
            if queue and self.slots.acquire(timeout=0 if pending else 0.5):
                shard, tried = queue.pop()
                pending[self._remote.remote(shard, self.pools, *self._arg_refs)] = shard, tried
                continue
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            self._room.check(bool(ready))
            for ref in ready:
                shard, tried = pending.pop(ref)
                self.slots.release()
                if self._collect(lambda r=ref: ray.get(r), shard, failed, finished, tried):
                    queue.append((shard, tried + 1))  # next out
        return failed

    def _collect(self, result_of: Callable[[], Any], shard: SourceShard, failed: dict[str, str],
                 finished: Finished, tried: int) -> bool:
        """One try's outcome, here or from Ray: done, the run stopped, or failed: True if the unit
        is to be tried again, else recorded in ``failed``."""
        try:
            result = result_of()
        except Exception as exc:  # Ray's own: the try's worker or node was lost, and so were Ray's retries
            cause = getattr(exc, "cause", None) or exc
            result, tried = Failed(shard.shard_id, f"{type(cause).__name__}: {cause}"), self.ray_retries + 1
        if isinstance(result, Fatal):
            self._abort(result)
            return False
        if not isinstance(result, Failed):
            finished(result)
            return False
        self.failed_tries_storage_retries += result.storage_retries
        if tried <= self.ray_retries and not self.aborted:
            self.units_retried += 1
            log.warning("%s %s failed (try %d of %d), trying it again: %s", self.what, shard.shard_id, tried,
                        self.ray_retries + 1, result.message)
            return True
        log.error("%s %s failed: %s", self.what, shard.shard_id, result.message)
        failed[shard.shard_id] = result.message
        if result.store_down:
            self._store_down(result, failed)
        return False
