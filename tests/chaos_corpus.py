"""A seeded corpus of small images for the chaos test, in img2dataset's webdataset layout.

About 2,000 samples in 20 tars: mostly sharp synthetic scenes (kept), plus blurred ones,
images with large or small drawn text (for OCR), too small and too wide ones, truncated and
non-image bytes, over-long captions, some of the real test photos (faces), and a few keys
written twice across tars (the cross-shard duplicate pass). Built in a few seconds.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from conftest import PHOTOS, write_webdataset
from PIL import Image

WORDS = ("a red house by the sea", "two boats on a lake", "a field of stones", "city lights at dusk",
         "a painted wall", "a plate of fruit", "a quiet street", "mountains under cloud", "a wooden door")
TEXTS = ("SALE", "OPEN 24H", "HELLO", "EXIT", "NEWS", "STOP", "CAFE")


def _jpeg(rgb: np.ndarray, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _noise_bank(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A few fields of fine noise (added, subtracted), cropped per image: much faster than new noise."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 24, (600, 1100, 1), dtype=np.uint8).repeat(3, axis=2),
             rng.integers(0, 24, (600, 1100, 1), dtype=np.uint8).repeat(3, axis=2)) for _ in range(4)]


def _scene(rng: np.random.Generator, h: int, w: int, bank: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """A textured scene: a colour gradient, filled shapes, fine noise (sharp at any size)."""
    corners = rng.integers(40, 210, (2, 2, 3), dtype=np.uint8)
    img = cv2.resize(corners, (w, h), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))),
                          colour, -1)
        else:
            cv2.circle(img, (x0, y0), int(rng.integers(8, min(h, w) // 3)), colour, -1)
    add, sub = bank[int(rng.integers(len(bank)))]
    y, x = int(rng.integers(0, add.shape[0] - h + 1)), int(rng.integers(0, add.shape[1] - w + 1))
    return cv2.subtract(cv2.add(img, add[y : y + h, x : x + w]), sub[y : y + h, x : x + w])


def _with_text(rng: np.random.Generator, img: np.ndarray, big: bool) -> np.ndarray:
    """Dark text on a light band: ``big`` fills most of the frame (a text-dominated image)."""
    h, w = img.shape[:2]
    text = str(rng.choice(TEXTS))
    out = img.copy()
    if big:
        out[:] = (235, 235, 235)
        lines, scale, thick = 4, w / 170, max(3, w // 60)
        for i in range(lines):
            y = int(h * (i + 0.8) / lines)
            cv2.putText(out, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (10, 10, 10), thick, cv2.LINE_AA)
    else:
        cv2.rectangle(out, (10, 10), (10 + w // 3, 10 + h // 8), (240, 240, 240), -1)
        cv2.putText(out, text[:5], (14, 8 + h // 10), cv2.FONT_HERSHEY_SIMPLEX, w / 900, (0, 0, 0), 2, cv2.LINE_AA)
    return out


def _photos() -> list[Image.Image]:
    """The real test photos (faces, people, animals), each shrunk once to a 320 px short side."""
    out = []
    for path in PHOTOS:
        img = Image.open(path).convert("RGB")
        scale = 320 / min(img.size)
        out.append(img.resize((max(320, round(img.width * scale)), max(320, round(img.height * scale)))))
    return out


def _photo(rng: np.random.Generator, photos: list[Image.Image]) -> bytes:
    """One of the test photos at a 256-320 px short side."""
    img = photos[int(rng.integers(len(photos)))]
    short = int(rng.integers(256, 321))
    scale = short / min(img.size)
    img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))))
    return _jpeg(np.asarray(img))


# kind -> weight; each sample's kind is drawn from these by the seeded generator.
KINDS = {"scene": 70, "blurred": 9, "text_big": 4, "text_small": 3, "photo": 4, "small": 3, "wide": 2,
         "truncated": 2, "not_image": 1, "long_caption": 1, "no_caption": 1}


def _sample(rng: np.random.Generator, kind: str, bank: list, photos: list[Image.Image]) -> tuple[bytes, str | None]:
    short = int(rng.integers(256, 321))
    long = int(short * rng.uniform(1.0, 1.6))
    h, w = (short, long) if rng.random() < 0.7 else (long, short)
    caption: str | None = f"{rng.choice(WORDS)}, number {int(rng.integers(10**6))}"
    if kind == "photo":
        return _photo(rng, photos), caption
    if kind == "small":
        h, w = int(rng.integers(64, 200)), int(rng.integers(200, 300))
    elif kind == "wide":
        h, w = 256, int(256 * rng.uniform(3.3, 4.0))
    img = _scene(rng, h, w, bank)
    if kind == "blurred":
        img = cv2.GaussianBlur(img, (0, 0), 7)
    elif kind in ("text_big", "text_small"):
        img = _with_text(rng, img, big=kind == "text_big")
    data = _jpeg(img)
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "not_image":
        data = b"<html>404 not found</html>" + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
    elif kind == "long_caption":
        caption = "word " * 1200
    elif kind == "no_caption":
        caption = None
    return data, caption


def build(root: Path, seed: int, tars: int = 20, per_tar: int = 100, duplicates: int = 6) -> dict:
    """Writes ``tars`` tars of ``per_tar`` samples under ``root``. Returns {"keys": Counter of every
    key written (a duplicated key counts twice), "kinds": Counter of kinds}."""
    rng = np.random.default_rng(seed)
    names, weights = list(KINDS), np.array(list(KINDS.values()), dtype=float)
    keys: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    written: list[tuple[int, str]] = []
    pick = random.Random(seed)
    bank, photos = _noise_bank(seed), _photos()
    for t in range(tars):
        samples = []
        for i in range(per_tar):
            key = f"{t:05d}{i:04d}"
            kind = str(rng.choice(names, p=weights / weights.sum()))
            data, caption = _sample(rng, kind, bank, photos)
            samples.append((key, data, caption, "jpg"))
            keys[key] += 1
            kinds[kind] += 1
            written.append((t, key))
        if t >= 2 and len([k for k, n in keys.items() if n > 1]) < duplicates:
            # a key of an earlier tar written again here: one copy is kept, the other a duplicate_key
            _, again = pick.choice([w for w in written if w[0] < t])
            twice = (again, _jpeg(_scene(rng, 288, 352, bank)), "written twice", "jpg")
            samples.insert(pick.randrange(len(samples)), twice)
            keys[again] += 1
            kinds["duplicate"] += 1
        write_webdataset(root / f"{t:05d}.tar", samples)
    return {"keys": keys, "kinds": kinds}
