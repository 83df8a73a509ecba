"""TextRecognitionDataGenerator (trdg) on given words, timed; run with the bench venv's Python (``.venv-bench``).

``python bench/trdg_run.py SPEC.json`` where the spec is a JSON object: ``words`` (list), ``font`` (path),
``font_index`` (face in a .ttc), ``size`` (trdg's ``size``: the image height of horizontal text), ``width``
(trdg's ``width``, -1: as wide as the text), ``count`` (images), ``background_type`` (trdg's: 0 gaussian noise,
1 plain white, 2 quasicrystal), ``save_dir`` (optional: JPEG files of the first ``save`` images, for the OCR check)
and ``save``. Prints one JSON object: images, wall and CPU seconds (``time.process_time``), mean image size.
JPEG encoding is timed too (quality 92, like ours), so the rate compares with ours' render + encode.

trdg opens fonts with ``ImageFont.truetype(path, size)``, i.e. the first face of a collection (Noto Sans CJK's
.ttc starts with JP); the face is pinned to ``font_index`` here so both generators draw the same SC glyphs.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    from PIL import ImageFont

    truetype = ImageFont.truetype
    font_path, font_index = spec["font"], int(spec.get("font_index", 0))

    def pinned(font=None, size=10, index=0, *args, **kwargs):
        if str(font) == font_path:
            index = font_index
        return truetype(font, size, index, *args, **kwargs)

    ImageFont.truetype = pinned
    from importlib.metadata import version

    from trdg.generators import GeneratorFromStrings

    words, count = spec["words"], int(spec["count"])
    save_dir = Path(spec["save_dir"]) if spec.get("save_dir") else None
    save = int(spec.get("save", 0)) if save_dir else 0
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    next(iter(GeneratorFromStrings(words[:1], count=1, fonts=[font_path], language="cn", size=32)))  # warm-up
    gen = GeneratorFromStrings(
        words, count=count, fonts=[font_path], language="cn", size=int(spec["size"]), width=int(spec.get("width", -1)),
        background_type=int(spec.get("background_type", 0)), random_skew=False, random_blur=False,
    )
    labels: list[str] = []
    images = skipped = pixels = jpeg_bytes = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for img, label in gen:
        if img is None:  # trdg drops an image whose text and background means are too close
            skipped += 1
            continue
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=92)
        jpeg_bytes += buf.tell()
        pixels += img.size[0] * img.size[1]
        if save_dir and images < save:
            (save_dir / f"{images:05d}.jpg").write_bytes(buf.getvalue())
            labels.append(label)
        images += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if save_dir:
        (save_dir / "labels.json").write_text(json.dumps(labels, ensure_ascii=False))
    n = max(images, 1)
    print(json.dumps({
        "trdg": version("trdg"), "pillow": version("pillow"), "images": images, "skipped": skipped,
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "images_per_s": round(images / wall, 2),
        "images_per_cpu_s": round(images / cpu, 2), "mean_megapixels": round(pixels / n / 1e6, 4),
        "mean_jpeg_kb": round(jpeg_bytes / n / 1024, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
