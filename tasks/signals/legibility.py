"""Whether OCR reads what was rendered: the character error rate of the OCR signal's reading
against the rendered text (Kolors: a rendered word OCR cannot read teaches nothing).

CER = Levenshtein distance / length of the rendered text, after both are normalised the same way
(NFKC, so full-width and half-width forms agree; whitespace and line breaks removed, since OCR
joins lines with spaces). It runs after the OCR signal (its cost is higher) and reads that
signal's ``ocr_text`` and the synth signal's ``rendered_text`` from the row (the meta only when that
signal did not run); a row that was not rendered, or OCR that did not run, is null.
A rule ``text_cer: {max: 0.1}`` sends illegible images to rejects/ with the OCR reading beside.
"""

from __future__ import annotations

import unicodedata
from typing import Any, ClassVar

import pyarrow as pa

from tasks.signals.base import Ranges, Sample, Signal
from tasks.signals.synth import rendering


def normalised(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, two rows of the table (texts here are a few dozen characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(expected: str, read: str) -> float:
    want, got = normalised(expected), normalised(read)
    if not want:
        return 0.0 if not got else 1.0
    return edit_distance(want, got) / len(want)


class Legibility(Signal):
    name: ClassVar[str] = "legibility"
    cost: ClassVar[int] = 210  # after ocr (200): it compares with that signal's reading
    fields: ClassVar[tuple[pa.Field, ...]] = (pa.field("text_cer", pa.float32()),)
    ranges: ClassVar[Ranges] = {"text_cer": (0.0, None)}

    def compute(self, sample: Sample) -> dict[str, Any]:
        read = sample.values.get("ocr_text")
        if read is None:
            return {"text_cer": None}
        expected = sample.values.get("rendered_text")  # the synth signal (cost 0) parsed the meta already
        if expected is None and "synthetic" not in sample.values:
            expected = (rendering(sample) or {}).get("text")
        return {"text_cer": None if expected is None else round(cer(expected, read), 4)}


SIGNAL = Legibility
