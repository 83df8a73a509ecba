"""Perceptual hash (pHash): the signs of the low-frequency DCT of a 32x32 grey image
against their median, 64 bits as a signed int64 so DuckDB can compare hashes with
``bit_count(a.phash # b.phash)`` (the Hamming distance) for near-duplicate search."""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from tasks.signals.base import Ranges, Sample, Signal

_SIZE = 32
_LOW = 8


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, so the 2-D DCT is D @ X @ D.T without scipy."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def phash64(img: Image.Image) -> int:
    grey = np.asarray(img.convert("L").resize((_SIZE, _SIZE), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(_SIZE)
    low = (d @ grey @ d.T)[:_LOW, :_LOW]
    bits = (low > np.median(low)).flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & ((1 << 64) - 1)).bit_count()


class PHash(Signal):
    name = "phash"
    color = False
    cost = 11
    fields = (pa.field("phash", pa.int64()),)
    ranges: ClassVar[Ranges] = {"phash": (-(2**63), 2**63 - 1)}  # 64 bits as a signed int64; their order means nothing

    def pixel_side(self) -> int | None:
        return 64

    def compute(self, sample: Sample) -> dict[str, Any]:
        return {"phash": phash64(sample.image.grey(64))}


SIGNAL = PHash
