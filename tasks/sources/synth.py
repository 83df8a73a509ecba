"""A synthetic source: rendered images of the most frequent Chinese words (synth_text/), read like
any other source.

A shard is a range of the word list (``synth.words_per_shard`` words, ``synth.per_word`` images
each), so the curation runner's manifest, atomic parts, resume, Ray fan-out and object-store
outputs apply as they are, and the rows then pass the same cascade: the OCR signal reads each
image and the legibility signal's ``text_cer`` rule sends what OCR cannot read to rejects/. Every
choice (layout, font, size, colours, background) follows from (seed, word, index): the same
command renders the same bytes. A word no installed font covers, or a layout that cannot hold it,
is a ``render_failed`` reject, never a tofu box.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from schemas.config import DecodeConfig, SourceConfig, StorageConfig
from tasks.sources.base import BatchBuilder, SourceError, SourceShard, drain

if TYPE_CHECKING:
    from synth_text.config import SynthConfig
    from synth_text.fonts import Font

log = logging.getLogger(__name__)

SCHEME = "synth:"
RENDER_FAILED = "render_failed"
_RANGE = re.compile(r"^synth:words/(\d+)-(\d+)$")


def synth_shards(cfg: SynthConfig) -> list[SourceShard]:
    """The source's shards: ranges of the top ``cfg.words`` words."""
    n, step = cfg.words, cfg.words_per_shard
    return [SourceShard(f"words-{a:06d}-{min(n, a + step):06d}", "synth", f"{SCHEME}words/{a}-{min(n, a + step)}")
            for a in range(0, n, step)]


def word_range(shard: SourceShard) -> tuple[int, int]:
    m = _RANGE.match(shard.path)
    if m is None:
        raise SourceError(f"{shard.path}: not a synthetic shard (synth:words/START-END)")
    return int(m.group(1)), int(m.group(2))


def fingerprint(shard: SourceShard) -> dict[str, list[int]]:
    """Nothing on disk can change under a synthetic shard; its settings are in the run's stamp."""
    return {"synth_words": list(word_range(shard))}


def fonts_for(cfg: SynthConfig) -> list[Font]:
    """The configured font files, else the installed faces of the configured families; none is an error."""
    return _fonts(tuple(cfg.families), tuple(cfg.font_paths))


@lru_cache(maxsize=4)
def _fonts(families: tuple[str, ...], paths: tuple[str, ...]) -> list[Font]:
    from synth_text.fonts import discover_fonts, load_fonts

    fonts = load_fonts(paths) if paths else discover_fonts(families)
    if not fonts:
        raise SourceError(f"no font of the families {', '.join(families)} is installed (make setup installs "
                          "fonts-noto-cjk, fonts-wqy-zenhei, fonts-arphic-ukai, fonts-arphic-uming), and "
                          "synth.font_paths names none")
    return fonts


@dataclass(frozen=True)
class Renderer:
    """What rendering needs, loaded once per process: the words, the fonts, the background photos."""

    synth: SynthConfig
    words: list[str]
    fonts: list[Font]
    photos: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, synth: SynthConfig, storage: StorageConfig | None = None) -> Renderer:
        from synth_text.words import top_words

        photos = background_photos(synth.photos_from, synth.photo_count, storage) if synth.photos_from else ()
        return cls(synth, top_words(synth.words), fonts_for(synth), photos)

    def row(self, i: int, k: int) -> dict[str, str | bytes | None]:
        """Word ``i``'s ``k``-th image as a source row: key, image, caption, meta, or its source_error."""
        from synth_text.captions import caption_for
        from synth_text.render import RenderError, encode_jpeg, render_sample

        synth, index, key = self.synth, i * self.synth.per_word + k, f"w{i:06d}-{k:03d}"
        try:
            r = render_sample(self.words[i], index, synth, self.fonts, self.words, self.photos)
        except RenderError as exc:
            return {"key": key, "source_error": f"{RENDER_FAILED}: {exc}",
                    "meta": json.dumps({"synth_word": self.words[i]}, ensure_ascii=False)}
        meta = {"synth": {"text": r.text, "font": r.font.name, "font_file": r.font.path, "font_index": r.font.index,
                          "font_size": r.font_size, "layout": r.layout, "background": r.background,
                          "contrast": round(r.contrast, 2), "line_boxes": _rounded(r.line_boxes),
                          "char_boxes": _rounded(r.char_boxes)}}
        return {"key": key, "image": encode_jpeg(r.image, synth.jpeg_quality),
                "caption": caption_for(r, synth.seed, index), "meta": json.dumps(meta, ensure_ascii=False)}


_KEY = re.compile(r"^w(\d{6})-(\d{3})$")


def render_keys(keys: set[str], synth: SynthConfig, storage: StorageConfig | None = None) -> dict[str, bytes | str]:
    """The images of these keys rendered again (deterministic: the bytes the run wrote), or why not:
    what the report shows for synthetic rejects, which keep no image bytes."""
    renderer = Renderer.of(synth, storage)
    out: dict[str, bytes | str] = {}
    for key in keys:
        m = _KEY.match(key)
        if m is None or int(m.group(1)) >= len(renderer.words) or int(m.group(2)) >= synth.per_word:
            out[key] = f"{key} is not a key of this synthetic source"
            continue
        row = renderer.row(int(m.group(1)), int(m.group(2)))
        out[key] = row.get("image") or str(row.get("source_error"))
    return out


def read(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int,
         storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    if cfg.synth is None:
        raise SourceError(f"{shard.path}: a synthetic shard needs the source.synth settings")
    start, end = word_range(shard)
    renderer = Renderer.of(cfg.synth, storage)
    builder = BatchBuilder(cfg.batch_rows)
    for i in range(start, end):
        for k in range(cfg.synth.per_word):
            batch = builder.add(source=shard.path, **renderer.row(i, k))
            if batch is not None:
                yield batch
    yield from drain(builder)


def _rounded(boxes: list[list[tuple[float, float]]]) -> list[list[list[float]]]:
    return [[[round(float(x), 1), round(float(y), 1)] for x, y in box] for box in boxes]


@lru_cache(maxsize=2)
def background_photos(output: str, count: int, storage: StorageConfig | None = None) -> tuple[np.ndarray, ...]:
    """Up to ``count`` photos from a curated output's committed shards (in part order), decoded once
    per process with the curation's guards and shrunk to 1344 px on the long side. An image that
    does not decode is left out (a warning counts them); none at all leaves photo backgrounds out."""
    import pyarrow.parquet as pq

    from tasks.decode import DecodeError, ImageSample
    from tasks.shards import committed_files
    from tasks.signals.arrays import fit_long_side
    from tasks.storage import as_store

    store = as_store(output, storage)
    photos, bad = [], 0
    limits = DecodeConfig()
    for url in committed_files(store, "shards"):
        rel = url.removeprefix(store.url()).lstrip("/")
        with store.open_input_file(rel) as fh:  # only as many rows as it takes
            for batch in pq.ParquetFile(fh).iter_batches(columns=["image"], batch_size=count):
                for data in batch.column("image").to_pylist():
                    try:
                        rgb = ImageSample(data, max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes,
                                          decode_side=1024).pixel_array()
                    except DecodeError:
                        bad += 1
                        continue
                    photos.append(fit_long_side(rgb, 1344))
                    if len(photos) == count:
                        break
                if len(photos) == count:
                    break
        if len(photos) == count:
            break
    if bad:
        log.warning("%d background photos of %s do not decode and are left out", bad, output)
    if not photos:
        log.warning("no background photo could be taken from %s: photo backgrounds are left out", output)
    return tuple(photos)
