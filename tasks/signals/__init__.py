"""The signal registry: every module in this package that defines ``SIGNAL`` is a signal.

Adding a signal is one new file here plus its entry under ``signals:`` in the config.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import Any

from tasks.signals.base import Sample, Signal

__all__ = ["Sample", "Signal", "all_signal_names", "build_signals", "check_config", "registry", "unavailable_signals"]


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


def _column_owner() -> dict[str, str]:
    return {col: name for name, cls in registry().items() for col in cls.columns()}


def check_config(signals: dict[str, dict[str, Any]], rules: dict[str, Any]) -> None:
    """Raise ValueError naming the first unknown signal, bad parameter or orphan rule."""
    known = registry()
    for name, params in signals.items():
        if name not in known:
            raise ValueError(f"unknown signal {name!r}; known: {', '.join(sorted(known))}")
        known[name].Params.model_validate(params or {})
    owner = _column_owner()
    for column in rules:
        if column not in owner:
            raise ValueError(f"rule on unknown column {column!r}; signal columns: {', '.join(sorted(owner))}")
        if owner[column] not in signals:
            raise ValueError(f"rule on {column!r} needs signal {owner[column]!r} under signals:")


def unavailable_signals(signals: list[Signal], rules: dict[str, Any]) -> dict[str, str]:
    """Signals that cannot run here (name -> why). Raises ValueError when a rule needs one:
    a filter that silently never runs is worse than a run that does not start."""
    missing = {s.name: why for s in signals if (why := s.unavailable())}
    owner = _column_owner()
    for column in rules:
        if owner.get(column) in missing:
            raise ValueError(f"the rule on {column!r} needs signal {owner[column]!r}, which cannot run: "
                             f"{missing[owner[column]]}")
    return missing


def build_signals(signals: dict[str, dict[str, Any]]) -> list[Signal]:
    """Instantiate the configured signals, cheapest first."""
    known = registry()
    built = [known[name](known[name].Params.model_validate(params or {})) for name, params in signals.items()]
    return sorted(built, key=lambda s: (s.cost, s.name))
