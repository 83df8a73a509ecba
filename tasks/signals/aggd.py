"""The sums BRISQUE's ten AGGD fits need, in one compiled pass per image scale.

Why: BRISQUE fits an asymmetric generalised Gaussian to the MSCN image and to its four
neighbour products (horizontal, vertical, both diagonals). Each fit needs four sums of its
array: sum(x^2), sum(x|x|), sum(|x|) and how many x < 0. Done with numpy, each product is a
3 MB temporary and each sum another pass over it: 20 passes and 4 temporaries a scale, 60 % of
the signal's time. Here the MSCN values and every product are formed and summed in place, row by
row, from the two blurs (OpenCV's, in ``quality``); the sums are
reassociated so the compiler can vectorise them, which moves them by a few units in the 15th
digit (the fits are continuous in them).

No ``SIGNAL`` here, so the registry passes this module by.
"""

from __future__ import annotations

import numba
import numpy as np

# Rows of ``mscn_sums``: the MSCN values, then the products of each with its neighbour.
PAIRS = ("mscn", "horizontal", "vertical", "diagonal", "antidiagonal")
SUMS = ("sum_sq", "sum_x_abs", "sum_abs", "negatives", "count")


@numba.njit(inline="always")
def _sums(x: np.ndarray, n: int) -> tuple[float, float, float, float]:  # pragma: no cover - compiled
    """``SUMS`` of ``x[:n]``, in local accumulators (an array element would not vectorise)."""
    sq = x_abs = mag = neg = 0.0
    for j in range(n):
        p = x[j]
        a = abs(p)
        sq += p * p
        x_abs += p * a
        mag += a
        neg += 1.0 if p < 0 else 0.0
    return sq, x_abs, mag, neg


@numba.njit(inline="always")
def _add(out: np.ndarray, k: int, x: np.ndarray, n: int) -> None:  # pragma: no cover - compiled
    sq, x_abs, mag, neg = _sums(x, n)
    out[k, 0] += sq
    out[k, 1] += x_abs
    out[k, 2] += mag
    out[k, 3] += neg
    out[k, 4] += n


_F64 = numba.types.Array(numba.float64, 2, "C")
_READ = numba.types.Array(numba.float64, 2, "C", readonly=True)


@numba.njit([numba.float64[:, ::1](g, _F64, _F64, numba.float64) for g in (_F64, _READ)],
            cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def mscn_sums(grey: np.ndarray, mu: np.ndarray, blur_sq: np.ndarray, c: float) -> np.ndarray:  # pragma: no cover
    """A (5, 5) array: per row of ``PAIRS`` the ``SUMS`` of that array, where the MSCN values are
    ``(grey - mu) / (sqrt(|mu^2 - blur_sq|) + c)`` (``quality.mscn``'s arithmetic, value for value)
    and the products ``m[:, :-1] * m[:, 1:]``, ``m[:-1] * m[1:]``, ``m[:-1, :-1] * m[1:, 1:]``,
    ``m[1:, :-1] * m[:-1, 1:]``. Two rows of MSCN values are held at a time, never the image."""
    h, w = grey.shape
    out = np.zeros((5, 5))
    above, row, prod = np.empty(w), np.empty(w), np.empty(w)
    for i in range(h):
        for j in range(w):
            row[j] = (grey[i, j] - mu[i, j]) / (np.sqrt(abs(mu[i, j] * mu[i, j] - blur_sq[i, j])) + c)
        _add(out, 0, row, w)
        for j in range(w - 1):
            prod[j] = row[j] * row[j + 1]
        _add(out, 1, prod, w - 1)
        if i > 0:
            for j in range(w):
                prod[j] = above[j] * row[j]
            _add(out, 2, prod, w)
            for j in range(w - 1):
                prod[j] = above[j] * row[j + 1]
            _add(out, 3, prod, w - 1)
            for j in range(w - 1):
                prod[j] = row[j] * above[j + 1]
            _add(out, 4, prod, w - 1)
        above[:] = row
    return out
