"""Config thresholds to keep-or-reason. A reason names the column and the bound it broke,
so `t2i stats` can count rejects per rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.config import Bounds


@dataclass(frozen=True)
class Verdict:
    reason: str  # e.g. "sharpness_below_min"
    detail: str  # e.g. "sharpness 12.5 < min 50"


def check(column: str, bounds: Bounds, value: Any) -> Verdict | None:
    """None keeps the row; a missing or NaN value breaks any bound."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Verdict(f"{column}_missing", f"{column} could not be computed")
    if bounds.min is not None and value < bounds.min:
        return Verdict(f"{column}_below_min", f"{column} {value:g} < min {bounds.min:g}")
    if bounds.max is not None and value > bounds.max:
        return Verdict(f"{column}_above_max", f"{column} {value:g} > max {bounds.max:g}")
    return None


def first_failure(values: Mapping[str, Any], rules: Mapping[str, Bounds]) -> Verdict | None:
    """Apply the rules whose columns are in ``values``, in config order."""
    for column, bounds in rules.items():
        if column in values:
            verdict = check(column, bounds, values[column])
            if verdict is not None:
                return verdict
    return None
