"""Quality: BRISQUE no-reference technical quality, at a fixed short side.

Lower is better: about 0-30 for clean photos, 50-100 for blurred, noisy or blocky ones
(it can dip below 0 on very clean images); None for a flat image (no texture to model).
Like sharpness, the score moves with scale (one photo: 26 at 256 px, 62 at full size), so it
is only comparable at one normalised short side: 512 px by default, the scale of the LIVE
images the SVM was fitted on; at 384 px full-size noise mostly averages away.

The features are the ``brisque`` package's, computed once instead of twice at full scale, with
the 7x7 blur as OpenCV's separable filter (zero border, like the package's ``convolve2d``: equal
to it within 1e-15 on random input, 4x faster), the MSCN values and the sums of the five AGGD
fits formed in one compiled pass (``tasks.signals.aggd``: no product stored), the shape
parameter read off a table of its moment ratio instead of a root search, and the SVM's RBF sum
as a dot product (libsvm's own predict leaves OpenMP threads spinning on a second core: 8 ms of
core time an image for 20 us of work); the signal feeds it the grey view (PIL's conversion,
before the resize). About 15x less core time than this module's first version (scipy's blur,
masked sums, skimage's grey from RGB), which the bench keeps (``bench/previous.py``) to show the
two side by side: Spearman 0.9986 on the bench's images. On RGB the score stays within ~1.5 of
the package's (the blur's rounding flips the sign of ~0 MSCN values in flat areas); the grey
conversion moves it by up to 8 on a flat poster, so a fixed threshold on ``quality`` set against
the old figures is worth re-checking.
The package's bundled SVM and scaling files are read through
``libsvm``; its ``url=True`` mode (``requests.get``) is never reachable from here.
Runs in the shard task: the model is 350 KB and loads once per process, not worth an actor.
"""

from __future__ import annotations

import importlib.util
import pickle
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.signals.aggd import mscn_sums
from tasks.signals.base import NoParams, Ranges, Sample, Signal

_C = 1.0 / 255.0  # MSCN stabiliser, for grey in [0, 1]
_GREY = np.array([0.2125, 0.7154, 0.0721])  # skimage.color.rgb2gray
_MIN_SIDE = 16  # the half-scale pass needs a few 7x7 windows


class QualityParams(NoParams):
    short_side: int = Field(512, ge=32, le=4096, description="BRISQUE is computed at this short side")


def _model_dir() -> Path | None:
    """The bundled model directory, found without importing ``brisque`` (slow, pulls requests)."""
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


@cache
def _model() -> tuple[Any, np.ndarray, np.ndarray]:
    """libsvm model and feature min/max, loaded once per process from the package's own files."""
    from libsvm import svmutil

    models = _model_dir()
    if models is None:
        raise RuntimeError("brisque package not installed")
    svm = svmutil.svm_load_model(str(models / "svm.txt"))
    if svm is None:
        raise RuntimeError(f"cannot load {models / 'svm.txt'}")
    with open(models / "normalize.pickle", "rb") as f:  # the installed package's file: trusted like its code
        scale = pickle.load(f)
    return svm, np.asarray(scale["min_"], dtype=np.float64), np.asarray(scale["max_"], dtype=np.float64)


@cache
def _gauss7_1d() -> np.ndarray:
    """The package's 7x7 Gaussian (sigma 7/6, normalised) is the outer product of this with itself."""
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * (7 / 6) ** 2))
    return g / g.sum()


def _blur(img: np.ndarray) -> np.ndarray:
    """Zero-filled 7x7 Gaussian ("same" size), as two 1-D passes in float64 (see module doc)."""
    import cv2

    g = _gauss7_1d()
    return cv2.sepFilter2D(img, cv2.CV_64F, g, g, borderType=cv2.BORDER_CONSTANT)


def mscn(grey: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients."""
    mu = _blur(grey)
    sigma = np.sqrt(np.abs(mu * mu - _blur(grey * grey)))
    return (grey - mu) / (sigma + _C)


def _phi(alpha: np.ndarray) -> np.ndarray:
    """The AGGD's moment ratio, through log-gamma so the table's small alphas do not overflow."""
    from scipy.special import gammaln

    return np.exp(2 * gammaln(2 / alpha) - gammaln(1 / alpha) - gammaln(3 / alpha))


@cache
def _alpha_table() -> tuple[np.ndarray, np.ndarray]:
    """phi(alpha) on a fine log grid over 0.03-100 (phi rises with alpha), to invert by interpolation:
    the package solves phi(alpha) = r with a root search per fit, 10 fits an image. Beyond the
    grid (a near-flat distribution, in images of a few dozen pixels) alpha stays at its end, where
    the root search wandered off to any value."""
    alpha = np.geomspace(0.03, 100.0, 60_000)
    return _phi(alpha), alpha


def _alpha_for(ratio: float) -> float:
    phi, alpha = _alpha_table()
    return float(np.interp(ratio, phi, alpha))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian fit of ``x``: (alpha, mean, sigma_l^2, sigma_r^2), as the
    package does it. The sums are dot products: sum(x^2 where x < 0) = (sum(x^2) - sum(x |x|)) / 2.
    The signal takes its sums from ``aggd.mscn_sums`` instead; this is the same fit on an array."""
    if x.size == 0:
        return (np.nan,) * 4
    flat = x.ravel()
    mag = np.abs(flat)
    sum_sq = float(np.einsum("i,i", flat, flat))  # not BLAS: its idle threads spin on the cores
    return aggd_from_sums(sum_sq, float(np.einsum("i,i", flat, mag)), float(mag.sum()),
                          int(np.count_nonzero(flat < 0)), x.size)


def aggd_from_sums(sum_sq: float, sum_x_abs: float, sum_abs: float, negatives: int,
                   count: int) -> tuple[float, float, float, float]:
    """The fit from the four sums of its array (``aggd.SUMS``) and the array's size."""
    from scipy.special import gamma

    if negatives in (0, count):  # one-sided: no asymmetric fit (the package gets 0/0 there too)
        return (np.nan,) * 4
    sum_left = (sum_sq - sum_x_abs) / 2
    left = sum_left / negatives
    right = (sum_sq - sum_left) / (count - negatives)
    r_hat = (sum_abs / count) ** 2 / (sum_sq / count)
    g = np.sqrt(left) / np.sqrt(right)
    big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    if not np.isfinite(big_r):  # flat input: 0/0 above
        return (np.nan,) * 4
    alpha = _alpha_for(big_r)
    sl, sr = np.sqrt(left), np.sqrt(right)
    mean = (sr - sl) * np.sqrt(gamma(1 / alpha) / gamma(3 / alpha)) * gamma(2 / alpha) / gamma(1 / alpha)
    return alpha, float(mean), float(left), float(right)


def _features(grey: np.ndarray) -> list[float]:
    """18 features at one scale: MSCN (alpha, variance), then 4 per neighbour product; the sums
    of all five arrays in one pass (``aggd.mscn_sums``), neither MSCN nor products stored."""
    grey = np.ascontiguousarray(grey)
    sums = mscn_sums(grey, _blur(grey), _blur(grey * grey), _C)
    fits = [aggd_from_sums(float(a), float(b), float(c), int(n), int(k)) for a, b, c, n, k in sums]
    alpha, _, left, right = fits[0]
    return [alpha, (left + right) / 2, *(v for fit in fits[1:] for v in fit)]


def brisque_features(pixels: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a uint8 array, grey (H, W) or RGB (H, W, 3): 18 at full size, 18
    at half size. The signal passes grey (PIL's conversion, made before the resize: a third of
    its work); RGB is converted as the package does (skimage's rgb2gray)."""
    import cv2

    if pixels.ndim == 2:
        grey = np.multiply(pixels, 1.0 / 255, dtype=np.float64)
    else:
        grey = np.multiply(pixels, 1.0 / 255, dtype=np.float64) @ _GREY  # skimage.img_as_float + rgb2gray
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.array(_features(grey) + _features(half), dtype=np.float64)


@cache
def _svr() -> tuple[np.ndarray, np.ndarray, float, float]:
    """The package's epsilon-SVR (RBF kernel) as arrays: support vectors, their coefficients, rho
    and gamma. libsvm's own predict runs an OpenMP loop over 770 vectors whose idle threads then
    spin: 8 ms of a second core per image for 20 us of work."""
    svm, _, _ = _model()
    if (svm.param.svm_type, svm.param.kernel_type) != (3, 2):  # EPSILON_SVR, RBF: the bundled model
        raise RuntimeError("quality: the brisque package's SVM is no longer an RBF epsilon-SVR")
    vectors = svm.get_SV()
    dense = np.zeros((len(vectors), len(_model()[1])))
    for row, sv in zip(dense, vectors, strict=True):
        for index, value in sv.items():
            if index > 0:  # libsvm's 1-based feature index; -1 ends a row
                row[index - 1] = value
    coef = np.array([c[0] for c in svm.get_sv_coef()])
    return dense, coef, float(svm.rho[0]), float(svm.param.gamma)


def svr_predict(scaled: np.ndarray) -> float:
    """libsvm's ``svm_predict`` for the bundled model: sum of coef * exp(-gamma |x - sv|^2), minus rho."""
    vectors, coef, rho, gamma = _svr()
    d = vectors - scaled
    kernel = np.exp(-gamma * np.einsum("ij,ij->i", d, d))
    return float(np.einsum("i,i", coef, kernel)) - rho


def brisque_score(pixels: np.ndarray) -> float | None:
    """BRISQUE score (lower is better) of a grey or RGB uint8 array; None for a flat fill or an
    image under 16 px a side."""
    if min(pixels.shape[:2]) < _MIN_SIDE:
        return None
    feats = brisque_features(pixels)
    if not np.isfinite(feats).all():
        return None
    _, lo, hi = _model()
    return svr_predict(-1 + 2.0 / (hi - lo) * (feats - lo))


class Quality(Signal):
    name = "quality"
    color = False  # reads grey: ImageSample.grey
    cost = 150
    Params = QualityParams
    fields = (pa.field("quality", pa.float32()),)
    ranges: ClassVar[Ranges] = {"quality": (None, None)}  # an SVM regression: ~0-100, but nothing bounds it (see above)

    def pixel_side(self) -> int | None:
        return self.params.short_side

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("libsvm") is None:
            return "quality: libsvm (a dependency of the brisque package) is not installed"
        models = _model_dir()
        if models is None:
            return "quality: the brisque package is not installed"
        missing = [str(models / f) for f in ("svm.txt", "normalize.pickle") if not (models / f).is_file()]
        return f"quality: BRISQUE model file not found: {', '.join(missing)}" if missing else None

    def model_files(self) -> list[Path]:
        models = _model_dir()
        return [models / "svm.txt", models / "normalize.pickle"] if models else []

    def compute(self, sample: Sample) -> dict[str, Any]:
        return {"quality": brisque_score(sample.image.grey_array(self.params.short_side))}


SIGNAL = Quality
