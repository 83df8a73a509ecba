"""Model-backed signals in Ray actor pools: each model loaded once per actor, fed in batches.

The driver starts one pool per model signal, sized from that signal's params (actors,
cpus_per_actor, gpus_per_actor), and hands the actor handles to every shard task. A shard
task decodes and prepares its images (``ModelSignal.prepare``) and sends batches to the
pool, so the image is decoded once, in the task, and the model never is loaded twice.

An input that kills its actor (a native crash: no Python exception to catch) must cost its own
row, not the shard, nor the pool every other shard shares: actors restart without limit and
``infer_on_pool`` turns the death into a per-item retry, where the killer gets None (a
``signal_error_*`` reject) once its actor is back.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence
from typing import Any

import ray

from tasks.signals import Signal
from tasks.signals.base import ModelSignal

log = logging.getLogger(__name__)

Pools = dict[str, list[Any]]  # signal name -> actor handles


# How long a dead actor may take to come back (reload its model) before its pool counts as gone.
RESTART_TIMEOUT_S = 600.0


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
    except Exception:
        stop_pools(pools)
        raise
    return pools


def stop_pools(pools: Pools) -> None:
    for handles in pools.values():
        for h in handles:
            ray.kill(h)


def infer_on_pool(handles: list[Any], inputs: list[Any], batch_size: int) -> list[dict[str, Any] | None]:
    """Spread batches over the pool from a random actor; a batch that fails (the model raised,
    or its actor died) is retried one input at a time, so one bad input costs its own row
    (None), not the batch, nor the batches of other shards that were queued on that actor."""
    if not inputs:
        return []
    start = random.randrange(len(handles))
    actors = itertools.cycle(handles[start:] + handles[:start])
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    refs = [next(actors).infer.remote(b) for b in batches]
    out: list[dict[str, Any] | None] = []
    for batch, ref in zip(batches, refs, strict=True):
        try:
            out += ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError):
            log.warning("a batch failed on the pool; retrying its inputs one by one", exc_info=True)
            out += [_infer_one(next(actors), item) for item in batch]
    return out


def _infer_one(handle: Any, item: Any) -> dict[str, Any] | None:
    """One input alone: None when the model raises on it or its actor dies on it. An actor that
    then does not answer ``ready`` is gone for good (killed, its node lost), which is no fault
    of the input: that raises, failing the shard (to be redone), instead of rejecting every row."""
    try:
        return ray.get(handle.infer.remote([item]))[0]
    except ray.exceptions.RayTaskError:
        return None
    except ray.exceptions.RayActorError:
        log.warning("a model actor died on one input; waiting for its restart")
        try:
            ray.get(handle.ready.remote(), timeout=RESTART_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            raise RuntimeError("a model actor died and did not come back") from exc
        return None
