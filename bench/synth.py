"""Synthetic text images (``--only synth``): how fast ``t2i synth`` renders, how much of it OCR reads back, and
TextRecognitionDataGenerator (trdg) beside it. All in one run, so the ratios compare figures measured minutes apart:

- Render + JPEG encode (``render_sample`` + ``encode_jpeg``, quality 92, one process, after a warm-up), at
  512x512 and at 1024x1024, the default fonts, layouts and backgrounds (no photos: those need a curated output).
  ``images_per_s`` is wall time, one process = one core; ``images_per_cpu_s`` divides by ``time.process_time``,
  which other jobs on a shared machine do not inflate. The 512x512 target is judged on the CPU-second figure.
- With the OCR check: the real ``t2i synth`` cascade (``tasks.runner.run`` over the synthetic source, in-process:
  render, encode, decode, resolution, the curation OCR at its default settings, legibility, the ``text_cer`` rule,
  parquet writing) on the first words of the 50k list plus shards from deeper in it; rows/s (wall and per CPU
  second) and the pass rate overall, per layout and per font at the default settings (``max_cer`` 0.1).
- trdg 1.8.0, in its own venv (``.venv-bench``, ``make bench`` builds it: its pins clash with ours), run as a
  subprocess (bench/trdg_run.py) on the same words with the same face (Noto Sans CJK SC Regular, face 2 of the
  .ttc), its default gaussian-noise background, at height 64 (its usual use) and height 512 (about 0.4 MP, as wide
  as the text); ours is also timed with that one face at 512x512 for the ratio. The same OCR check (OCR signal +
  legibility CER) runs on a sample of trdg's images.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.corpus import REPO

BENCH_PY = REPO / ".venv-bench" / "bin" / "python"
TRDG_RUN = REPO / "bench" / "trdg_run.py"
FONT_FILE = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
FONT_NAME = "Noto Sans CJK SC Regular"
TARGETS: dict[str, tuple[str, float]] = {
    "synth_512_images_per_cpu_s": (">=", 150.0),
    "synth_ocr_pass_rate": (">=", 0.95),
}
# images timed per size (ours 512 / trdg height 64 and ours one face / trdg height 512 on the same words);
# pipeline shards of 50 words (the first ones, then every 100th from shard 20); trdg images OCR-checked
PLANS: dict[str, dict[str, int]] = {
    "full": {"render_512": 600, "render_1024": 240, "same_font_512": 300, "first_shards": 6, "deep_shards": 4,
             "trdg_64": 600, "trdg_512": 300, "trdg_ocr": 60},
    "quick": {"render_512": 120, "render_1024": 40, "same_font_512": 40, "first_shards": 1, "deep_shards": 1,
              "trdg_64": 120, "trdg_512": 40, "trdg_ocr": 15},
}
WORDS_PER_SHARD = 50


def bench_words(n: int) -> list[str]:
    """The first ``n`` benchmark words: the most frequent words of the 50k list alternating with words spread
    over the rest of it (every 83rd from the 5,000th), so every prefix mixes both and two measurements with the
    same ``n`` see the same words."""
    from synth_text.words import top_words

    words = top_words(50000)
    deep = words[5000::83]
    mixed = [w for pair in zip(words, deep, strict=False) for w in pair]
    return mixed[:n]


def time_render(side: int, n: int, fonts: list | None = None) -> dict[str, Any]:
    """Render + encode ``n`` images at ``side`` x ``side``, one process; wall and CPU seconds."""
    from synth_text.config import SynthConfig
    from synth_text.render import RenderError, encode_jpeg, render_sample
    from synth_text.words import top_words
    from tasks.sources.synth import fonts_for

    cfg = SynthConfig(sizes=[(side, side)])
    words = top_words(50000)
    fonts = fonts or fonts_for(cfg)
    index = {w: i for i, w in enumerate(words)}
    todo = [(w, index[w]) for w in bench_words(n)]
    for w, i in todo[:10]:  # warm-up: font and glyph caches
        encode_jpeg(render_sample(w, i, cfg, fonts, words).image, cfg.jpeg_quality)
    failed = size = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for w, i in todo:
        try:
            size += len(encode_jpeg(render_sample(w, i, cfg, fonts, words).image, cfg.jpeg_quality))
        except RenderError:
            failed += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"size": f"{side}x{side}", "images": n, "render_failed": failed, "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2), "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1),
            "ms_per_image_cpu": round(1000 * cpu / n, 2), "mean_jpeg_kb": round(size / max(1, n - failed) / 1024, 1)}


def time_pipeline(out: Path, first: int, deep: int) -> dict[str, Any]:
    """The t2i synth cascade in-process on ``first`` + ``deep`` shards; rows/s and pass rates."""
    from synth_text.pipeline import SOURCE, pass_rates, synth_config
    from tasks.runner import run
    from tasks.sources.synth import synth_shards

    shutil.rmtree(out, ignore_errors=True)
    cfg = synth_config(None, words=50000, words_per_shard=WORDS_PER_SHARD)
    shards = synth_shards(cfg.source.synth)
    picked = shards[:first] + shards[20::100][:deep]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    run(SOURCE, out, cfg, shards=picked, use_ray=False)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rates = pass_rates(out)
    layouts = rates.get("synth_layout") or rates.get("layout") or {}
    rows = sum(v["images"] for v in layouts.values())
    kept = sum(v["kept"] for v in layouts.values())
    return {
        "words": [f"{s.path.rsplit('/', 1)[1]}" for s in picked], "rows": rows, "kept": kept,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows_per_s": round(rows / wall, 2),
        "rows_per_cpu_s": round(rows / cpu, 2), "pass_rate": round(kept / max(rows, 1), 4),
        "per_layout": {k: v["pass_rate"] for k, v in layouts.items()},
        "per_layout_images": {k: v["images"] for k, v in layouts.items()},
        "per_font": {k: v["pass_rate"] for k, v in (rates.get("font") or {}).items()},
    }


def ocr_check(pairs: list[tuple[bytes, str]]) -> dict[str, Any]:
    """The cascade's OCR signal (default settings) and legibility CER on encoded images and their texts."""
    from synth_text.config import SynthConfig
    from tasks.decode import ImageSample
    from tasks.signals.base import Sample
    from tasks.signals.legibility import cer
    from tasks.signals.ocr import Ocr

    max_cer = SynthConfig().max_cer
    ocr = Ocr()
    ocr.ensure_setup()
    ok = 0
    for data, text in pairs:
        image = ImageSample(data, max_pixels=100_000_000, max_file_bytes=64 * 2**20, decode_side=ocr.pixel_side())
        row = ocr.compute_batch([Sample("k", None, image)])[0]
        ok += cer(text, row["ocr_text"] or "") <= max_cer
    return {"images": len(pairs), "kept": ok, "pass_rate": round(ok / max(1, len(pairs)), 4)}


def run_trdg(words: list[str], size: int, count: int, save_dir: Path | None, save: int) -> dict[str, Any]:
    spec = {"words": words, "font": FONT_FILE, "font_index": 2, "size": size, "count": count,
            "save_dir": str(save_dir) if save_dir else None, "save": save}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f, ensure_ascii=False)
    try:
        done = subprocess.run([str(BENCH_PY), str(TRDG_RUN), f.name], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        os.unlink(f.name)
    if done.returncode:
        raise RuntimeError(f"trdg_run failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # trdg prints a line of its own at import


def measure_trdg(plan: dict[str, int], work: Path) -> dict[str, Any]:
    if not BENCH_PY.is_file():
        return {"skipped": f"{BENCH_PY.relative_to(REPO)} is missing: `make bench` builds it (requirements-bench.txt)"}
    out: dict[str, Any] = {}
    for size, key in ((64, "trdg_64"), (512, "trdg_512")):
        folder = work / f"trdg-{size}"
        shutil.rmtree(folder, ignore_errors=True)
        words = bench_words(plan[key])
        r = run_trdg(words, size, plan[key], folder, plan["trdg_ocr"])
        labels = json.loads((folder / "labels.json").read_text())
        pairs = [((folder / f"{i:05d}.jpg").read_bytes(), t) for i, t in enumerate(labels)]
        r["ocr"] = ocr_check(pairs)
        out[f"height_{size}"] = r
    return out


def measure(mode: str, work: Path) -> dict[str, Any]:
    from synth_text.config import SynthConfig
    from tasks.sources.synth import fonts_for

    plan = PLANS[mode]
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    render = {"512": time_render(512, plan["render_512"]), "1024": time_render(1024, plan["render_1024"])}
    one = [f for f in fonts_for(SynthConfig()) if f.name == FONT_NAME]
    render["512_one_font"] = time_render(512, plan["same_font_512"], one) if one else {"skipped": f"no {FONT_NAME}"}
    pipeline = time_pipeline(work / "out", plan["first_shards"], plan["deep_shards"])
    trdg = measure_trdg(plan, work)
    ratios: dict[str, Any] = {}
    if "height_512" in trdg and "images_per_cpu_s" in render["512_one_font"]:
        ours, theirs = render["512_one_font"], trdg["height_512"]
        ratios = {
            "ours_512x512_vs_trdg_h512_images_per_cpu_s": round(
                ours["images_per_cpu_s"] / theirs["images_per_cpu_s"], 2),
            "ours_512x512_vs_trdg_h512_megapixels_per_cpu_s": round(
                ours["images_per_cpu_s"] * 0.262144 / (theirs["images_per_cpu_s"] * theirs["mean_megapixels"]), 2),
            "ours_512x512_vs_trdg_h64_images_per_cpu_s": round(
                ours["images_per_cpu_s"] / trdg["height_64"]["images_per_cpu_s"], 2),
        }
    section = {"mode": mode, "render": render, "pipeline": pipeline, "trdg": trdg, "ratios": ratios,
               "wall_s": round(time.perf_counter() - started, 1)}
    return {"synth_512_images_per_cpu_s": render["512"]["images_per_cpu_s"],
            "synth_ocr_pass_rate": pipeline["pass_rate"], "synth": section}


def print_section(s: dict[str, Any]) -> None:
    r, p, t = s["render"], s["pipeline"], s["trdg"]
    print(f"\nsynthetic text images ({s['mode']}; {s['wall_s']} s; one process; per CPU-second = time.process_time)")
    print(f"{'generator':<52}{'images':>7}{'img/s':>9}{'img/CPU-s':>11}{'MP':>7}{'OCR pass':>10}")
    rows = [(f"ours {r['512']['size']}, default fonts (render+encode)", r["512"], 0.262, None),
            (f"ours {r['1024']['size']}, default fonts (render+encode)", r["1024"], 1.049, None)]
    if "images_per_s" in r["512_one_font"]:
        rows.append((f"ours 512x512, {FONT_NAME}", r["512_one_font"], 0.262, None))
    for key, label in (("height_64", "trdg 1.8.0, height 64"), ("height_512", "trdg 1.8.0, height 512")):
        if key in t:
            x = t[key]
            rows.append((f"{label}, {FONT_NAME}", x, x["mean_megapixels"], f"{x['ocr']['kept']}/{x['ocr']['images']}"))
    for label, x, mp, ocr in rows:
        print(f"{label:<52}{x['images']:>7}{x['images_per_s']:>9}{x['images_per_cpu_s']:>11}{mp:>7.3f}"
              f"{(ocr or ''):>10}")
    print(f"{'ours + OCR check (t2i synth cascade, in-process)':<52}{p['rows']:>7}{p['rows_per_s']:>9}"
          f"{p['rows_per_cpu_s']:>11}{'mixed':>7}{p['kept']:>5}/{p['rows']}")
    if "skipped" in t:
        print(f"trdg: skipped ({t['skipped']})")
    print("(the 512x512 target is judged on img/CPU-s; the cascade's rows/s include loading the OCR models)")
    for name, value in s["ratios"].items():
        print(f"  {name}: {value}")
    print(f"OCR pass rate at the default settings: {p['pass_rate']} over {p['rows']} rows "
          f"(words {', '.join(p['words'])})")
    print("  per layout: " + ", ".join(f"{k} {v} ({p['per_layout_images'][k]})" for k, v in p["per_layout"].items()))
    worst = sorted(p["per_font"].items(), key=lambda kv: kv[1])[:4]
    print("  lowest fonts: " + ", ".join(f"{k} {v}" for k, v in worst))
