"""Downscaling of pixel arrays handed to models (faces, OCR): one place for the size arithmetic.

No ``SIGNAL`` here, so the registry passes this module by.
"""

from __future__ import annotations

import cv2
import numpy as np


def scaled(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` resized by ``scale`` with area averaging (downscaling); no side below 1 px."""
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def fit_short_side(rgb: np.ndarray, side: int) -> np.ndarray:
    """Scaled down so the short side is ``side``; never upscaled."""
    short = min(rgb.shape[:2])
    return rgb if short <= side else scaled(rgb, side / short)


def fit_long_side(rgb: np.ndarray, limit: int) -> np.ndarray:
    """Scaled down so the long side is at most ``limit`` (OpenCV's warps stop at 32767 px)."""
    long = max(rgb.shape[:2])
    return rgb if long <= limit else scaled(rgb, limit / long)
