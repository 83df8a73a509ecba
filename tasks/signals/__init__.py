"""The signal registry: every module in this package that defines ``SIGNAL`` is a signal.

Adding a signal is one new file here plus its entry under ``signals:`` in the config.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from functools import cache
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from schemas.config import Bounds, format_validation_error
from tasks.signals.base import Sample, Signal

__all__ = ["Sample", "Signal", "all_signal_names", "build_signals", "check_config", "column_owner", "registry",
           "unavailable_signals"]


@cache
def registry() -> dict[str, type[Signal]]:
    found: dict[str, type[Signal]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "SIGNAL", None)
        if cls is None:
            continue
        if cls.name in found:
            raise RuntimeError(f"two signals are named {cls.name!r}")
        found[cls.name] = cls
    return found


def all_signal_names() -> list[str]:
    return sorted(registry(), key=lambda n: (registry()[n].cost, n))


def column_owner() -> dict[str, str]:
    """Signal column -> the signal that makes it (read live: tests patch the registry)."""
    return {col: name for name, cls in registry().items() for col in cls.columns()}


def check_config(signals: Mapping[str, Mapping[str, Any]], rules: Mapping[str, Bounds]) -> None:
    """Raise ValueError at the first unknown signal, bad parameter, orphan rule or bound outside its
    column's range. The message starts with the key's dotted path (``rules.short_side.min: ...``):
    these errors reach the user as they are, and a bare ``short_side`` could be either section."""
    for name, params in signals.items():
        _check_signal(name, params)
    owner = column_owner()
    for column, bounds in rules.items():
        _check_rule(column, bounds, owner, signals)


def _check_signal(name: str, params: Mapping[str, Any]) -> None:
    known = registry()
    if name not in known:
        raise ValueError(f"signals.{name}: unknown signal; known: {', '.join(sorted(known))}")
    try:
        known[name].Params.model_validate(params or {})
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, ("signals", name))) from None


def _check_rule(column: str, bounds: Bounds, owner: dict[str, str], signals: Mapping[str, Any]) -> None:
    path = f"rules.{column}"
    if column not in owner:
        bounded = sorted(c for c in owner if _numeric(_field(owner[c], c)))
        raise ValueError(f"{path}: no signal makes a column {column!r}; the columns a rule can bound: "
                         f"{', '.join(bounded)}")
    signal, field = owner[column], _field(owner[column], column)
    if not _numeric(field):
        raise ValueError(f"{path}: {column} holds {field.type} values; a rule can only bound a numeric column")
    if signal not in signals:
        raise ValueError(f"{path}: needs signal {signal!r} under signals:")
    _check_range(path, column, bounds, registry()[signal].ranges.get(column, (None, None)))


def _field(signal: str, column: str) -> pa.Field:
    return next(f for f in registry()[signal].fields if f.name == column)


def _numeric(field: pa.Field) -> bool:
    """Rules compare values with ``<`` and ``>``: a text or list column has nothing to bound."""
    return pa.types.is_integer(field.type) or pa.types.is_floating(field.type)


def _check_range(path: str, column: str, bounds: Bounds, limits: tuple[float | None, float | None]) -> None:
    """A bound outside what the column can hold never fires (or always does): say so."""
    lo, hi = limits
    for side in ("min", "max"):
        value = getattr(bounds, side)
        if value is None:
            continue
        if lo is not None and value < lo:
            raise ValueError(f"{path}.{side}: {value:.15g} is below {lo:.15g}, the smallest {column} can be")
        if hi is not None and value > hi:
            raise ValueError(f"{path}.{side}: {value:.15g} is above {hi:.15g}, the largest {column} can be")


def unavailable_signals(signals: list[Signal], rules: dict[str, Any]) -> dict[str, str]:
    """Signals that cannot run here (name -> why). Raises ValueError when a rule needs one:
    a filter that silently never runs is worse than a run that does not start."""
    missing = {s.name: why for s in signals if (why := s.unavailable())}
    owner = column_owner()
    for column in rules:
        if owner.get(column) in missing:
            raise ValueError(f"rules.{column}: needs signal {owner[column]!r}, which cannot run: "
                             f"{missing[owner[column]]}")
    return missing


def build_signals(signals: dict[str, dict[str, Any]]) -> list[Signal]:
    """Instantiate the configured signals, cheapest first."""
    known = registry()
    built = [known[name](known[name].Params.model_validate(params or {})) for name, params in signals.items()]
    return sorted(built, key=lambda s: (s.cost, s.name))
