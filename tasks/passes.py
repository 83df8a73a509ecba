"""Running a sidecar pass (tasks/sidecar.py) over a curated output: check, lock, plan, Ray, parts.

Everything that can refuse the pass (not a curated output, a model folder missing, a set made
with other settings) is checked before the lock is taken or Ray starts, so a wrong path fails in
seconds with a message naming it. Parts run as Ray tasks through the same ``Dispatcher`` as
curation's shards (bounded in flight, a model failing on most rows stops every part), their
stages on pools started once for the whole pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.config import ConfigError
from tasks.actors import Pools, pool_resources
from tasks.dispatch import Dispatcher, RunAborted, guarded
from tasks.lock import output_lock
from tasks.shards import MANIFEST
from tasks.sidecar import PART_MANIFEST, Part, PartResult, SidecarPass, guard_set, list_parts, plan_parts, process_part
from tasks.storage import Store, as_store
from tasks.storage_retry import retry_tally

log = logging.getLogger(__name__)

__all__ = ["NotCurated", "PassSummary", "RunAborted", "run_pass"]


class NotCurated(ConfigError):
    """``--shards`` is not the output of ``t2i curate``."""


@dataclass
class PassSummary:
    out: str
    set: str
    parts_total: int = 0
    parts_skipped: int = 0  # done by an earlier run
    parts_done: int = 0
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # per stage, this run
    resumed_groups: int = 0
    set_rows: int = 0  # the whole set's rows after the run (earlier runs' parts included)
    model_batches: dict[str, dict[str, int]] = field(default_factory=dict)  # per stage: batches, merged
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # part -> error
    storage_retries: int = 0  # storage calls tried again after a transient error (parts' and the driver's)
    units_retried: int = 0  # failed tries of shards or parts that were tried again (run.task_retries)

    def add(self, result: PartResult) -> None:
        self.parts_done += 1
        self.rows += result.rows
        self.resumed_groups += result.resumed_groups
        self.storage_retries += result.storage_retries
        for stage, n in result.errors.items():
            self.errors[stage] = self.errors.get(stage, 0) + n

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _part_guarded(part: Part, pools: Pools | None, spec: SidecarPass, out: str) -> Any:
    """One part as a Ray task; a model failing on most rows stops the pass (``Fatal``)."""
    return guarded(lambda: process_part(part, pools, spec, out), part.shard_id, out)


def check_pass(out: str | Path, spec: SidecarPass) -> Store:
    """What refuses the pass, before anything is written: the output, the models, the set's stamp."""
    store = as_store(out, spec.storage)
    store.check()
    if not store.list(MANIFEST, ".json") and not store.list("shards", ".parquet"):
        raise NotCurated(f"{store.url()} is not a t2i curate output (no _manifest/ or shards/): "
                         "run `t2i curate` first and pass its --out")
    for plan in spec.stages:
        plan.stage.check()
    guard_set(store, spec, write=False)
    return store


def run_pass(out: str | Path, spec: SidecarPass, *, use_ray: bool = True, command: str = "t2i caption",
             progress: Callable[[PartResult], None] | None = None) -> PassSummary:
    """Every part of ``out``'s shards not yet in the set (or changed since); the output's lock held."""
    from tasks.runner import join_ray  # late: the runner imports the curation chain

    started = time.perf_counter()
    store = check_pass(out, spec)
    url = store.url()
    summary = PassSummary(url, spec.name)
    with retry_tally() as driver, output_lock(out, f"{command} --shards {out}", storage=spec.storage):
        parts = list_parts(store)
        todo = plan_parts(store, spec, parts)
        summary.parts_total, summary.parts_skipped = len(parts), len(parts) - len(todo)
        guard_set(store, spec, write=True)
        specs = [p.stage.pool_spec(p.resources, p.batch_size) for p in spec.stages]
        if todo and use_ray:
            join_ray(spec.run, url, pool_resources(specs)[0])
        dispatcher = Dispatcher(_part_guarded, (spec, url), url, specs, workers=spec.run.workers, use_ray=use_ray,
                                ray_retries=spec.run.task_retries, what="part")

        def finished(result: PartResult) -> None:
            summary.add(result)
            if progress:
                progress(result)

        try:
            summary.failed.update(dispatcher.run_shards(todo, finished))
            summary.model_batches = dispatcher.batch_counts()
        finally:
            dispatcher.close()
            summary.units_retried += dispatcher.units_retried
            summary.storage_retries += dispatcher.failed_tries_storage_retries
    summary.set_rows = _set_rows(store, spec.name)
    summary.storage_retries += driver.retries
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _set_rows(store: Store, name: str) -> int:
    import json

    return sum(json.loads(store.read_bytes(e.rel)).get("rows", 0)
               for e in store.list(f"{name}/{PART_MANIFEST}", ".json"))
