"""What a signal is: a small object that turns one sample into a few named values.

A signal declares the Arrow fields it produces, its cost rank (the cascade runs cheap
signals, and their rules, before expensive ones) and the pixel size it needs
(None: the header is enough). Model-backed signals (faces, OCR, aesthetic) override
``compute_batch`` and run in Ray actors; the cheap ones just implement ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from tasks.decode import ImageSample


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Sample:
    """One input row on its way through the cascade."""

    key: str
    caption: str | None
    image: ImageSample


class Signal:
    name: ClassVar[str]
    cost: ClassVar[int]  # 0 header-only, 10 cheap pixels, 100+ models
    Params: ClassVar[type[BaseModel]] = NoParams
    fields: ClassVar[tuple[pa.Field, ...]]

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def pixel_side(self) -> int | None:
        """Short side of the pixels this signal reads; None when it reads no pixels."""
        return None

    def compute(self, sample: Sample) -> dict[str, Any]:
        raise NotImplementedError

    def compute_batch(self, samples: list[Sample]) -> list[dict[str, Any]]:
        return [self.compute(s) for s in samples]

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in cls.fields]
