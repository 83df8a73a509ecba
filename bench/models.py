"""Issue 3's figures: what each model signal costs in the chain, and the whole chain against a
naive loop that runs the same kind of models the way Data-Juicer's unfused image ops do.

All on the same few corpus images, read before any timing, in this one process:

- ``<signal>_images_per_s``: a Chain with that signal alone and no rules: the chain's one decode
  at the size that signal asks for, then its compute. That is what the signal costs where it runs.
- ``full_chain_images_per_s``: a Chain with every signal that can run here and no rules (what
  ``t2i analyze`` does), so every image pays every signal. No Ray pools are given, so the model
  signals run inline (``ModelSignal.compute_batch``): prepare, setup once, infer.
- ``cascade_core_ms_per_row``: the default config with its rules on (what ``t2i curate`` does):
  core-milliseconds per input row, the fraction of rows each rule removes on this corpus, and
  ``cascade_core_hours_per_billion``, the projected core-hours for 1e9 pairs (each pass also
  gives its own ``core_hours_per_billion``: every signal alone, every signal on every image).
  Core time is this process's CPU time, so it counts every thread a library used.
- ``full_chain_vs_naive_flushed``: the same ratio against the naive loop with its OCR op run with
  denormals flushed (``tasks.fpu``), a change of ours that a peer could make as well; no target,
  shown so that the headline is not read as all fusion.
- ``naive_images_per_s``: per image and per op, a fresh full-size PIL decode to RGB (Data-Juicer's
  ``load_image``: ops share no decode unless fused), then the op at full size: the image's shape,
  Haar faces with Data-Juicer's ``image_face_count_filter`` settings, RapidOCR's default pipeline
  (detect, classify, recognise), BRISQUE from the ``brisque`` package, Laplacian variance, pHash.

Models are built outside the timing on both sides, and whatever loads lazily (the chain's model
signals, RapidOCR) runs once on a warm-up image first: a worker loads its models once, not per
image. Both sides run on one thread (cv2 1, onnxruntime the OCR signal's thread count, 1 by
default) so the ratio compares work, not parallelism; ``cpu_per_wall`` of each timed pass shows
whether anything spread over more cores anyway.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from bench.memory import TreeSampler
from bench.previous import CHANGED, previous_chain
from schemas.config import CurateConfig
from tasks.chain import Chain
from tasks.fpu import flush_denormals
from tasks.signals import build_signals, unavailable_signals
from tasks.signals.ocr import OcrParams
from tasks.signals.phash import phash64

TARGETS: dict[str, tuple[str, float]] = {"full_chain_vs_naive": (">=", 20.0)}
PASSES = 2  # each chain pass runs twice over the images; the second is reported (see time_chain)
# Data-Juicer's image_face_count_filter: haarcascade_frontalface_alt.xml, and these
# detectMultiScale arguments (its minSize/maxSize default to None: OpenCV's own, no limit).
HAAR_FILE = "haarcascade_frontalface_alt.xml"
HAAR_ARGS: dict[str, Any] = {"scaleFactor": 1.1, "minNeighbors": 3}
WHY_NOT = {"aesthetic": "not measured: no local CLIP ViT-L/14 weights"}


def _timed(work: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds of this process (all its threads), and the result."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = work()
    return time.perf_counter() - wall, time.process_time() - cpu, out


# Core-hours for a billion rows from core-milliseconds per row.
CORE_HOURS_PER_BILLION_PER_MS = 1e9 / 3.6e6


def _pass(seconds: float, cpu: float, images: int) -> dict[str, Any]:
    core_ms = 1000 * cpu / images  # CPU time, all threads of this process: what a cluster bills
    return {"seconds": round(seconds, 3), "images_per_s": round(images / seconds, 2),
            "ms_per_image": round(1000 * seconds / images, 1), "cpu_per_wall": round(cpu / seconds, 2),
            "core_ms_per_image": round(core_ms, 1),
            "core_hours_per_billion": round(core_ms * CORE_HOURS_PER_BILLION_PER_MS)}


def time_chain(cfg: CurateConfig, batches: list[pa.RecordBatch], skip: frozenset[str],
               previous: bool = False) -> dict[str, Any]:
    """``Chain.score_batch`` over the batches (``previous``: the signals' previous versions,
    bench/previous.py), after a one-image warm-up that loads the models. It runs ``PASSES`` times
    and reports the last: a worker runs for hours, and the first pass over new image sizes pays
    allocator growth (page faults) a long run does not (first pass kept as ``first_pass_core_ms``).
    Any reject here (no rules) is an image that did not pay every signal. ``per_row_core_ms``:
    where the time went, per input row (the chain's own accounting: decode, then each signal,
    its views included), and ``reached``: the share of rows each signal saw."""
    chain = previous_chain(cfg, skip) if previous else Chain(cfg, skip=skip)
    assert not chain.pools  # no actor pools: model signals run in this process
    chain.score_batch(batches[0].slice(0, 1), set())

    def run() -> tuple[int, int, Counter[str]]:
        seen: set[str] = set()
        results = [chain.score_batch(b, seen) for b in batches]
        reasons = Counter(r for res in results for r in res.rejects.column("reason").to_pylist())
        return sum(r.kept.num_rows for r in results), sum(r.rejects.num_rows for r in results), reasons

    first = []
    for _ in range(PASSES):
        chain.core_s.clear()
        chain.rows_in.clear()
        seconds, cpu, (kept, rejected, reasons) = _timed(run)
        first.append(cpu)
    rows = kept + rejected
    return {**_pass(seconds, cpu, rows), "kept": kept, "rejected": rejected,
            "first_pass_core_ms": round(1000 * first[0] / rows, 1),
            "removed_fraction": {reason: round(n / rows, 3) for reason, n in reasons.most_common()},
            "per_row_core_ms": {k: round(1000 * v / rows, 2) for k, v in chain.core_s.items() if v},
            "reached": {k: round(v / rows, 3) for k, v in chain.rows_in.items()}}


class NaiveLoop:
    """Unfused ops, one after another, each decoding the image again at full size."""

    def __init__(self, ocr_threads: int):
        from brisque import BRISQUE
        from rapidocr import RapidOCR

        self.haar = cv2.CascadeClassifier(cv2.data.haarcascades + HAAR_FILE)
        self.ocr = RapidOCR(params={  # the default pipeline; only threads and log level set
            "EngineConfig.onnxruntime.intra_op_num_threads": ocr_threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            "Global.log_level": "error",
        })
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)  # "no text found" on every photo
        self.brisque = BRISQUE(url=False)
        self.ops: dict[str, Callable[[Image.Image], Any]] = {
            "shape": lambda img: img.size,  # Data-Juicer's shape filter also loads the whole image
            "faces": lambda img: len(self.haar.detectMultiScale(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY),
                                                                **HAAR_ARGS)),
            "ocr": lambda img: self.ocr(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR)),
            "quality": lambda img: self.brisque.score(np.asarray(img)),
            "sharpness": lambda img: cv2.Laplacian(np.asarray(img.convert("L")), cv2.CV_64F).var(),
            "phash": phash64,
        }
        self.seconds = dict.fromkeys(["decode", *self.ops], 0.0)

    def run(self, images: list[bytes]) -> None:
        for data in images:
            for name, op in self.ops.items():
                t0 = time.perf_counter()
                img = Image.open(io.BytesIO(data)).convert("RGB")  # Data-Juicer's load_image
                t1 = time.perf_counter()
                op(img)
                self.seconds["decode"] += t1 - t0
                self.seconds[name] += time.perf_counter() - t1

    def ocr_flushed_seconds(self, images: list[bytes]) -> float:
        """Wall seconds of the OCR op alone over ``images`` with denormals flushed around it, as
        the chain's OCR runs (tasks/fpu.py): how much of the ratio a peer would get back by
        the same fix, so the headline is not read as all fusion. The decode is outside the
        timing: the loop's own pass already counted it."""
        seconds = 0.0
        for data in images:
            img = Image.open(io.BytesIO(data)).convert("RGB")
            started = time.perf_counter()
            with flush_denormals():
                self.ops["ocr"](img)
            seconds += time.perf_counter() - started
        return seconds


def measure(batches: list[pa.RecordBatch], mode: str) -> dict[str, Any]:
    """Per-signal chains (cheap to expensive), then the full chain and the naive loop back to
    back over the same images. Returns the headline keys plus a ``models`` detail section."""
    cfg = CurateConfig().without_rules()
    signals = build_signals(cfg.signals)  # cheapest first
    missing = unavailable_signals(signals, {})
    skip = frozenset(missing)
    images = [d for b in batches for d in b.column("image").to_pylist()]
    threads = OcrParams.model_validate(cfg.signals.get("ocr", {})).threads
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with TreeSampler() as mem:
            alone = {s.name: cfg.model_copy(update={"signals": {s.name: cfg.signals[s.name]}})
                     for s in signals if s.name not in skip}
            per_signal = {name: time_chain(c, batches, frozenset()) for name, c in alone.items()}
            previous = {name: time_chain(c, batches, frozenset(), previous=True)
                        for name, c in alone.items() if name in CHANGED}
            full = time_chain(cfg, batches, skip)
            full_previous = time_chain(cfg, batches, skip, previous=True)
            cascade = time_chain(CurateConfig(), batches, skip)  # the default config, its rules on
            cascade_previous = time_chain(CurateConfig(), batches, skip, previous=True)
            naive = NaiveLoop(threads)
            naive.ops["ocr"](Image.open(io.BytesIO(images[0])).convert("RGB"))  # RapidOCR loads on first call
            seconds, cpu, _ = _timed(lambda: naive.run(images))
            ocr_flushed_s = naive.ocr_flushed_seconds(images)
    finally:
        cv2.setNumThreads(cv2_threads)
    naive_pass = _pass(seconds, cpu, len(images))
    # The same loop with only its OCR op flushed: wall seconds, the op's share swapped.
    flushed_s = seconds - naive.seconds["ocr"] + ocr_flushed_s
    headline: dict[str, Any] = {f"{name}_images_per_s": r["images_per_s"] for name, r in per_signal.items()}
    headline |= {
        "full_chain_images_per_s": full["images_per_s"],
        "naive_images_per_s": naive_pass["images_per_s"],
        "full_chain_vs_naive": round(full["images_per_s"] / naive_pass["images_per_s"], 2),
        "full_chain_vs_naive_flushed": round(full["images_per_s"] * flushed_s / len(images), 2),
        "full_chain_vs_previous": round(full_previous["core_ms_per_image"] / full["core_ms_per_image"], 2),
        "cascade_core_ms_per_row": cascade["core_ms_per_image"],
        "cascade_core_hours_per_billion": cascade["core_hours_per_billion"],
        "cascade_vs_previous": round(cascade_previous["core_ms_per_image"] / cascade["core_ms_per_image"], 2),
    }
    return {**headline, "models": {
        "mode": mode,
        "images": len(images),
        "skipped": sorted(skip),
        "mean_megapixels": round(float(np.mean([_megapixels(d) for d in images])), 3),
        "threads": {"cv2": 1, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1,
                    "mediapipe": "its default (see cpu_per_wall)", "scipy_numpy": "default"},
        "per_signal": {**per_signal, **{n: WHY_NOT.get(n, f"not measured: {why}") for n, why in missing.items()}},
        "per_signal_previous": previous,
        "full_chain": {**full, "signals": [s.name for s in signals if s.name not in skip]},
        "full_chain_previous": full_previous,
        "cascade": cascade,
        "cascade_previous": cascade_previous,
        "naive": {**naive_pass, "ops": list(naive.ops), "haar": {"cascade": HAAR_FILE, **HAAR_ARGS},
                  "op_ms_per_image": {k: round(1000 * v / len(images), 1) for k, v in naive.seconds.items()},
                  "ocr_flushed_ms_per_image": round(1000 * ocr_flushed_s / len(images), 1)},
        "other_cpu_s": round(mem.other_cpu_s, 2),
        "wall_s": round(mem.seconds, 1),
    }}


def _megapixels(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as img:  # header only
        return img.width * img.height / 1e6


def print_section(m: dict[str, Any]) -> None:
    """The per-signal table: images/s and ms/image, the full chain, and where the naive loop's time goes."""
    t = m["threads"]
    print(f"\nmodel signals ({m['mode']}, {m['images']} images of {m['mean_megapixels']} MP mean, one process, "
          f"threads: cv2 {t['cv2']}, onnxruntime {t['onnxruntime_intra_op']}; {m['wall_s']} s)")
    print(f"{'pass':<14}{'images/s':>10}{'ms/image':>10}{'cpu/wall':>10}{'core-ms':>10}{'core-h / 1e9':>14}"
          f"{'previous core-ms':>18}{'speed-up':>10}")
    prev = {**m["per_signal_previous"], "full chain": m["full_chain_previous"], "cascade": m["cascade_previous"]}
    rows = [*m["per_signal"].items(), ("full chain", m["full_chain"]), ("cascade", m["cascade"]),
            ("naive loop", m["naive"])]
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:<14}{r}")
            continue
        line = (f"{name:<14}{r['images_per_s']:>10}{r['ms_per_image']:>10}{r['cpu_per_wall']:>10}"
                f"{r['core_ms_per_image']:>10}{r['core_hours_per_billion']:>14}")
        if name in prev:
            p = prev[name]["core_ms_per_image"]
            line += f"{p:>18}{p / r['core_ms_per_image']:>9.2f}x"
        print(line)
    for name in ("cascade", "cascade_previous"):
        c = m[name]
        print(f"{name} (default config, rules on): core-ms per input row {c['per_row_core_ms']}; "
              f"rows reaching each signal {c['reached']}; removed {c['removed_fraction']}")
    ops = ", ".join(f"{k} {v}" for k, v in m["naive"]["op_ms_per_image"].items())
    print(f"naive loop, ms per image: {ops} ({len(m['naive']['ops'])} full decodes each); its OCR op with "
          f"denormals flushed as ours: {m['naive']['ocr_flushed_ms_per_image']} ms")
    if m["other_cpu_s"] > 5:
        print(f"  <- {m['other_cpu_s']} CPU s taken by other processes meanwhile: figures are pessimistic")
