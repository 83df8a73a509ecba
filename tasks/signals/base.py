"""What a signal is: a small object that turns one sample into a few named values.

A signal declares the Arrow fields it produces, its cost rank (the cascade runs cheap
signals, and their rules, before expensive ones) and the pixel size it needs
(None: the header is enough). Model-backed signals (faces, OCR, aesthetic) override
``compute_batch`` and run in Ray actors; the cheap ones just implement ``compute``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from schemas.config import DEADLINE_PER_ROW_S, DEADLINE_S, DeadlinePerRowSeconds, DeadlineSeconds
from tasks.decode import ImageSample

# Column -> (lowest, highest) value it can take; None: no limit that way.
Ranges = dict[str, tuple[float | None, float | None]]


SMALL_FILE = 1 << 20  # files up to this size are hashed whole in a model's id


def _content_sample(path: Path, size: int, chunk: int = 1 << 16) -> bytes:
    """A small file whole; else four chunks, at its start, a third, two thirds and its end."""
    with open(path, "rb") as fh:
        if size <= SMALL_FILE:
            return fh.read()
        parts = []
        for offset in (0, size // 3, 2 * size // 3, size - chunk):
            fh.seek(offset)
            parts.append(fh.read(chunk))
        return b"".join(parts)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(NoParams):
    """Actor-pool sizing shared by every model-backed signal, and how long one model call may run
    (60 s + 10 s a row: 220 s for a batch of 16 rows, where a CPU model here takes a few seconds)."""

    actors: int = Field(1, ge=1, description="actors in this signal's pool")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0, description="GPU share per actor; 0 runs on CPU")
    batch_size: int = Field(16, ge=1)
    deadline_s: DeadlineSeconds = DEADLINE_S
    deadline_per_row_s: DeadlinePerRowSeconds = DEADLINE_PER_ROW_S


@dataclass
class Sample:
    """One input row on its way through the cascade."""

    key: str
    caption: str | None
    image: ImageSample
    meta: str | None = None  # the source's JSON object for the row (img2dataset's sidecar), as text
    # The values earlier (cheaper) signals gave this row: a signal may compare with them (the
    # legibility of a rendered text needs the OCR reading).
    values: dict[str, Any] = field(default_factory=dict)


class Signal:
    uses_actor: ClassVar[bool] = False
    color: ClassVar[bool] = True  # False: grey pixels suffice (lets the decoder skip colour)
    name: ClassVar[str]
    cost: ClassVar[int]  # 0 header-only, 10 cheap pixels, 100+ models
    Params: ClassVar[type[BaseModel]] = NoParams
    fields: ClassVar[tuple[pa.Field, ...]]
    # The values each numeric column can take, (lowest, highest), None for no limit: a rule
    # bound outside them (``short_side: {min: -256}``) is a config error, not a silent no-op.
    ranges: ClassVar[Ranges] = {}

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def pixel_side(self) -> int | None:
        """Short side of the pixels this signal reads; None when it reads no pixels."""
        return None

    def compute(self, sample: Sample) -> dict[str, Any]:
        raise NotImplementedError

    def compute_batch(self, samples: list[Sample]) -> list[dict[str, Any]]:
        return [self.compute(s) for s in samples]

    def unavailable(self) -> str | None:
        """Why this signal cannot run on this machine (missing weights, say), or None.

        Checked at start: a rule on an unavailable signal is an error before any work;
        `t2i analyze` leaves an unavailable signal's columns empty, with one warning."""
        return None

    def model_files(self) -> list[Path]:
        """The weight and config files this signal loads (none for pixel arithmetic)."""
        return []

    def model_id(self) -> str | None:
        """What the output's stamp records of the model: each file's name and size, the hash of every
        file under 1 MiB (configs, small heads) and of four 64 KiB samples of larger ones (retrained
        weights differ nearly everywhere), so other weights at the same path are told apart without
        reading gigabytes; None for a signal without files."""
        files = self.model_files()
        if not files:
            return None
        digest = hashlib.blake2b(digest_size=6)
        for path in files:
            size = path.stat().st_size if path.is_file() else -1
            digest.update(f"{path.name}\x1f{size}\x1e".encode())
            if size >= 0:
                digest.update(_content_sample(path, size))
        return f"{'+'.join(p.name for p in files)}@{digest.hexdigest()}"

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in cls.fields]


class ModelSignal(Signal):
    """A signal backed by a model, run batched in a Ray actor pool.

    The work is split so that each image is still decoded once, in the shard task:
    ``prepare`` (shard task) turns a sample into a small picklable input, typically a
    uint8 array at ``pixel_side()``; ``setup`` (once per actor) loads the model;
    ``infer`` (actor) maps a batch of inputs to one dict of values per input.
    Without a pool (unit tests, ``--no-ray``) ``compute_batch`` runs all three here, with no
    deadline: the actor's (``deadline_s``) ends its own process, which here would be the run's.
    """

    uses_actor: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = ModelParams
    _ready: bool = False

    def prepare(self, sample: Sample) -> Any:
        raise NotImplementedError

    def setup(self) -> None:
        """Load the model; must not touch the network."""

    def infer(self, inputs: list[Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def ensure_setup(self) -> None:
        if not self._ready:
            self.setup()
            self._ready = True

    def compute(self, sample: Sample) -> dict[str, Any]:
        return self.compute_batch([sample])[0]

    def compute_batch(self, samples: list[Sample]) -> list[dict[str, Any]]:
        self.ensure_setup()
        return self.infer([self.prepare(s) for s in samples])
