"""Denormals flushed around model calls (tasks/fpu.py): the flush happens inside the block, on
this thread only, is undone after it (exceptions too), and OCR's detector runs under it with the
same boxes as without."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from tasks import fpu
from tasks.decode import ImageSample
from tasks.signals.base import Sample
from tasks.signals.ocr import Ocr

TINY = np.float32(1e-30)
SCALE = np.float32(1e-10)  # TINY * SCALE = 1e-40: a float32 denormal, or 0 when flushed


def product() -> np.float32:
    return np.multiply(np.array([TINY]), np.array([SCALE]))[0]


def test_available_on_x86_64_linux() -> None:
    x86_linux = platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")
    assert fpu.available() == x86_linux


def test_denormals_are_zero_inside_the_block_only() -> None:
    assert product() != 0  # the default: gradual underflow
    with fpu.flush_denormals():
        assert (product() == 0) == fpu.available()  # elsewhere (ARM, macOS) a documented no-op
        assert np.float32(2.0) * np.float32(3.0) == 6.0  # normal arithmetic untouched
    assert product() != 0


def test_the_register_is_restored_after_an_exception() -> None:
    with pytest.raises(RuntimeError), fpu.flush_denormals():
        raise RuntimeError("model failed")
    assert product() != 0


def test_nested_blocks_restore_the_outer_state() -> None:
    with fpu.flush_denormals():
        with fpu.flush_denormals():
            assert (product() == 0) == fpu.available()
        assert (product() == 0) == fpu.available()  # the inner exit restored the outer block's state
    assert product() != 0


def test_ocr_models_run_flushed_and_find_the_same_boxes() -> None:
    """Both model calls see the flush (checked from inside them), and the detector's boxes on
    the bus equal those of rapidocr's own detector, which runs without it."""
    signal = Ocr()
    signal.setup()
    data = (Path(__file__).parent / "data" / "img2.jpg").read_bytes()
    image = ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=signal.pixel_side())
    rgb = signal.prepare(Sample("bus", "A bus", image))[0]
    seen: list[bool] = []

    def watched(model):
        def call(*args, **kwargs):
            seen.append(bool(product() == 0))
            return model(*args, **kwargs)
        return call

    det_session, rec = signal._det.session, signal._rec
    signal._det.session, signal._rec = watched(det_session), watched(rec)
    view, boxes = signal._detect(rgb)
    lines = signal._recognise(rgb, view, boxes)
    signal._det.session, signal._rec = det_session, rec
    assert seen == [True, True] and any(text for text, _ in lines)
    want = signal._det(np.ascontiguousarray(view[:, :, ::-1])).boxes
    assert product() != 0
    assert len(boxes) == len(want) and all(np.array_equal(a, b) for a, b in zip(boxes, want, strict=True))


def test_the_bench_previous_ocr_runs_without_the_flush() -> None:
    """The bench times the previous OCR beside today's: it must not inherit the flush."""
    from bench.previous import PreviousOcr

    with PreviousOcr.numerics():
        assert product() != 0
    with Ocr.numerics():
        assert (product() == 0) == fpu.available()
