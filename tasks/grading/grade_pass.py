"""The grade pass: a fitted level model (tasks/grading/model.py) over every row of a curated
output, as a sidecar set (tasks/sidecar.py), ``{out}/grades/{part}.parquet`` by default::

    key, quality_level int8 (1..5), quality_confidence float32 (its probability), grade_model string, grade_error

The stage reads the model's feature columns (a column a part lacks reads null and is imputed, as
in training) and its actors load the model from ``model_path`` (a local file every worker can
read). The set's stamp holds the model's id (a hash of its contents) and features, so a rerun
with another model is refused (``SetChanged``): write it as a new set (``set_name``) instead.
The trainer selects on the set's columns (``select: {quality_level: {min: 4}}``, trainer/row_index.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from schemas.config import ConfigError, RunConfig, StorageConfig, Strict
from tasks.actors import Resources
from tasks.grading.model import GradeModel
from tasks.passes import PassSummary, run_pass
from tasks.sidecar import PartResult, SidecarPass, StagePlan
from tasks.stage import Stage

GRADE_ERROR = pa.field("grade_error", pa.string())


class GradeParams(Strict):
    model_path: str
    model_id: str
    features: list[str]


class GradeStage(Stage):
    name: ClassVar[str] = "grade"
    reads: tuple[str, ...] = ()  # per instance: the model's features
    writes: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("quality_level", pa.int8()),
        pa.field("quality_confidence", pa.float32()),
        pa.field("grade_model", pa.string()),
    )
    Params: ClassVar[type[GradeParams]] = GradeParams

    def __init__(self, params: GradeParams):
        super().__init__(params)
        self.params: GradeParams = params
        self.reads = tuple(params.features)
        self.model: GradeModel | None = None

    @classmethod
    def from_path(cls, model_path: str | Path) -> GradeStage:
        path = str(Path(model_path).resolve())
        model = _load(path)
        return cls(GradeParams(model_path=path, model_id=model.model_id, features=model.features))

    def check(self) -> None:
        _load(self.params.model_path, self.params.model_id)

    def prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        return {c: row.get(c) for c in self.reads}

    def setup(self) -> None:
        self.model = _load(self.params.model_path, self.params.model_id)

    def infer(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.model is not None
        levels, confidence = self.model.predict_rows(inputs)
        mid = self.params.model_id
        return [{"quality_level": int(lv), "quality_confidence": float(c), "grade_model": mid}
                for lv, c in zip(levels, confidence, strict=True)]


def _load(path: str, model_id: str | None = None) -> GradeModel:
    if not Path(path).is_file():
        raise ConfigError(f"grade model not found: {path} (fit one with tasks.grading.model.fit_grades and save it)")
    model = GradeModel.load(path)
    if model_id is not None and model.model_id != model_id:
        raise ConfigError(f"{path} now holds model {model.model_id}, not {model_id}: it changed after the pass began")
    return model


def grade_pass(model_path: str | Path, *, set_name: str = "grades", run: RunConfig | None = None,
               storage: StorageConfig | None = None, resources: Resources | None = None,
               request_rows: int = 256, batch_size: int = 1024) -> SidecarPass:
    """The pass that writes the model's level for every row into the set ``set_name``."""
    stage = GradeStage.from_path(model_path)
    plan = StagePlan(stage, resources or Resources(cpus=1.0, gpus=0.0, actors=1), request_rows, batch_size)
    definition = {"stage": stage.name, "model": stage.params.model_id, "features": list(stage.params.features)}
    return SidecarPass(set_name, (plan,), definition, error_field=GRADE_ERROR, run=run or RunConfig(),
                       storage=storage or StorageConfig())


def predict_pool(shards: str | Path, model_path: str | Path, *, set_name: str = "grades", use_ray: bool = True,
                 run: RunConfig | None = None, storage: StorageConfig | None = None,
                 progress: Callable[[PartResult], None] | None = None) -> PassSummary:
    """Grade every part of the curated output ``shards`` not yet in the set (or changed since)."""
    spec = grade_pass(model_path, set_name=set_name, run=run, storage=storage)
    return run_pass(shards, spec, use_ray=use_ray, command="t2i grade predict", progress=progress)
