"""Equal-area aspect-ratio buckets, the kohya-ss / NovelAI way.

For each width from min_side to max_side in steps of 64 the height is the largest
multiple of 64 that keeps w*h <= base_side**2 (capped at max_side); both orientations
are added, plus the square. An image goes to the bucket whose aspect ratio is nearest on
a log scale, so 2:1 and 1:2 are equally far from square.
"""

from __future__ import annotations

import bisect
import math
from functools import cache

from schemas.config import BucketConfig


@cache
def make_buckets(base_side: int, min_side: int, max_side: int, step: int) -> tuple[tuple[int, int], ...]:
    max_area = base_side * base_side
    found: set[tuple[int, int]] = set()
    square = int(math.sqrt(max_area)) // step * step
    found.add((square, square))
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            found.add((width, height))
            found.add((height, width))
        width += step
    return tuple(sorted(found, key=lambda wh: wh[0] / wh[1]))


class BucketAssigner:
    """Nearest bucket by log aspect ratio, with a sorted table and bisect."""

    def __init__(self, cfg: BucketConfig):
        self.buckets = make_buckets(cfg.base_side, cfg.min_side, cfg.max_side, cfg.step)
        self._log_ratios = [math.log(w / h) for w, h in self.buckets]

    def assign(self, width: int, height: int) -> tuple[int, int]:
        target = math.log(width / height)
        i = bisect.bisect_left(self._log_ratios, target)
        candidates = [j for j in (i - 1, i) if 0 <= j < len(self.buckets)]
        best = min(candidates, key=lambda j: abs(self._log_ratios[j] - target))
        return self.buckets[best]
