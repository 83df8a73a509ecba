"""The curation config: one YAML file, validated before any work starts.

Every section forbids unknown keys, so a typo (``sharpnes:``) is an error at start-up
rather than a rule that silently never runs over a billion rows. Every error names the
dotted path of its key (``signals.sharpness.short_side: ...``), and a rule bound outside
what its column can hold (``rules.short_side.min: -256``) is an error too.

How a config merges with the defaults:

- ``source``, ``decode``, ``buckets``, ``output``, ``run`` and ``storage`` merge key by key: a key left
  out keeps its default, so ``run: {workers: 8}`` changes only the worker count.
- ``signals:`` replaces the default signal list: only the signals it names run.
- ``rules:`` replaces the default rules: exactly the rules it lists apply (``rules: {}``
  applies none), whatever ``signals:`` says.
- No ``rules:`` gives the default rules on the columns of the enabled signals only:
  ``signals: {resolution: {}}`` alone gets the default ``short_side`` and ``aspect_ratio``
  rules, not the default ``sharpness`` rule of a signal it did not enable.
- No ``signals:`` (and no ``rules:``) gives all the default signals and all the default rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from synth_text.config import SynthConfig

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# How long one model call (a signal's, a stage's) may run before its actor is ended and the call is
# handled as the actor's death (tasks/actors.py). Generous: it is there to end a hung model, not a slow one.
DEADLINE_S = 60.0
DEADLINE_PER_ROW_S = 10.0
DeadlineSeconds = Annotated[float, Field(gt=0, le=1e6, description=(
    "seconds one model call may run, plus deadline_per_row_s for each row in it; past that its actor is "
    "ended and restarted, and an input that outlasts it twice alone is rejected"))]
DeadlinePerRowSeconds = Annotated[float, Field(ge=0, le=1e5, description="seconds added to deadline_s per row")]


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
    synth: SynthConfig | None = Field(None, description="the synthetic text source (t2i synth) renders with these")
    changed: Literal["refuse", "recurate"] = Field(
        "refuse",
        description="a rerun that finds a source shard recorded as done changed since (size or modification "
        "time): 'refuse' stops with a message naming it; 'recurate' curates it again, replacing its old rows",
    )


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
            raise ValueError(f"min {self.min:.15g} is above max {self.max:.15g}")
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
    max_signal_error_fraction: float = Field(
        0.5, gt=0, le=1,
        description="a signal failing on more than this fraction of the rows of a shard it ran on fails the "
        "shard and the run (a broken model or setup, not bad rows); below it, each failed row is a "
        "signal_error_<signal> reject",
    )
    ray_connect_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="seconds joining the cluster at RAY_ADDRESS may take before the run fails"
    )
    attempt_ttl_s: float = Field(
        120.0, ge=1, le=86400,
        description="a shard attempt renews its record every ttl/4; another attempt's parts are removed only once it "
        "lost the commit, its process is gone, or its record is older than this (tasks/attempts.py)",
    )


class StorageConfig(Strict):
    """Object storage (``s3://``, ``gs://``) for the source and the output. What is left out comes
    from the standard variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...)
    and ``~/.aws``. Keys given here are secrets: never shown, and stored as ``**********`` in the
    output's run stamp."""

    endpoint_url: str | None = Field(None, description="an S3-compatible server (MinIO, SeaweedFS): http://host:port")
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    anonymous: bool = Field(False, description="public buckets: send no credentials")
    lease_ttl_s: float = Field(
        120.0, ge=1, le=3600,
        description="an object-store output's lock is a lease renewed every ttl/3; a run killed without "
        "releasing it blocks others for at most this long, and a run that cannot renew it for this long "
        "stops (so it is above retry_s: an outage the retries ride out must not lose the lease)",
    )
    retry_s: float = Field(
        90.0, ge=0, le=86400,
        description="how long a storage call is retried after transient errors (connection refused or reset, "
        "timeouts, HTTP 5xx, throttling), with exponential backoff and jitter, before its unit fails: long "
        "enough for a one-minute outage; 0 tries once",
    )


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
    signal column to its bounds. Both are checked against the signal registry; how they
    merge with the defaults is in the module docstring."""

    source: SourceConfig = SourceConfig()
    decode: DecodeConfig = DecodeConfig()
    signals: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_SIGNALS))
    rules: dict[str, Bounds] = Field(
        default_factory=lambda: {k: Bounds(**v) for k, v in DEFAULT_RULES.items()}
    )
    buckets: BucketConfig = BucketConfig()
    output: OutputConfig = OutputConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="before")
    @classmethod
    def _default_rules_of_enabled_signals(cls, data: Any) -> Any:
        """Signals without rules get the default rules of those signals only: the full default
        set would fail on a rule (sharpness, say) for a signal the config never asked for.
        Given rules (a stored ``model_dump`` always has them) are left exactly as they are."""
        if not isinstance(data, dict) or "rules" in data or not isinstance(data.get("signals"), dict):
            return data
        from tasks.signals import column_owner  # late: the registry imports signal modules

        owner = column_owner()
        rules = {col: bounds for col, bounds in DEFAULT_RULES.items() if owner.get(col) in data["signals"]}
        return {**data, "rules": rules}

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


def format_validation_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> str:
    """One line per error, ``dotted.key: message``: pydantic's own text puts the key on one line
    and the message on the next, and leaves out where a nested model sits (``prefix``)."""
    lines = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(part) for part in (*prefix, *err["loc"]))
        message = err["msg"].removeprefix("Value error, ")  # our own messages need no label
        lines.append(f"{path}: {message}" if path else message)
    return "\n".join(lines)


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Read a YAML mapping and validate it as ``model``; any problem is a ConfigError naming the file."""
    data = read_yaml_mapping(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc).splitlines()
        raise ConfigError("\n".join(f"{path}: {line}" for line in lines)) from exc


def load_config(path: str | Path | None) -> CurateConfig:
    """Read and validate a curation YAML config; None gives the defaults."""
    return CurateConfig() if path is None else load_yaml_model(path, CurateConfig)


def config_differences(before: Mapping[str, Any], now: Mapping[str, Any], free: tuple[str, ...] = ()) -> list[str]:
    """The dotted paths of the settings that differ between two config dumps, sorted, leaving out
    any path equal to or under an entry of ``free``. A resume refused for ``source.unreadable``
    can say so, where "differs in source" leaves the user to diff the files. A key present on
    one side only (a signal added or removed) is one path: ``signals.aesthetic``."""
    return sorted(p for p in _differing_paths(before, now, "") if not _is_free(p, free))


_ABSENT = object()


def _differing_paths(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str) -> Iterator[str]:
    for key in before.keys() | now.keys():
        path, old, new = f"{prefix}{key}", before.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            yield from _differing_paths(old, new, f"{path}.")
        elif old != new:
            yield path


def _is_free(path: str, free: tuple[str, ...]) -> bool:
    return any(path == f or path.startswith(f"{f}.") for f in free)
