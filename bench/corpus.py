"""Benchmark corpora: webdataset tars in img2dataset's layout, made from the real test photos.

Each sample is a fresh random crop of one of the photos in tests/data, scaled to a web size
(0.3-1.5 MP by default, common aspect ratios) and re-encoded as JPEG quality 90, so no two
samples share bytes and no cache (ours, Pillow's, the CPU's) can serve a repeat. A tar's
content depends only on (seed, tar index, samples per tar, sizes), so the first tars of a big
corpus are the same as a small corpus built with the same settings, and a rerun is reproducible.

A finished corpus is cached under ``bench-out/corpus-N/`` with a stamp of its settings; a rerun
with the same settings reuses it, other settings rebuild it.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "tests" / "data"
STAMP = "_corpus.json"

# Aspect ratios (w/h) that cover most of LAION-style web images.
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)
WORDS = (
    "a", "photo", "of", "the", "dog", "cat", "woman", "man", "beach", "street", "bus", "bed",
    "umbrella", "city", "night", "sunset", "red", "blue", "green", "old", "young", "small",
    "large", "portrait", "close-up", "view", "with", "on", "in", "near", "under", "holding",
    "sitting",
)


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is made of; stored in its stamp so a changed setting forces a rebuild."""

    samples: int
    per_tar: int = 500
    seed: int = 0
    min_mp: float = 0.3
    max_mp: float = 1.5
    quality: int = 90

    @property
    def tars(self) -> int:
        return math.ceil(self.samples / self.per_tar)

    def tar_samples(self, index: int) -> int:
        return min(self.per_tar, self.samples - index * self.per_tar)


@cache
def _photos() -> tuple[Image.Image, ...]:
    """The source photos, decoded once per process (the builder's own cost, not measured)."""
    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"no photos in {PHOTOS}")
    return tuple(Image.open(p).convert("RGB") for p in paths)


def make_image(photo: Image.Image, rng: random.Random, spec: CorpusSpec) -> Image.Image:
    """A random crop of ``photo`` at a random web size and aspect ratio (sometimes mirrored)."""
    aspect = rng.choice(ASPECTS)
    area = rng.uniform(spec.min_mp, spec.max_mp) * 1e6
    out_w, out_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    pw, ph = photo.size
    # The largest box of this aspect inside the photo, then a random 55-100 % of it.
    box_w, box_h = (pw, pw / aspect) if pw / ph <= aspect else (ph * aspect, ph)
    scale = rng.uniform(0.55, 1.0)
    cw, ch = max(8, box_w * scale), max(8, box_h * scale)
    x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    img = photo.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 18)))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, index: int, spec: CorpusSpec) -> int:
    """Write tar number ``index`` (written beside, then renamed: a killed build leaves no half tar)."""
    rng = random.Random(f"{spec.seed}:{spec.per_tar}:{index}")
    photos = _photos()
    tmp = path.with_name(f".{path.name}.tmp")
    count = spec.tar_samples(index)
    with tarfile.open(tmp, "w") as tar:
        for i in range(count):
            key = f"{index * spec.per_tar + i:09d}"
            img = make_image(rng.choice(photos), rng, spec)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=spec.quality)
            caption = _caption(rng)
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                    "caption": caption, "width": img.width, "height": img.height}
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    os.replace(tmp, path)
    return count


def _write_tar_job(args: tuple[str, int, CorpusSpec]) -> int:
    path, index, spec = args
    return write_tar(Path(path), index, spec)


def build_corpus(root: Path, spec: CorpusSpec, processes: int | None = None) -> Path:
    """``root/corpus-N`` holding ``spec``'s tars, built in parallel unless already cached."""
    out = Path(root) / f"corpus-{spec.samples}"
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    jobs = [(str(out / f"{i:05d}.tar"), i, spec) for i in range(spec.tars)]
    workers = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        written = sum(map(_write_tar_job, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            written = sum(pool.map(_write_tar_job, jobs))
    assert written == spec.samples, (written, spec.samples)
    stamp.write_text(json.dumps(asdict(spec), indent=1))
    return out
