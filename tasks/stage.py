"""A stage: one step of a pass over curated shards that declares what it reads, writes and needs.

``reads`` names the columns it takes (from the part or from an earlier stage), ``writes`` its Arrow
fields. ``prepare`` runs in the part task, on a CPU (decode and resize an image once, protect a
span); ``setup`` loads the model once per actor and ``infer`` runs one model batch there. The
pass (tasks/sidecar.py) starts one pool per stage from ``pool_spec`` for the whole pass, so the
model loads once, and requests of many parts are merged into its batches (tasks/actors.py). A
stage's class is what the actor builds, as a model signal's is in curation: one mechanism.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel

from tasks.actors import PoolSpec, Resources


class Stage:
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]]
    writes: ClassVar[tuple[pa.Field, ...]]
    Params: ClassVar[type[BaseModel]]
    _ready: bool = False

    def __init__(self, params: BaseModel):
        self.params = params

    def check(self) -> None:
        """Fail fast, before Ray starts, on what would fail every actor (a missing model folder)."""

    def wants(self, row: dict[str, Any]) -> bool:
        """Whether this row has what the stage needs (an empty English caption is not translated)."""
        return True

    def prepare(self, row: dict[str, Any]) -> Any:
        """In the part task: the row's ``reads`` to a small picklable model input."""
        return {c: row.get(c) for c in self.reads}

    def setup(self) -> None:
        """Load the model (local files only); once per actor."""

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def infer(self, inputs: list[Any]) -> list[dict[str, Any]]:
        """One model batch: a dict of ``writes`` values per input."""
        raise NotImplementedError

    def pool_spec(self, resources: Resources, batch_size: int) -> PoolSpec:
        """``resources`` hold the deadline of one model call too (a stage's ``deadline_s`` and
        ``deadline_per_row_s``, as a model signal's): past it the actor is ended (tasks/actors.py)."""
        return PoolSpec(self.name, type(self), self.params.model_dump(mode="json"), resources, batch_size)

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in cls.writes]
