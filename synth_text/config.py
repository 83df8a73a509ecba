"""Settings for synthetic Chinese text images (Kolors: the 50,000 most frequent words, rendered with real fonts)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from synth_text.fonts import DEFAULT_FAMILIES

__all__ = ["BACKGROUNDS", "DEFAULT_SIZES", "LAYOUTS", "SynthConfig"]

LAYOUTS: tuple[str, ...] = ("single", "title_subtitle", "multiline", "vertical")
BACKGROUNDS: tuple[str, ...] = ("solid", "gradient", "noise", "photo")

# (width, height): the trainer's equal-area buckets around 1024^2 plus two smaller squares.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
)


def _check_weights(value: dict[str, float], known: tuple[str, ...], what: str) -> dict[str, float]:
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {list(known)}")
    bad = {k: w for k, w in value.items() if not (w >= 0)}
    if bad:
        raise ValueError(f"{what} weights must be >= 0, got {bad}")
    if sum(value.values()) <= 0:
        raise ValueError(f"{what} weights must have a positive sum, got {value}")
    return value


class SynthConfig(BaseModel):
    """How to render synthetic text images. Every choice per image derives from ``seed``, the word and its index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    words: int = Field(50000, ge=1, description="how many of the most frequent words to render")
    per_word: int = Field(1, ge=1, description="images per word")
    sizes: list[tuple[int, int]] = Field(default_factory=lambda: list(DEFAULT_SIZES), min_length=1)
    # horizontal-dominant: vertical text is the hardest for OCR, keep it a small share
    layouts: dict[str, float] = Field(
        default_factory=lambda: {"single": 0.4, "title_subtitle": 0.25, "multiline": 0.25, "vertical": 0.1}
    )
    backgrounds: dict[str, float] = Field(
        default_factory=lambda: {"solid": 0.3, "gradient": 0.3, "noise": 0.2, "photo": 0.2}
    )
    families: list[str] = Field(default_factory=lambda: list(DEFAULT_FAMILIES), min_length=1)
    font_paths: list[str] = Field(default_factory=list, description="explicit font files instead of discovery")
    min_contrast: float = Field(4.5, ge=1.0, le=21.0, description="WCAG contrast ratio text vs background")
    max_rotation_deg: float = Field(8.0, ge=0.0, le=45.0)
    rotation_prob: float = Field(0.35, ge=0.0, le=1.0, description="share of images whose text is rotated")
    filler_words: int = Field(
        5000, ge=1, description="subtitles and extra lines are drawn from this many of the most frequent words"
    )
    min_text_px: int = Field(24, ge=6, description="smallest glyph size (font size in pixels)")
    jpeg_quality: int = Field(92, ge=1, le=100)
    max_cer: float = Field(0.1, ge=0.0, le=1.0, description="OCR character error rate above which a sample is dropped")
    words_per_shard: int = Field(500, ge=1)
    photos_from: str | None = Field(None, description="a curated output whose shards give the photo backgrounds")
    photo_count: int = Field(64, ge=1, le=4096, description="photos taken from it (decoded once per worker)")

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for w, h in value:
            for side in (w, h):
                if not 256 <= side <= 2048 or side % 64:
                    raise ValueError(f"size {(w, h)}: each side must be in [256, 2048] and a multiple of 64")
        return value

    @field_validator("layouts")
    @classmethod
    def _layouts(cls, value: dict[str, float]) -> dict[str, float]:
        return _check_weights(value, LAYOUTS, "layouts")

    @field_validator("backgrounds")
    @classmethod
    def _backgrounds(cls, value: dict[str, float]) -> dict[str, float]:
        return _check_weights(value, BACKGROUNDS, "backgrounds")
