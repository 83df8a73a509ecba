"""Caption length in characters: DataComp drops captions under 5 characters, and a
megabyte of text in a caption field is scraping debris, not a description."""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa

from tasks.signals.base import Ranges, Sample, Signal


class CaptionLength(Signal):
    name = "caption"
    cost = 0
    fields = (pa.field("caption_chars", pa.int32()), pa.field("caption_words", pa.int32()),)
    ranges: ClassVar[Ranges] = {"caption_chars": (0, None), "caption_words": (0, None)}  # counts

    def compute(self, sample: Sample) -> dict[str, Any]:
        text = (sample.caption or "").strip()
        return {"caption_chars": len(text), "caption_words": len(text.split())}


SIGNAL = CaptionLength
