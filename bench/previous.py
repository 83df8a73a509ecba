"""The signals as they were before issue 15's speed-ups, kept callable here (the bench), not in the
product, so every figure and every accuracy check has the old path beside the new one.

What changed, and what each previous version does instead:

- views: sharpness, pHash and BRISQUE read grey views resized from a grey decode
  (``ImageSample.grey``, the same PIL bilinear path in one channel). Before, they read RGB views
  (``ImageSample.pixels``) and converted them. Faces and OCR read RGB views as before (an OpenCV
  resize for faces changed 1-4 face counts in 270 images; PIL's did not).
- view resizes: ``tasks.resample``'s compiled copy of Pillow's bilinear arithmetic (the same
  bytes), on arrays shared with Pillow through its Arrow export. Before: Pillow's ``resize``, and
  ``np.asarray``'s copy out of Pillow for each signal (``previous_views``; the previous kept PIL
  images between the steps, so its copies sat at other places: close, not identical, in cost).
- BRISQUE: OpenCV's separable blur, the AGGD sums of the MSCN image and its four neighbour
  products in one compiled pass (``tasks.signals.aggd``), a table for the shape parameter, the
  SVM as a numpy dot product, grey in. Before: scipy's ``convolve2d``, the products stored and
  summed with masks, ``scipy.optimize.root`` per fit, libsvm's predict (its OpenMP threads spin
  on a second core), skimage's grey from RGB.
- OCR: detection at 256 px short side (``det_side``), before 320; lines cut for the recogniser at
  most 96 px high (``crop_line``), before at full size (rapidocr's ``get_rotate_crop_image``);
  onnxruntime's memory arena on (not swapped back here: a session setting); denormal floats
  flushed to zero around the model calls (``tasks.fpu``), before not.

``previous_chain(cfg, skip)`` is a ``Chain`` whose signals are these previous versions, with the
same parameters otherwise, so the same rules and rows run through both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from schemas.config import CurateConfig
from tasks import resample
from tasks.chain import BatchResult, Chain
from tasks.signals import quality
from tasks.signals.base import Sample, Signal
from tasks.signals.ocr import Ocr, OcrParams
from tasks.signals.phash import PHash, phash64
from tasks.signals.quality import Quality
from tasks.signals.sharpness import Sharpness, laplacian_variance

PREVIOUS_DET_SIDE = 320


@cache
def _gauss7() -> np.ndarray:
    """The package's normalised 7x7 Gaussian (sigma 7/6), built its way: the outer product of the
    1-D kernel differs in the last bit, which in flat areas flips the sign of ~0 MSCN values."""
    y, x = np.indices((7, 7)) - 3
    sigma = 7 / 6
    k = 1 / (2 * np.pi * sigma**2) * np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / np.sum(k)


def _blur_scipy(img: np.ndarray) -> np.ndarray:
    """The previous 7x7 zero-filled Gaussian: scipy's ``convolve2d`` with the package's kernel."""
    from scipy.signal import convolve2d

    return convolve2d(img, _gauss7(), "same")


def _aggd_fit_masked(x: np.ndarray) -> tuple[float, float, float, float]:
    """The previous AGGD fit: masked sums and a root search for alpha (the package's way)."""
    from scipy.optimize import root
    from scipy.special import gamma

    if x.size == 0:
        return (np.nan,) * 4
    x2 = x * x
    neg = x < 0
    n_left = np.count_nonzero(neg)
    sum_all = x2.sum()
    sum_left = np.sum(x2, where=neg)
    left = sum_left / n_left
    right = (sum_all - sum_left) / (x.size - n_left)
    r_hat = np.abs(x).mean() ** 2 / (sum_all / x.size)
    g = np.sqrt(left) / np.sqrt(right)
    big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    if not np.isfinite(big_r):
        return (np.nan,) * 4
    alpha = float(root(lambda z: quality._phi(z) - big_r, [0.2]).x[0])
    sl, sr = np.sqrt(left), np.sqrt(right)
    mean = (sr - sl) * np.sqrt(gamma(1 / alpha) / gamma(3 / alpha)) * gamma(2 / alpha) / gamma(1 / alpha)
    return alpha, float(mean), float(left), float(right)


def _features_stored(grey: np.ndarray) -> list[float]:
    """The previous 18 features of one scale: each neighbour product stored, then fitted."""
    m = quality.mscn(grey)
    alpha, _, left, right = _aggd_fit_masked(m)
    out = [alpha, (left + right) / 2]
    for prod in (m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]):
        out.extend(_aggd_fit_masked(prod))
    return out


def _svm_libsvm(scaled: np.ndarray) -> float:
    """The previous prediction: libsvm's own, through its node arrays."""
    from libsvm import svmutil

    x, _ = svmutil.gen_svm_nodearray([float(f) for f in scaled], isKernel=False)
    return float(svmutil.libsvm.svm_predict_probability(quality._model()[0], x, (svmutil.c_double * 1)()))


@contextmanager
def _swapped(module: Any, **functions: Any) -> Iterator[None]:
    """``module``'s functions replaced by these for the duration, in this process."""
    saved = {name: getattr(module, name) for name in functions}
    for name, fn in functions.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def previous_brisque() -> AbstractContextManager[None]:
    """The previous blur, fits and SVM swapped into ``tasks.signals.quality``: ``brisque_score`` is
    then the previous version (fed RGB, as it was)."""
    return _swapped(quality, _blur=_blur_scipy, _features=_features_stored, svr_predict=_svm_libsvm)


def _pillow_resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR, reducing_gap=resample.REDUCING_GAP))


def previous_views() -> AbstractContextManager[None]:
    """Views made the previous way: Pillow's resize, numpy's copy out of Pillow."""
    return _swapped(resample, resize_array=_pillow_resize, as_array=np.asarray)


def previous_brisque_score(rgb: np.ndarray) -> float | None:
    with previous_brisque():
        return quality.brisque_score(rgb)


class PreviousOcr(Ocr):
    """Lines cut at full size (rapidocr's own crop), detection at 320 unless the config says,
    denormals computed as they come (the detector's microcode-assist slow path on Intel cores)."""

    numerics = staticmethod(nullcontext)

    @staticmethod
    def crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
        from rapidocr.utils.process_img import get_rotate_crop_image

        return get_rotate_crop_image(bgr, box)


class PreviousSharpness(Sharpness):
    def compute(self, sample: Sample) -> dict[str, Any]:
        grey = np.asarray(sample.image.pixels(self.params.short_side).convert("L"))
        return {"sharpness": laplacian_variance(grey)}


class PreviousPHash(PHash):
    def compute(self, sample: Sample) -> dict[str, Any]:
        return {"phash": phash64(sample.image.pixels(64))}


class PreviousQuality(Quality):
    color = True

    def compute(self, sample: Sample) -> dict[str, Any]:
        return {"quality": previous_brisque_score(np.asarray(sample.image.pixels(self.params.short_side)))}


PREVIOUS: dict[str, type[Signal]] = {
    "sharpness": PreviousSharpness, "phash": PreviousPHash, "quality": PreviousQuality, "ocr": PreviousOcr,
}
CHANGED = frozenset(PREVIOUS)  # the signals with a previous version to time beside (all read views)


def previous_signal(signal: Signal, explicit: dict[str, Any]) -> Signal:
    """The previous version of ``signal`` with its parameters; OCR's ``det_side`` goes back to 320
    unless the config set it (``explicit``: the signal's entry in the config)."""
    params = signal.params
    if signal.name == "ocr" and "det_side" not in explicit:
        params = OcrParams.model_validate({**params.model_dump(), "det_side": PREVIOUS_DET_SIDE})
    cls = PREVIOUS.get(signal.name)
    return signal if cls is None else cls(params)


class PreviousChain(Chain):
    """A Chain whose views are made the previous way (``previous_views``) while it scores."""

    def score_batch(self, batch: pa.RecordBatch, kept_keys: set[str]) -> BatchResult:
        with previous_views():
            return super().score_batch(batch, kept_keys)


def previous_chain(cfg: CurateConfig, skip: frozenset[str] = frozenset()) -> Chain:
    """A Chain over ``cfg`` whose signals and views are the previous versions (rules, buckets,
    order the same)."""
    chain = PreviousChain(cfg, skip=skip)
    chain.signals = [previous_signal(s, cfg.signals.get(s.name, {})) for s in chain.signals]
    chain.active = [s for s in chain.signals if s.name not in skip]
    chain.color = any(s.color for s in chain.active if s.pixel_side() is not None)
    sides = [p for p in (s.pixel_side() for s in chain.active) if p is not None]
    chain.decode_side = max(sides, default=chain.decode_side)
    return chain
