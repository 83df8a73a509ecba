"""What a captioner and a translator are: one interface each, many backends.

A captioner takes prepared images (RGB, already resized by the CPU preparation step to the
model's input side) with the row's original caption and OCR text, and writes English captions.
A translator takes English texts and writes Chinese ones. Both load weights only from local
paths (``local_files_only``): a missing folder is a ``ModelMissing`` naming the path, raised by
``check()`` at pass start, before Ray or any actor starts.

Backends register in ``captioners/__init__.py`` (``CAPTIONERS``, ``TRANSLATORS``) and are
chosen by ``backend:`` in the caption config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from schemas.config import ConfigError

# The default prompt: what Kolors' captions describe. ``{ocr_hint}`` becomes OCR_HINT when the
# row has OCR text, else "".
DEFAULT_PROMPT = (
    "Describe this image in detail for a text-to-image training caption: the main objects and their "
    "attributes (colour, material, size), how many there are, where they are in the picture relative to "
    "each other, the background, the style, and any visible text, quoted exactly.{ocr_hint}"
)
OCR_HINT = ' OCR read this text in the image: "{ocr_text}".'


class ModelMissing(ConfigError):
    """A model folder that is not there (or lacks what a backend needs): named, at pass start."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class GenerationParams(Strict):
    """What every generating backend (captioner, LLM translator) takes from the config."""

    backend: str
    path: str = Field(description="a local model folder (a transformers checkpoint), never a hub id")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when there is one")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU that has it, else float16 on GPU, float32 on CPU")
    max_new_tokens: int = Field(256, ge=1, le=8192)
    do_sample: bool = False  # greedy by default: a rerun writes the same captions
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0  # for sampling: torch.manual_seed per batch
    trust_remote_code: bool = Field(False, description="run the model folder's own Python code (CogVLM needs it)")


class CaptionerParams(GenerationParams):
    prompt: str = DEFAULT_PROMPT
    image_side: int = Field(448, ge=16, le=4096, description="the preparation step resizes the long side to this")
    max_caption_chars: int = Field(2000, ge=0, description="the original caption given as context is cut to this")


@dataclass(frozen=True)
class CaptionRequest:
    """One row for a captioner: the prepared image and what the row already says about itself."""

    image: Image.Image
    caption: str | None = None  # the original (web) caption, cut to max_caption_chars
    ocr_text: str | None = None  # the curation's OCR reading, when the row has one


@dataclass(frozen=True)
class Generated:
    """One model output: the text, its length in tokens, and whether max_new_tokens cut it off."""

    text: str
    tokens: int
    truncated: bool


class Captioner:
    """Images (plus original caption and OCR text) in, English captions out."""

    Params: ClassVar[type[CaptionerParams]] = CaptionerParams

    def __init__(self, params: CaptionerParams):
        self.params = params

    def check(self) -> None:
        """Raise ``ModelMissing`` naming the path when the weights are not on disk (cheap: no load)."""
        require_folder(self.params.path, "captioner")

    def load(self) -> None:
        """Load the weights from ``params.path`` (local files only); once per actor."""
        raise NotImplementedError

    def caption(self, requests: list[CaptionRequest]) -> list[Generated]:
        """One output per request, in order; one model batch (the stage splits larger lists)."""
        raise NotImplementedError

    def prompt_for(self, request: CaptionRequest) -> str:
        """The prompt with the OCR hint filled in (or left out)."""
        ocr = (request.ocr_text or "").strip()
        hint = OCR_HINT.format(ocr_text=ocr) if ocr else ""
        return self.params.prompt.replace("{ocr_hint}", hint)

    @property
    def model_id(self) -> str:
        """What the ``caption_model`` column records: the backend and the folder's name and weights' hash."""
        return model_id(self.params.backend, self.params.path)


class TranslatorParams(Strict):
    backend: str
    path: str = Field(description="a local model folder, never a hub id")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_new_tokens: int = Field(512, ge=1, le=8192)
    num_beams: int = Field(1, ge=1)


class Translator:
    """English texts in, Chinese texts out (spans to keep are protected by the stage, not here)."""

    Params: ClassVar[type[TranslatorParams]] = TranslatorParams

    def __init__(self, params: TranslatorParams):
        self.params = params

    def check(self) -> None:
        require_folder(self.params.path, "translator")

    def load(self) -> None:
        raise NotImplementedError

    def translate(self, texts: list[str]) -> list[Generated]:
        raise NotImplementedError

    @property
    def model_id(self) -> str:
        return model_id(self.params.backend, self.params.path)


def require_folder(path: str | Path, what: str, files: tuple[str, ...] = ("config.json",)) -> Path:
    """The model folder, or ``ModelMissing`` naming the path and the file it lacks."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelMissing(f"the {what} model folder {folder} does not exist (weights are read from local "
                           "paths only; download them beforehand, see the README)")
    for name in files:
        if not (folder / name).exists():
            raise ModelMissing(f"the {what} model folder {folder} has no {name}")
    return folder


def model_id(backend: str, path: str | Path) -> str:
    """``backend:folder@hash``: the hash of the folder's config and weight file names and sizes, so
    two folders of the same name with other weights are told apart without reading the weights."""
    folder = Path(path).expanduser()
    h = hashlib.blake2b(digest_size=4)
    if folder.is_dir():
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(folder)}\x1f{f.stat().st_size}\x1e".encode())
        config = folder / "config.json"
        if config.is_file():
            h.update(config.read_bytes())
    return f"{backend}:{folder.name}@{h.hexdigest()}"
