"""The curation config: one YAML file, validated before any work starts.

Every section forbids unknown keys, so a typo (``sharpnes:``) is an error at start-up
rather than a rule that silently never runs over a billion rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(Strict):
    """How to read the input; column names apply to Parquet sources."""

    image_column: str = "jpg"
    caption_column: str = "caption"
    key_column: str = "key"
    folder_chunk: int = Field(1000, ge=1, description="images per work unit for folder sources")
    batch_rows: int = Field(256, ge=1, description="rows per Arrow batch read from a source")
    # A tar that breaks part-way: "fail" fails the shard (retried, reported, not marked done,
    # so a later run redoes it once the file is fixed); "salvage" keeps the rows before the
    # break and adds one source_unreadable reject row standing for the rest.
    unreadable: Literal["fail", "salvage"] = "fail"


class DecodeConfig(Strict):
    """Guards applied before a single pixel is decoded."""

    max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb limit (upright w*h)")
    max_file_bytes: int = Field(64 * 2**20, ge=1)


class Bounds(Strict):
    """Inclusive bounds on one signal column; either may be left out."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is None and self.max is None:
            raise ValueError("a rule needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class BucketConfig(Strict):
    """Equal-area aspect buckets (kohya-ss / NovelAI): 1024 for stage 2, 512 for stage 1."""

    base_side: int = Field(1024, ge=64, multiple_of=64)
    min_side: int = Field(256, ge=64, multiple_of=64)
    max_side: int = Field(2048, ge=64, multiple_of=64)
    step: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _sides(self) -> BucketConfig:
        if not self.min_side <= self.base_side <= self.max_side:
            raise ValueError("buckets need min_side <= base_side <= max_side")
        return self


class OutputConfig(Strict):
    max_rows_per_shard: int = Field(5000, ge=1)
    max_bytes_per_shard: int = Field(512 * 2**20, ge=1024)
    row_group_rows: int = Field(256, ge=1, description="Parquet row group size: readers fetch one group at a time")


class RunConfig(Strict):
    """Where the work runs. ``ray_address`` None means RAY_ADDRESS, else a local runtime."""

    workers: int = Field(2, ge=1, description="concurrent source shards (one CPU each)")
    ray_address: str | None = None
    task_retries: int = Field(1, ge=0)


# Kolors' stage-2 filters, cheapest first. The aesthetic signal is not on by default: its
# weights (CLIP ViT-L/14 + the LAION head) must be put on disk and named in the config.
DEFAULT_SIGNALS: dict[str, dict[str, Any]] = {
    "resolution": {},
    "caption": {},
    "sharpness": {},
    "phash": {},
    "faces": {},
    "quality": {},
    "ocr": {},
}

DEFAULT_RULES: dict[str, dict[str, float]] = {
    "short_side": {"min": 256},
    "aspect_ratio": {"min": 1 / 3, "max": 3.0},
    "caption_chars": {"max": 4096},
    "sharpness": {"min": 50},
    "face_count": {"max": 4},  # crowds of small faces are what a T2I model draws worst
    "ocr_area_ratio": {"max": 0.3},  # text-dominated images (slides, documents, memes)
}


class CurateConfig(Strict):
    """The whole config. ``signals`` maps a signal name to its parameters; ``rules`` maps a
    signal column to its bounds. Both are checked against the signal registry."""

    source: SourceConfig = SourceConfig()
    decode: DecodeConfig = DecodeConfig()
    signals: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_SIGNALS))
    rules: dict[str, Bounds] = Field(
        default_factory=lambda: {k: Bounds(**v) for k, v in DEFAULT_RULES.items()}
    )
    buckets: BucketConfig = BucketConfig()
    output: OutputConfig = OutputConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _signals_and_rules_exist(self) -> CurateConfig:
        from tasks.signals import check_config  # late: the registry imports signal modules

        check_config(self.signals, self.rules)
        return self

    def without_rules(self) -> CurateConfig:
        """The same config for `t2i analyze`: every registered signal, no rule."""
        from tasks.signals import all_signal_names

        signals = {name: self.signals.get(name, {}) for name in all_signal_names()}
        return self.model_copy(update={"rules": {}, "signals": signals})


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and why."""


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file, bad YAML or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Read a YAML mapping and validate it as ``model``; any problem is a ConfigError naming the file."""
    data = read_yaml_mapping(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def load_config(path: str | Path | None) -> CurateConfig:
    """Read and validate a curation YAML config; None gives the defaults."""
    return CurateConfig() if path is None else load_yaml_model(path, CurateConfig)
