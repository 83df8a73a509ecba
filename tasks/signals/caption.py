"""Caption length in characters: DataComp drops captions under 5 characters, and a
megabyte of text in a caption field is scraping debris, not a description."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from tasks.signals.base import Sample, Signal


class CaptionLength(Signal):
    name = "caption"
    cost = 0
    fields = (pa.field("caption_chars", pa.int32()), pa.field("caption_words", pa.int32()),)

    def compute(self, sample: Sample) -> dict[str, Any]:
        text = (sample.caption or "").strip()
        return {"caption_chars": len(text), "caption_words": len(text.split())}


SIGNAL = CaptionLength
