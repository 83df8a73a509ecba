"""The caption pass's two model stages: recaption (image -> English) and translate (English -> Chinese).

Recaption's ``prepare`` decodes the image once, in the part task, with curation's guards (bomb
limit, file size) and shrinks it to the captioner's input side; the actor gets a small uint8
array, the original caption (cut to ``max_caption_chars``: a 1 MB web caption is not a prompt)
and the OCR text. Translate protects quoted text and proper nouns before the model and restores
them after (captioners/protect.py), flagging a row where that failed.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from captioners import build_captioner, build_translator
from captioners.base import CaptionRequest
from schemas.config import DecodeConfig, Strict
from schemas.recaption import ProtectConfig
from tasks.decode import ImageSample
from tasks.signals.arrays import fit_long_side
from tasks.stage import Stage


def prompt_hash(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()


class RecaptionParams(Strict):
    captioner: dict[str, Any]
    decode: DecodeConfig = DecodeConfig()


class RecaptionStage(Stage):
    name: ClassVar[str] = "recaption"
    reads: ClassVar[tuple[str, ...]] = ("image", "caption", "ocr_text")
    writes: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("recaption_en", pa.string()),
        pa.field("caption_model", pa.string()),
        pa.field("prompt_hash", pa.string()),
        pa.field("caption_tokens", pa.int32()),
        pa.field("caption_truncated", pa.bool_()),
        pa.field("caption_repetitive", pa.bool_()),
    )
    Params: ClassVar[type[RecaptionParams]] = RecaptionParams

    def __init__(self, params: RecaptionParams):
        super().__init__(params)
        self.captioner = build_captioner(params.captioner)

    def check(self) -> None:
        self.captioner.check()

    def prepare(self, row: dict[str, Any]) -> tuple[np.ndarray, str | None, str | None]:
        p, side = self.params.decode, self.captioner.params.image_side
        sample = ImageSample(row.get("image"), max_pixels=p.max_pixels, max_file_bytes=p.max_file_bytes,
                             decode_side=side)
        pixels = fit_long_side(sample.pixel_array(), side)  # never enlarged; no PIL copy
        caption = row.get("caption")
        limit = self.captioner.params.max_caption_chars
        caption = caption[:limit] if isinstance(caption, str) and limit else None
        ocr = row.get("ocr_text")
        return pixels, caption, ocr if isinstance(ocr, str) else None

    def setup(self) -> None:
        self.captioner.check()
        self.captioner.load()
        self.model_id = self.captioner.model_id  # once: it lists the model folder

    def infer(self, inputs: list[tuple[np.ndarray, str | None, str | None]]) -> list[dict[str, Any]]:
        from captioners.repetition import is_repetitive

        requests = [CaptionRequest(Image.fromarray(a), caption, ocr) for a, caption, ocr in inputs]
        model = self.model_id
        out = []
        for request, gen in zip(requests, self.captioner.caption(requests), strict=True):
            out.append({"recaption_en": gen.text, "caption_model": model,
                        "prompt_hash": prompt_hash(self.captioner.prompt_for(request)),
                        "caption_tokens": gen.tokens, "caption_truncated": gen.truncated,
                        "caption_repetitive": is_repetitive(gen.text)})
        return out


class TranslateParams(Strict):
    translator: dict[str, Any]
    protect: ProtectConfig = ProtectConfig()


class TranslateStage(Stage):
    name: ClassVar[str] = "translate"
    reads: ClassVar[tuple[str, ...]] = ("recaption_en",)
    writes: ClassVar[tuple[pa.Field, ...]] = (
        pa.field("recaption_zh", pa.string()),
        pa.field("translate_model", pa.string()),
        pa.field("translate_tokens", pa.int32()),
        pa.field("translate_truncated", pa.bool_()),
        pa.field("spans_kept", pa.bool_()),  # null: nothing to protect; false: a span was lost
    )
    Params: ClassVar[type[TranslateParams]] = TranslateParams

    def __init__(self, params: TranslateParams):
        super().__init__(params)
        self.translator = build_translator(params.translator)

    def check(self) -> None:
        self.translator.check()

    def wants(self, row: dict[str, Any]) -> bool:
        return bool((row.get("recaption_en") or "").strip())

    def prepare(self, row: dict[str, Any]) -> str:
        return row["recaption_en"]

    def setup(self) -> None:
        self.translator.check()
        self.translator.load()
        self.model_id = self.translator.model_id  # once: it lists the model folder

    def infer(self, inputs: list[str]) -> list[dict[str, Any]]:
        from captioners.protect import protect, restore

        nouns = self.params.protect.nouns
        guarded = [protect(text, nouns) for text in inputs]
        model = self.model_id
        out = []
        for g, gen in zip(guarded, self.translator.translate([g.text for g in guarded]), strict=True):
            text, kept = restore(gen.text, g)
            out.append({"recaption_zh": text, "translate_model": model, "translate_tokens": gen.tokens,
                        "translate_truncated": gen.truncated, "spans_kept": kept if g.spans else None})
        return out
