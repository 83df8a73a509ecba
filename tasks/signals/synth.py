"""What a synthetic text row was rendered with (tasks/sources/synth.py records it in the row's
meta): the text drawn, the font, the layout and where each line is. Rows that were not rendered
get ``synthetic`` false and nulls, so a curated and a synthetic output read alike."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pyarrow as pa

from tasks.signals.base import Ranges, Sample, Signal

META_KEY = "synth"  # the meta object's key the synthetic source writes


def rendering(sample: Sample) -> dict[str, Any] | None:
    """The row's rendering record, or None for a row that was not rendered."""
    if not sample.meta:
        return None
    try:
        meta = json.loads(sample.meta)
    except ValueError:
        return None
    found = meta.get(META_KEY) if isinstance(meta, dict) else None
    return found if isinstance(found, dict) and isinstance(found.get("text"), str) else None


class Synth(Signal):
    name: ClassVar[str] = "synth"
    cost: ClassVar[int] = 0  # reads the meta, no pixels
    fields: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("synthetic", pa.bool_()),
        pa.field("rendered_text", pa.string()),  # lines joined by "\n", in reading order
        pa.field("font", pa.string()),  # family and style, e.g. "Noto Sans CJK SC Bold"
        pa.field("font_size", pa.int32()),
        pa.field("synth_layout", pa.string()),
        pa.field("synth_background", pa.string()),
        pa.field("text_boxes", pa.string()),  # JSON: per line, its 4 corners in pixels
        pa.field("char_boxes", pa.string()),  # JSON: per character, its 4 corners in pixels
    )
    ranges: ClassVar[Ranges] = {"font_size": (1, None)}

    def compute(self, sample: Sample) -> dict[str, Any]:
        r = rendering(sample)
        if r is None:
            return {"synthetic": False, "rendered_text": None, "font": None, "font_size": None,
                    "synth_layout": None, "synth_background": None, "text_boxes": None, "char_boxes": None}
        return {"synthetic": True, "rendered_text": r["text"], "font": r.get("font"), "font_size": r.get("font_size"),
                "synth_layout": r.get("layout"), "synth_background": r.get("background"),
                "text_boxes": json.dumps(r.get("line_boxes")), "char_boxes": json.dumps(r.get("char_boxes"))}


SIGNAL = Synth
