"""Which caption a row trains with, in which epoch.

Kolors mixes original and machine captions 50:50: originals keep proper nouns (故宫, 月饼) that a
captioning model drops, machine captions describe what is actually in the picture. The choice is a
pure function of (seed, epoch, key) so it does not depend on which DataLoader worker reads the row
or in which order: a resumed run, a run with more workers and the same run again all train on the
same prompts. Dropout to "" is what classifier-free guidance learns the unconditional case from.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CaptionConfig(BaseModel):
    """Caption columns and the mixing/dropout probabilities."""

    model_config = ConfigDict(extra="forbid")

    language: Literal["zh", "en"] = "zh"
    original_column: str = "caption"
    machine_columns: dict[str, str] = Field(default_factory=lambda: {"zh": "recaption_zh", "en": "recaption_en"})
    machine_probability: float = Field(0.5, ge=0.0, le=1.0)
    dropout: float = Field(0.05, ge=0.0, le=1.0)  # probability of "" (unconditional)
    synthetic_column: str = "synthetic"  # bool column; True rows always use original_column
    # The caption set (`t2i caption`'s output.name) whose sidecars give a curated output's machine
    # captions, joined by row; a part without a current sidecar trains on what its shard holds.
    # A set named in the config must exist; the default may be missing, with a warning
    # (trainer/caption_mix.py, which reports the mix at start).
    sidecar_set: str | None = "captions"

    @property
    def machine_column(self) -> str | None:
        """The machine-caption column for ``language``; None: originals only."""
        return self.machine_columns.get(self.language)


def uniform(seed: int, epoch: int, key: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by its arguments (blake2b: stable across processes and
    Python versions, unlike ``hash``)."""
    text = f"{seed}\x1f{epoch}\x1f{salt}\x1f{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") / 2.0**64


def choose_caption(cfg: CaptionConfig, seed: int, epoch: int, key: str, original: str | None,
                   machine: str | None, synthetic: bool | None) -> str:
    """The prompt for one row in one epoch.

    Synthetic rows (rendered text) keep their own caption: it names the exact characters drawn.
    Otherwise the machine caption is used with ``machine_probability`` where the row has a
    non-empty one; an empty choice falls back to the other caption, so a row never loses its
    text to a missing column. Dropout applies last, to every row alike.
    """
    original, machine = (original or "").strip(), (machine or "").strip()
    if synthetic or not machine:
        text = original
    elif not original or uniform(seed, epoch, key, "machine") < cfg.machine_probability:
        text = machine
    else:
        text = original
    if cfg.dropout and uniform(seed, epoch, key, "dropout") < cfg.dropout:
        return ""
    return text
