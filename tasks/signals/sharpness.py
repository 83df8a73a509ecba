"""Sharpness: variance of the Laplacian of the grey image at a fixed short side.

The raw figure rises 2-6x when the same photo is downscaled, so it is only comparable
across images at one normalised size (512 px short side by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

import cv2
import numpy as np
import pyarrow as pa
from pydantic import Field

from tasks.signals.base import NoParams, Ranges, Sample, Signal


class SharpnessParams(NoParams):
    short_side: int = Field(512, ge=32, le=4096)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (OpenCV's ksize=1 kernel), valid region only.
    int16 holds it exactly (|lap| <= 4 * 255) and runs twice as fast as float32."""
    if min(grey.shape[:2]) < 3:
        return 0.0
    lap = cv2.Laplacian(np.ascontiguousarray(grey, dtype=np.uint8), cv2.CV_16S, ksize=1)[1:-1, 1:-1]
    # E[x^2] - E[x]^2 from two vectorised reductions: 9x faster than cv2.meanStdDev on int16.
    mean = cv2.mean(lap)[0]
    return max(0.0, cv2.norm(lap, cv2.NORM_L2SQR) / lap.size - mean * mean)


class Sharpness(Signal):
    name = "sharpness"
    color = False
    cost = 10
    Params = SharpnessParams
    fields = (pa.field("sharpness", pa.float32()),)
    # A variance, clamped at 0; the Laplacian of uint8 grey lies in [-1020, 1020], whose
    # variance is at most 1020 ** 2.
    ranges: ClassVar[Ranges] = {"sharpness": (0, 1020**2)}

    def pixel_side(self) -> int | None:
        return self.params.short_side

    def compute(self, sample: Sample) -> dict[str, Any]:
        grey = sample.image.grey_array(self.params.short_side)
        return {"sharpness": laplacian_variance(grey)}


SIGNAL = Sharpness
