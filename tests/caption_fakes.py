"""Small fake captioner and translator backends (``backend: caption_fakes:FakeCaptioner``) for the
caption pass's fault tests: deterministic text from the image's pixels, and faults on demand. The
real backends are tested with tiny real models (tests/test_captioners.py, tests/test_translators.py)."""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
from pydantic import Field

from captioners.base import Captioner, CaptionerParams, CaptionRequest, Generated, Translator, TranslatorParams


class FakeCaptionerParams(CaptionerParams):
    path: str = "unused"
    fail_on_caption: str | None = None  # raise when a row's original caption contains this
    fail_always: bool = False
    oom_above: int = Field(0, ge=0)  # raise an out-of-memory error for batches larger than this (0: never)
    seen_file: str | None = None  # append the length of every original caption seen (one per line)


class OutOfMemoryError(RuntimeError):
    """Named like torch's."""


class FakeCaptioner(Captioner):
    Params: ClassVar[type[CaptionerParams]] = FakeCaptionerParams
    params: FakeCaptionerParams

    def check(self) -> None:
        """No weights."""

    def load(self) -> None:
        """Nothing to load."""

    def caption(self, requests: list[CaptionRequest]) -> list[Generated]:
        p = self.params
        if p.oom_above and len(requests) > p.oom_above:
            raise OutOfMemoryError(f"CUDA out of memory ({len(requests)} rows)")
        out = []
        for r in requests:
            if p.fail_always or (p.fail_on_caption and p.fail_on_caption in (r.caption or "")):
                raise ValueError(f"cannot caption {r.caption!r}")
            if p.seen_file:
                with open(p.seen_file, "a") as fh:
                    fh.write(f"{len(r.caption or '')}\n")
            mean = np.asarray(r.image).reshape(-1, 3).mean(axis=0).round().astype(int).tolist()
            text = f'a picture of mean colour {mean}, {r.image.size[0]}x{r.image.size[1]}'
            if r.ocr_text:
                text += f' with the text "{r.ocr_text}"'
            out.append(Generated(text, len(text.split()), False))
        return out


class FakeTranslatorParams(TranslatorParams):
    path: str = "unused"
    drop_placeholders: bool = False


class FakeTranslator(Translator):
    """Keeps placeholders (or drops them, to test the flag), marks the rest as translated."""

    Params: ClassVar[type[TranslatorParams]] = FakeTranslatorParams
    params: FakeTranslatorParams

    def check(self) -> None:
        """No weights."""

    def load(self) -> None:
        self.pid = os.getpid()

    def translate(self, texts: list[str]) -> list[Generated]:
        out = []
        for t in texts:
            zh = "一张图片：" + t
            if self.params.drop_placeholders:
                zh = zh.replace("⟦", "").replace("⟧", "")
            out.append(Generated(zh, len(zh), False))
        return out
