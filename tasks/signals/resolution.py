"""Size signals from the header alone: no pixel is decoded to compute them.

Where the source recorded the image's size before it was stored (img2dataset writes
``original_width`` / ``original_height`` into each sample's ``.json`` sidecar and its Parquet
columns; both reach a signal as the row's ``meta`` JSON object), both sizes are recorded:
``width`` / ``height`` stay the stored pixels (what the decoder, buckets and crops work on) and
``original_width`` / ``original_height`` hold the original (null when the source does not say).

``short_side`` judges the smaller of the two: min(stored short side, original short side).
A 180x200 photo upscaled to 384x427 by the downloader has no more detail than the 180x200 one,
so a ``short_side: {min: 256}`` rule must reject it; a 1000x1100 original stored at 384x427 is
judged by its 384 stored pixels, as today. ``aspect_ratio`` stays the stored pixels' ratio:
scaling keeps it, and when the downloader cropped, the stored shape is the one training sees.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import pyarrow as pa

from tasks.signals.base import Ranges, Sample, Signal

INT32_MAX = 2**31 - 1


def _side(value: Any) -> int | None:
    """A usable pixel count, or None: meta is whatever the source wrote, so a string, a bool,
    NaN, zero, a negative or an out-of-range number means "unknown", never an error."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    side = round(value)
    return side if 1 <= side <= INT32_MAX else None


def original_size(meta: str | None) -> tuple[int, int] | None:
    """(original_width, original_height) from a row's ``meta`` JSON object, or None when either
    is missing or unusable (no meta, bad JSON, not an object, non-numeric, <= 0): a half-known
    size is no size, and an unreadable meta leaves the row judged by its stored pixels, as today."""
    if not meta:
        return None
    try:
        obj = json.loads(meta)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    w, h = _side(obj.get("original_width")), _side(obj.get("original_height"))
    return (w, h) if w is not None and h is not None else None


class Resolution(Signal):
    name = "resolution"
    cost = 0
    fields = (
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("short_side", pa.int32()),
        pa.field("aspect_ratio", pa.float32()),
        pa.field("file_bytes", pa.int64()),
        pa.field("original_width", pa.int32()),  # null: the source did not record it
        pa.field("original_height", pa.int32()),
    )
    # Sizes (the decoder refuses an empty image, so they are >= 1 in practice); w / h is > 0.
    ranges: ClassVar[Ranges] = {c: (0, None) for c in ("width", "height", "short_side", "aspect_ratio", "file_bytes",
                                                       "original_width", "original_height")}

    def compute(self, sample: Sample) -> dict[str, Any]:
        h = sample.image.header
        short = min(h.width, h.height)
        original = original_size(sample.meta)
        if original is not None:
            short = min(short, *original)  # upscaling adds no detail
        return {
            "width": h.width,
            "height": h.height,
            "short_side": short,
            "aspect_ratio": h.width / h.height,
            "file_bytes": h.file_bytes,
            "original_width": original[0] if original else None,
            "original_height": original[1] if original else None,
        }


SIGNAL = Resolution
