"""Pillow's bilinear resize of 8-bit images, bit for bit, at about a third of its cost.

Why: the figures the signals report (sharpness above all: a Laplacian variance) depend on the
resampler that made their view, and users' thresholds were set on Pillow's antialiased
bilinear. Every faster resampler tried (OpenCV's area, linear, a Gaussian or triangle
prefilter) moved sharpness by 10-24 % and flipped 3-5 % of ``sharpness >= 50`` decisions, so
this module keeps Pillow's arithmetic (its ``precompute_coeffs``, 22-bit fixed-point weights,
its order of the two passes, each pass rounded and clipped to 8 bits) and changes only how it runs:
Pillow's horizontal pass walks each output pixel's taps one by one; here both passes are one
kernel that sums whole rows (the horizontal pass runs on the transposed image), which the
compiler vectorises. ``tests/test_resample.py`` checks equality with Pillow byte for byte.

Only the plain case is served: modes L and RGB, no crop box, and a reduction below
``2 * reducing_gap`` (where Pillow's ``reducing_gap`` would run ``Image.reduce`` first, this
hands the call to Pillow). JPEG's DCT scaling leaves the decode within 2x of the views, so
that is nearly every call of the chain.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numba
import numpy as np
import pyarrow as pa
from PIL import Image

PRECISION_BITS = 22  # Pillow's: 32 - 8 - 2
REDUCING_GAP = 2.0
_MODES = frozenset({"L", "RGB"})

Coefficients = tuple[np.ndarray, np.ndarray, np.ndarray]  # first tap, tap count, weights (int32)


@numba.njit("Tuple((int32[::1], int32[::1], int32[:, ::1]))(int64, int64)", cache=True, nogil=True)
def _pillow_coefficients(in_size: int, out_size: int) -> Coefficients:  # pragma: no cover - compiled
    """Pillow's ``precompute_coeffs`` for its bilinear filter over the whole axis (in0 = 0,
    in1 = in_size), then ``normalize_coeffs_8bpc``: the same double arithmetic in the same
    order, so the same weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    first = np.empty(out_size, np.int32)
    count = np.empty(out_size, np.int32)
    weights = np.zeros((out_size, ksize), np.int32)
    k = np.empty(ksize, np.float64)
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C's cast
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ww = 0.0
        for x in range(xmax):
            t = abs((x + xmin - center + 0.5) * inv_filterscale)
            k[x] = 1.0 - t if t < 1.0 else 0.0
            ww += k[x]
        for x in range(xmax):
            w = k[x] / ww if ww != 0.0 else k[x]
            weights[xx, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
        first[xx] = xmin
        count[xx] = xmax
    return first, count, weights


@lru_cache(maxsize=4096)  # web images come in few sizes
def coefficients(in_size: int, out_size: int) -> Coefficients:
    """First tap, tap count and 22-bit fixed-point weights per output pixel of one axis."""
    return _pillow_coefficients(in_size, out_size)


_U8 = numba.types.Array(numba.uint8, 2, "C")
_I32 = numba.types.Array(numba.int32, 1, "C")
_SIGNATURES = [numba.void(src, _I32, _I32, numba.types.Array(numba.int32, 2, "C"), _U8)
               for src in (_U8, numba.types.Array(numba.uint8, 2, "C", readonly=True))]  # Pillow's arrays are read-only


@numba.njit(_SIGNATURES, cache=True, nogil=True, boundscheck=False)
def _rows_pass(src: np.ndarray, first: np.ndarray, count: np.ndarray, weights: np.ndarray,
               out: np.ndarray) -> None:  # pragma: no cover - compiled; tested through resize
    """Each output row is a weighted sum of ``count[r]`` source rows from ``first[r]``, rounded
    and clipped as Pillow's ``clip8``: whole rows at a time, so the inner loop vectorises."""
    rows, width = out.shape
    acc = np.empty(width, np.int32)
    for r in range(rows):
        acc[:] = 1 << (PRECISION_BITS - 1)
        for j in range(count[r]):
            w = weights[r, j]
            line = src[first[r] + j]
            for i in range(width):
                acc[i] += np.int32(line[i]) * w
        for i in range(width):
            v = acc[i] >> PRECISION_BITS
            out[r, i] = 0 if v < 0 else (255 if v > 255 else v)


def _resample_rows(src: np.ndarray, coeffs: Coefficients, offset: int, out_rows: int) -> np.ndarray:
    """``src`` (rows x pixels x channels) resampled along its first axis."""
    first, count, weights = coeffs
    flat = np.ascontiguousarray(src).reshape(src.shape[0], -1)
    out = np.empty((out_rows, flat.shape[1]), np.uint8)
    _rows_pass(flat, first - np.int32(offset), count, weights, out)
    return out.reshape((out_rows, *src.shape[1:]))


def _transposed(a: np.ndarray) -> np.ndarray:
    """Rows and columns swapped, channels kept (OpenCV's transpose: a blocked copy)."""
    return cv2.transpose(np.ascontiguousarray(a)).reshape(a.shape[1], a.shape[0], *a.shape[2:])


def _vertical_first(w: int, h: int, ow: int, oh: int) -> bool:
    """Pillow 13's pass order (python-pillow/Pillow#9549): the vertical pass first when the
    height loses more than twice the pixels the width loses. The order moves rounding, so it
    is Pillow's exactly."""
    return h - oh > 0 and h - oh > (w - ow) * 2


def served(shape: tuple[int, ...], size: tuple[int, int]) -> bool:
    """Whether ``resize_array`` computes this call itself (else it is Pillow's)."""
    h, w = shape[:2]
    ow, oh = size
    return (len(shape) == 2 or shape[2] == 3) and ow >= 1 and oh >= 1 \
        and int(w / ow / REDUCING_GAP) <= 1 and int(h / oh / REDUCING_GAP) <= 1


def as_array(img: Image.Image) -> np.ndarray:
    """The pixels of an L or RGB image as (h, w) or (h, w, 3) uint8. Through Pillow's Arrow
    export, which shares its memory (``np.asarray`` copies through ``tobytes``: 0.6 ms for an
    0.9 MP RGB image, as much as the resize); an image Pillow stores in several blocks, or
    another mode, takes ``np.asarray``'s copy."""
    w, h = img.size
    try:
        if img.mode == "L":
            return pa.array(img).to_numpy(zero_copy_only=True).reshape(h, w)
        if img.mode == "RGB":  # stored as RGBX
            return cv2.cvtColor(pa.array(img).flatten().to_numpy(zero_copy_only=True).reshape(h, w, 4),
                                cv2.COLOR_RGBA2RGB)
    except (ValueError, TypeError, pa.ArrowException):
        pass
    return np.asarray(img)


def resize_array(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``Image.fromarray(a).resize(size, BILINEAR, reducing_gap=2.0)`` as an array, the same bytes."""
    if not served(a.shape, size):
        return as_array(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP))
    h, w = a.shape[:2]
    ow, oh = size
    if (w, h) == (ow, oh):
        return a.copy()
    grey = a.ndim == 2
    if grey:
        a = a[:, :, None]
    if _vertical_first(w, h, ow, oh):
        if oh != h:
            a = _resample_rows(a, coefficients(h, oh), 0, oh)
        if ow != w:
            a = _transposed(_resample_rows(_transposed(a), coefficients(w, ow), 0, ow))
    else:
        vertical = coefficients(h, oh)
        top = int(vertical[0][0])
        bottom = int(vertical[0][-1] + vertical[1][-1])
        a = a[top:bottom]  # the source rows the vertical pass reads
        if ow != w:
            a = _transposed(_resample_rows(_transposed(a), coefficients(w, ow), 0, ow))
        if oh != h:
            a = _resample_rows(a, vertical, top, oh)
    return a[:, :, 0] if grey else a


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img.resize(size, BILINEAR, reducing_gap=2.0)``, the same bytes."""
    if img.mode not in _MODES:
        return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    return Image.fromarray(resize_array(as_array(img), size), img.mode)
