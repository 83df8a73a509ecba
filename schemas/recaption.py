"""The config of a caption pass (``t2i caption``): which captioner and translator, their settings,
and the resources of each stage. Validated whole before any work, like the curation config.

What makes a caption set (``captioner``, ``translator``, ``protect``) is stamped into the set's
folder: a rerun with any of it changed is refused, naming what changed, so one set never mixes
captions of two models or prompts. ``stages``, ``run``, ``decode`` and ``storage`` say how the work
runs, not what it writes, and may change between runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from schemas.config import (
    DeadlinePerRowSeconds,
    DeadlineSeconds,
    DecodeConfig,
    RunConfig,
    StorageConfig,
    Strict,
    load_yaml_model,
)

# Settings that change how a pass runs, not what it writes: free to change on resume.
RESUMABLE = ("stages", "run", "decode", "storage")
# A model's settings that say where it is and runs, not what it writes.
_WHERE = ("path", "tokenizer_path", "device", "inter_threads", "intra_threads")
_PATHS = ("path", "tokenizer_path")


class StageResources(Strict):
    """One model stage's pool and its two batch sizes."""

    actors: int = Field(1, ge=1, description="actors in the stage's pool (one model copy each)")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPU share per actor; 0 runs the model on CPU")
    request_rows: int = Field(8, ge=1, description="rows a part task sends the pool per request")
    batch_size: int = Field(16, ge=1, description="the model's own batch: requests of many parts are merged up to it")
    # Longer than a signal's (schemas/config.py): a VLM on a CPU takes tens of seconds a caption.
    deadline_s: DeadlineSeconds = 300.0
    deadline_per_row_s: DeadlinePerRowSeconds = 60.0


def _default_stages() -> dict[str, StageResources]:
    return {"recaption": StageResources(), "translate": StageResources(request_rows=32, batch_size=32)}


class ProtectConfig(Strict):
    """Spans the translation must keep verbatim: quoted text (the OCR strings, always) and these nouns."""

    nouns: list[str] = Field(default_factory=list, description="kept as written, e.g. 故宫, 月饼, Forbidden City")


class CaptionOutput(Strict):
    name: str = Field("captions", description="the caption set's folder in the curated output")

    @field_validator("name")
    @classmethod
    def _plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) or v in ("shards", "rejects") or v.startswith("_"):
            raise ValueError(f"{v!r} is not a caption set name (letters, digits, . _ -; not shards or rejects)")
        return v


class RecaptionConfig(Strict):
    captioner: dict[str, Any]
    translator: dict[str, Any] | None = Field(None, description="none: English captions only")
    protect: ProtectConfig = ProtectConfig()
    stages: dict[str, StageResources] = Field(default_factory=_default_stages)
    output: CaptionOutput = CaptionOutput()
    run: RunConfig = RunConfig()
    decode: DecodeConfig = DecodeConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _backends(self) -> RecaptionConfig:
        """The backend sections validate against their own Params (a typo is an error at start)."""
        from captioners import build_captioner, build_translator  # late: they import torch helpers

        build_captioner(self.captioner)
        if self.translator is not None:
            build_translator(self.translator)
        unknown = set(self.stages) - {"recaption", "translate"}
        if unknown:
            raise ValueError(f"stages: unknown stage {', '.join(sorted(unknown))} (recaption, translate)")
        return self

    def resources(self, stage: str) -> StageResources:
        return self.stages.get(stage) or _default_stages()[stage]

    def set_definition(self) -> dict[str, Any]:
        """What the stamp compares: every setting that changes what is written, filled in. A model
        is named by its ``model_id`` (folder name and a hash of its files), not its path, so
        weights moved to another disk are the same set; ``device`` only says where it runs."""
        from captioners import build_captioner, build_translator

        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in RESUMABLE}
        models = [("captioner", build_captioner(self.captioner))]
        if self.translator is not None:
            models.append(("translator", build_translator(self.translator)))
        for section, model in models:
            params = model.params.model_dump(mode="json")
            data[section] = {k: v for k, v in params.items() if k not in _WHERE} | {"model": model.model_id}
        return data

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, data: Any) -> Any:
        """Model paths relative to where the command runs, made absolute: actors on Ray run elsewhere."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section in ("captioner", "translator"):
            if isinstance(data.get(section), dict):
                data[section] = {k: str(Path(v).expanduser().absolute()) if k in _PATHS and isinstance(v, str) else v
                                 for k, v in data[section].items()}
        return data


def load_recaption_config(path: str | Path) -> RecaptionConfig:
    """Read and validate a caption config; any problem is a ConfigError naming the file and key."""
    return load_yaml_model(path, RecaptionConfig)
