"""Model-backed signals in Ray actor pools: each model loaded once per actor, fed in batches.

The driver starts one pool per model signal, sized from that signal's params (actors,
cpus_per_actor, gpus_per_actor), and hands the actor handles to every shard task. A shard
task decodes and prepares its images (``ModelSignal.prepare``) and sends batches to the
pool, so the image is decoded once, in the task, and the model never is loaded twice.

Faults are told apart by what they say about the row. A model that raises on an input is
that input's error (``ItemError``, with the model's own text). An actor that dies is, by
default, no fault of the row: it was OOM-killed, its node was preempted, someone killed it,
or another shard's input crashed it. Ray reports all of these alike (``ActorUnavailableError``
for the calls it was serving), so the batch is sent again once, then its inputs one at a
time, each only after an actor of the pool answers ``ready``. Only an input whose lone call
kills a live actor twice is rejected for it. Actors restart without limit (a finite budget
would be spent by that many poison images over a long run); a pool none of whose actors
comes back fails the shard (``PoolUnavailable``), so a later run redoes it.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from schemas.config import ConfigError
from tasks.signals import Signal
from tasks.signals.base import ModelSignal

log = logging.getLogger(__name__)

Pools = dict[str, list[Any]]  # signal name -> actor handles


# How long a dead actor may take to come back (reload its model) before its pool counts as gone.
RESTART_TIMEOUT_S = 600.0
# Deaths of a live actor, each on one input sent alone, that make the input the cause.
DEATHS_TO_BLAME = 2


@dataclass(frozen=True)
class ItemError:
    """One input the model could not take: the text of the model's own error."""

    error: str


class PoolUnavailable(RuntimeError):
    """No actor of a pool answers: the shard fails (and is redone later), rows are not blamed."""


# max_restarts=-1: a finite budget is spent by that many poison images over a long run, and then
# every later shard fails. max_task_retries=0: Ray would rerun a killing batch on the restarted
# actor, only to die again; infer_on_pool retries (item by item) itself.
@ray.remote(max_restarts=-1, max_task_retries=0)
class SignalActor:
    """Holds one loaded model signal."""

    def __init__(self, cls: type[ModelSignal], params: dict[str, Any]):
        """``cls`` itself, not its name, so a signal the driver registered (a test's) loads too."""
        self.signal = cls(cls.Params.model_validate(params))
        self.signal.ensure_setup()

    def infer(self, inputs: list[Any]) -> list[dict[str, Any]]:
        return self.signal.infer(inputs)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """For tests and operators who kill an actor on purpose."""
        import os

        return os.getpid()


def pool_resources(signals: Sequence[Signal]) -> tuple[float, float]:
    """(CPUs, GPUs) that the pools of these signals reserve."""
    model = [s for s in signals if s.uses_actor]
    return (sum(s.params.actors * s.params.cpus_per_actor for s in model),
            sum(s.params.actors * s.params.gpus_per_actor for s in model))


def start_pools(signals: Sequence[Signal], timeout_s: float = 900.0) -> Pools:
    """Start every model signal's actors and wait until each has loaded its model, so a
    missing weight file fails the run at start, not hours in; never wait forever."""
    pools: Pools = {}
    for s in signals:
        if not s.uses_actor:
            continue
        p = s.params
        pools[s.name] = [
            SignalActor.options(num_cpus=p.cpus_per_actor, num_gpus=p.gpus_per_actor).remote(
                type(s), p.model_dump())
            for _ in range(p.actors)
        ]
    try:
        ray.get([h.ready.remote() for handles in pools.values() for h in handles], timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        stop_pools(pools)  # a model that does not load is the config's (weights, setup), not a bug here
        raise ConfigError(f"the model pools of {', '.join(pools)} did not start within {timeout_s:g} s: "
                          f"{_cause_text(exc)}") from exc
    return pools


def stop_pools(pools: Pools) -> None:
    for handles in pools.values():
        for h in handles:
            ray.kill(h)


Result = dict[str, Any] | ItemError


def infer_on_pool(handles: list[Any], inputs: list[Any], batch_size: int) -> list[Result]:
    """Spread batches over the pool from a random actor; one value dict, or an ``ItemError``,
    per input. A batch that fails is sent again whole once (its actor was killed from outside,
    say), then one input at a time (see the module docstring)."""
    if not inputs:
        return []
    start = random.randrange(len(handles))
    actors = itertools.cycle(handles[start:] + handles[:start])
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    refs = [next(actors).infer.remote(b) for b in batches]
    out: list[Result] = []
    for batch, ref in zip(batches, refs, strict=True):
        try:
            out += ray.get(ref)
            continue
        except ray.exceptions.RayTaskError as exc:  # the model raised: find the input(s), keep the rest
            log.warning("the model raised on a batch (%s); retrying its inputs one by one", _cause_text(exc))
        except ray.exceptions.RayError:  # the actor died: likely no fault of this batch, send it again
            log.warning("a model actor died during a batch; sending the batch again")
            try:
                out += ray.get(_ready_actor(handles).infer.remote(batch))
                continue
            except ray.exceptions.RayError:
                log.warning("the batch failed again; retrying its inputs one by one")
        out += [_infer_one(handles, item) for item in batch]
    return out


def _infer_one(handles: list[Any], item: Any) -> Result:
    """One input alone, on an actor that has just answered ``ready``."""
    deaths = 0
    while True:
        try:
            return ray.get(_ready_actor(handles).infer.remote([item]))[0]
        except ray.exceptions.RayTaskError as exc:
            return ItemError(_cause_text(exc))
        except ray.exceptions.RayError as exc:
            deaths += 1
            if deaths >= DEATHS_TO_BLAME:
                return ItemError(f"the model's actor died {deaths} times on this input alone: {_cause_text(exc)}")
            log.warning("a model actor died on one input sent alone; trying it once more")


def _cause_text(exc: Exception) -> str:
    """The model's own error (``ValueError: ...``), not Ray's traceback wrapper; the first line
    of anything else."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _ready_actor(handles: list[Any], timeout_s: float | None = None) -> Any:
    """The first actor of the pool to answer ``ready`` (it has loaded its model), waiting
    through restarts. Raises ``PoolUnavailable`` when every actor is dead for good (killed
    with ``ray.kill``) or none answers within ``timeout_s``."""
    timeout_s = RESTART_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    live = list(handles)
    while live and time.monotonic() < deadline:
        pending = {h.ready.remote(): h for h in live}
        while pending and time.monotonic() < deadline:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            for ref in done:
                handle = pending.pop(ref)
                try:
                    ray.get(ref)
                    return handle
                except ray.exceptions.RayError:
                    if _dead_for_good(handle):
                        live.remove(handle)
        time.sleep(0.2)
    raise PoolUnavailable("a model actor died and did not come back" if not live else
                          f"no model actor answered within {timeout_s:.0f} s")


def _dead_for_good(handle: Any) -> bool:
    """DEAD (not RESTARTING) in the cluster's actor table: killed with ``ray.kill``, or out of restarts."""
    try:
        from ray._private.state import state

        return state.actor_table(handle._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # an API that moved: keep waiting until the deadline instead
        return False

