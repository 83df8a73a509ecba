"""Accuracy beside every speed-up: the signals and the default config's decisions, today's code
against the previous versions (bench/previous.py), on the same images.

Images: the test photos (tests/data), the bench corpus rows the models section times, and text
images drawn over the photos and on posters (``bench.cost_study.text_images``: English and Chinese
lines in Noto Sans CJK at 28-96 px). Checks (the issue's bars):

- faces: every ``face_count`` equal to the previous version's;
- OCR: on text images (the drawn ones, and any where the previous ``ocr_area_ratio`` is above 0)
  the area within 0.02 of the previous; on the photos where it was 0, still 0;
- BRISQUE: Spearman rank correlation with the previous scores at least 0.95;
- decisions: the default config (its rules on) keeps and rejects, with the same reason, at least
  99 % of ``decision_rows`` bench corpus rows as the previous versions did; the differences listed;
- sharpness stays scale-stable: each test photo encoded at short sides 600-2000 px, the spread
  (coefficient of variation) of its sharpness across those sizes, previous and now;
- pHash: Hamming distance between the previous and the new hashes (no rule reads it);
- views: every view the default chain makes (RGB and grey, each side its signals ask for) equal,
  byte for byte, to the one Pillow's own resize makes (``tasks.resample``'s claim): the figures
  read off them, sharpness's scale stability among them, are then the previous ones by construction.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from bench import cost_study
from bench.previous import previous_chain, previous_views
from schemas.config import CurateConfig
from tasks.chain import Chain
from tasks.decode import DecodeError, ImageSample
from tasks.signals.phash import hamming

TARGETS: dict[str, tuple[str, float]] = {
    "face_count_diffs": ("<=", 0),
    "ocr_max_area_diff": ("<=", 0.02),
    "ocr_false_text_photos": ("<=", 0),
    "quality_spearman": (">=", 0.95),
    "decisions_equal_fraction": (">=", 0.99),
    "views_equal_fraction": (">=", 1.0),
}
OCR_TOLERANCE = 0.02
STABILITY_SIDES = (600, 800, 1000, 1400, 2000)


def _batch(images: dict[str, bytes], caption: str = "a photo") -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([
        {"key": k, "source": "bench", "caption": caption, "meta": None, "image": v, "source_error": None}
        for k, v in images.items()])


def _rows(chain: Chain, batch: pa.RecordBatch) -> dict[str, dict[str, Any]]:
    result = chain.score_batch(batch, set())
    rows = {r["key"]: {**r, "reason": None} for r in result.kept.to_pylist()}
    return rows | {r["key"]: r for r in result.rejects.to_pylist()}


def signal_checks(images: dict[str, bytes], texts: set[str], skip: frozenset[str]) -> dict[str, Any]:
    """Every signal on every image (no rules), previous and now, compared column by column."""
    from scipy.stats import spearmanr

    cfg = CurateConfig().without_rules()
    batch = _batch(images)
    prev, now = _rows(previous_chain(cfg, skip), batch), _rows(Chain(cfg, skip=skip), batch)
    keys = list(images)
    faces = [(k, prev[k]["face_count"], now[k]["face_count"]) for k in keys
             if prev[k]["face_count"] != now[k]["face_count"]]
    text_keys = [k for k in keys if k in texts or (prev[k]["ocr_area_ratio"] or 0) > 0]
    area = {k: (round(prev[k]["ocr_area_ratio"], 4), round(now[k]["ocr_area_ratio"], 4)) for k in text_keys}
    worst = max(area.items(), key=lambda kv: abs(kv[1][0] - kv[1][1]))
    photos = [k for k in keys if k not in text_keys]
    false_text = [k for k in photos if now[k]["ocr_area_ratio"] != 0]
    q = [k for k in keys if prev[k]["quality"] is not None and now[k]["quality"] is not None]
    q_prev, q_now = np.array([prev[k]["quality"] for k in q]), np.array([now[k]["quality"] for k in q])
    sharp = np.array([abs(now[k]["sharpness"] - prev[k]["sharpness"]) / max(prev[k]["sharpness"], 1e-9)
                      for k in keys])
    bits = [hamming(now[k]["phash"], prev[k]["phash"]) for k in keys]
    return {
        "images": len(keys), "text_images": len(text_keys), "photos_without_text": len(photos),
        "face_count_diffs": len(faces), "face_count_differences": faces,
        "ocr_max_area_diff": round(abs(worst[1][0] - worst[1][1]), 4), "ocr_worst": {worst[0]: worst[1]},
        "ocr_area_previous_now": area,
        "ocr_false_text_photos": len(false_text), "ocr_false_text_keys": false_text,
        "quality_spearman": round(float(spearmanr(q_prev, q_now).statistic), 4),
        "quality_max_abs_diff": round(float(np.abs(q_prev - q_now).max()), 2),
        "quality_none_changed": sum((prev[k]["quality"] is None) != (now[k]["quality"] is None) for k in keys),
        "sharpness_rel_diff_mean": round(float(sharp.mean()), 4),
        "sharpness_rel_diff_max": round(float(sharp.max()), 4),
        "phash_hamming_mean": round(float(np.mean(bits)), 2), "phash_hamming_max": int(max(bits)),
    }


def decision_checks(batches: list[pa.RecordBatch], skip: frozenset[str]) -> dict[str, Any]:
    """The default config, rules on, over the bench rows: the same verdict (kept, or the reason)."""
    cfg = CurateConfig()
    prev_chain, now_chain = previous_chain(cfg, skip), Chain(cfg, skip=skip)
    prev: dict[str, Any] = {}
    now: dict[str, Any] = {}
    for b in batches:
        prev |= _rows(prev_chain, b)
        now |= _rows(now_chain, b)
    diffs = [{"key": k, "previous": prev[k]["reason"] or "kept", "now": now[k]["reason"] or "kept",
              "sharpness": [prev[k].get("sharpness"), now[k].get("sharpness")]}
             for k in prev if prev[k]["reason"] != now[k]["reason"]]
    return {"rows": len(prev), "kept_previous": sum(r["reason"] is None for r in prev.values()),
            "kept_now": sum(r["reason"] is None for r in now.values()),
            "decisions_equal_fraction": round(1 - len(diffs) / len(prev), 4), "differences": diffs}


def _views(data: bytes, chain: Chain, color: bool) -> list[np.ndarray]:
    """The views the chain's signals read, at their sides (the base first), from one sample."""
    sample = ImageSample(data, max_pixels=chain.cfg.decode.max_pixels, max_file_bytes=chain.cfg.decode.max_file_bytes,
                         decode_side=chain.decode_side, color=color)
    sides = [None, *sorted({s for s in (sig.pixel_side() for sig in chain.active) if s is not None}, reverse=True)]
    return [sample.pixel_array(s) for s in sides] + [sample.grey_array(s) for s in sides]


def view_checks(images: dict[str, bytes], skip: frozenset[str]) -> dict[str, Any]:
    """Each image's views, made now and the previous way (Pillow's resize): equal bytes?"""
    chain = Chain(CurateConfig(), skip=skip)
    equal = total = 0
    differ: list[str] = []
    for key, data in images.items():
        for color in (True, False):
            try:
                now = _views(data, chain, color)
                with previous_views():
                    before = _views(data, chain, color)
            except DecodeError:
                continue
            same = [a.shape == b.shape and np.array_equal(a, b) for a, b in zip(now, before, strict=True)]
            equal, total = equal + sum(same), total + len(same)
            differ += [key] if not all(same) else []
    return {"views": total, "views_equal_fraction": round(equal / total, 6), "views_differ": sorted(set(differ))}


def _encoded_at(img: Image.Image, side: int) -> bytes:
    scale = side / min(img.size)
    buf = io.BytesIO()
    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS).save(
        buf, "JPEG", quality=90)
    return buf.getvalue()


def sharpness_stability(skip: frozenset[str]) -> dict[str, Any]:
    """Each test photo at several source sizes through the default config's chain (no rules):
    the coefficient of variation of its sharpness across the sizes, previous and now."""
    cfg = CurateConfig().without_rules()
    cfg = cfg.model_copy(update={"signals": {n: cfg.signals[n] for n in ("sharpness", "ocr") if n not in skip}})
    spread: dict[str, list[float]] = {"previous": [], "now": []}
    for path in sorted(cost_study.PHOTOS.glob("*.jpg")):
        img = Image.open(path).convert("RGB")
        if min(img.size) < 700:  # small test photos: enlarged first, so every size is a downscale
            img = img.resize((img.width * 3, img.height * 3), Image.Resampling.LANCZOS)
        batch = _batch({f"{path.name}@{s}": _encoded_at(img, s) for s in STABILITY_SIDES})
        for name, chain in (("previous", previous_chain(cfg, skip)), ("now", Chain(cfg, skip=skip))):
            values = np.array([r["sharpness"] for r in _rows(chain, batch).values()])
            spread[name].append(float(values.std() / values.mean()))
    return {f"sharpness_scale_cv_{k}": {"mean": round(float(np.mean(v)), 4), "max": round(float(np.max(v)), 4)}
            for k, v in spread.items()} | {"sides": list(STABILITY_SIDES), "photos": len(spread["now"])}


def measure(batches: list[pa.RecordBatch], decision_batches: list[pa.RecordBatch],
            skip: frozenset[str]) -> dict[str, Any]:
    photos = cost_study.photo_images()
    images = {k: v for k, v in photos.items() if k.startswith("photo/")}
    images |= {f"bench/{r['key']}": r["image"] for b in batches for r in b.select(["key", "image"]).to_pylist()}
    texts = cost_study.text_images(photos)
    signals = signal_checks(images | texts, set(texts), skip)
    decisions = decision_checks(decision_batches, skip)
    stability = sharpness_stability(skip)
    views = view_checks(images | texts, skip)
    headline = {k: signals[k] for k in ("face_count_diffs", "ocr_max_area_diff", "ocr_false_text_photos",
                                        "quality_spearman")}
    headline["decisions_equal_fraction"] = decisions["decisions_equal_fraction"]
    headline["views_equal_fraction"] = views["views_equal_fraction"]
    return {**headline, "accuracy": {"signals": signals, "decisions": decisions, "stability": stability,
                                     "views": views}}


def print_section(a: dict[str, Any]) -> None:
    s, d, st = a["signals"], a["decisions"], a["stability"]
    print(f"\naccuracy, now vs previous versions ({s['images']} images: {s['text_images']} with text, "
          f"{s['photos_without_text']} without)")
    print(f"  faces: {s['face_count_diffs']} counts differ {s['face_count_differences'] or ''}")
    print(f"  OCR area: max |diff| {s['ocr_max_area_diff']} on text images ({s['ocr_worst']}); "
          f"{s['ocr_false_text_photos']} text-free photos now > 0")
    print(f"  BRISQUE: Spearman {s['quality_spearman']}, max |diff| {s['quality_max_abs_diff']}")
    print(f"  sharpness: mean relative diff {s['sharpness_rel_diff_mean']} (max {s['sharpness_rel_diff_max']}); "
          f"scale spread (CV over {st['sides']} px) previous {st['sharpness_scale_cv_previous']}, "
          f"now {st['sharpness_scale_cv_now']}")
    print(f"  pHash: Hamming to previous mean {s['phash_hamming_mean']}, max {s['phash_hamming_max']}")
    v = a["views"]
    print(f"  views: {v['views']} (RGB and grey, every side the default chain reads), "
          f"{v['views_equal_fraction']:.4%} equal to Pillow's resize byte for byte {v['views_differ'] or ''}")
    print(f"  default config on {d['rows']} rows: {d['decisions_equal_fraction']:.2%} same decision "
          f"(kept {d['kept_previous']} -> {d['kept_now']}); differences: {d['differences'] or 'none'}")
