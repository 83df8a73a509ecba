"""Size signals from the header alone: no pixel is decoded to compute them."""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from tasks.signals.base import Ranges, Sample, Signal


class Resolution(Signal):
    name = "resolution"
    cost = 0
    fields = (
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("short_side", pa.int32()),
        pa.field("aspect_ratio", pa.float32()),
        pa.field("file_bytes", pa.int64()),
    )
    # Sizes (the decoder refuses an empty image, so they are >= 1 in practice); w / h is > 0.
    ranges: ClassVar[Ranges] = {c: (0, None) for c in ("width", "height", "short_side", "aspect_ratio", "file_bytes")}

    def compute(self, sample: Sample) -> dict[str, Any]:
        h = sample.image.header
        return {
            "width": h.width,
            "height": h.height,
            "short_side": min(h.width, h.height),
            "aspect_ratio": h.width / h.height,
            "file_bytes": h.file_bytes,
        }


SIGNAL = Resolution
