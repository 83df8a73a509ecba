"""``t2i synth``: render the most frequent Chinese words and keep what OCR reads back, as a curated
output (same shard schema, manifest, resume, object stores, ``t2i stats``).

The run is a curation run over the synthetic source (tasks/sources/synth.py) with a fixed cascade:
``resolution`` (width, height, buckets), ``synth`` (what was rendered: text, font, layout, boxes),
``ocr`` (the curation path's OCR, with the same settings a curation config gives it: the ``ocr:``
section of the synth config), ``legibility`` (the OCR reading's character error rate against the
rendered text), and one rule: ``text_cer <= synth.max_cer``. An illegible image is a reject with
its reason (``text_cer_above_max``) and the OCR reading beside it, like any curated reject.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.config import Bounds, ConfigError, CurateConfig, format_validation_error, read_yaml_mapping
from tasks.runner import RunSummary, run
from tasks.sources.base import SourceError
from tasks.sources.synth import SCHEME, synth_shards

SOURCE = f"{SCHEME}words"
# Sections of a synth config that pass to the curation config as they are.
PASSED = ("output", "run", "storage", "decode", "buckets")


def synth_config(path: str | Path | None = None, **synth: Any) -> CurateConfig:
    """The curation config of a synth run: the file's ``synth:`` section (``synth`` overrides,
    e.g. ``words=1000``), its ``ocr:`` settings, and its output/run/storage sections."""
    data = read_yaml_mapping(path) if path else {}
    where = str(path) if path else "synth settings"
    unknown = set(data) - {"synth", "ocr", *PASSED}
    if unknown:
        raise ConfigError(f"{where}: unknown section {', '.join(sorted(unknown))} (synth, ocr, {', '.join(PASSED)})")
    section = {**(data.get("synth") or {}), **{k: v for k, v in synth.items() if v is not None}}
    cfg = {"source": {"synth": section, "batch_rows": 32},
           "signals": {"resolution": {}, "synth": {}, "ocr": data.get("ocr") or {}, "legibility": {}},
           **{k: data[k] for k in PASSED if k in data}}
    try:
        parsed = CurateConfig.model_validate({**cfg, "rules": {}})
        return parsed.model_copy(update={"rules": {"text_cer": Bounds(max=parsed.source.synth.max_cer)}})
    except ValidationError as exc:
        lines = format_validation_error(exc).splitlines()
        raise ConfigError("\n".join(f"{where}: {line}" for line in lines)) from exc


def synthesize(out: str | Path, cfg: CurateConfig, *, use_ray: bool = True,
               progress: Callable[..., None] | None = None) -> RunSummary:
    """Render, read back and write every word's images not yet done in ``out`` (a killed run resumes).
    The fonts are checked first: a missing or corrupt font file fails here, naming it, not in every shard."""
    from synth_text.fonts import FontError
    from tasks.sources.synth import fonts_for

    try:
        fonts_for(cfg.source.synth)
    except (FontError, SourceError) as exc:
        raise ConfigError(str(exc)) from exc
    return run(SOURCE, out, cfg, shards=synth_shards(cfg.source.synth), use_ray=use_ray, progress=progress)


def pass_rates(out: str | Path, storage: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per font and per layout: images rendered, kept (OCR read them), and the share kept."""
    import duckdb

    from tasks.stats import _source
    from tasks.storage import duckdb_setup, open_store

    store = open_store(out, storage)
    con = duckdb.connect()
    for statement in duckdb_setup(store, storage):
        con.execute(statement)
    kept, rejected = _source(store, "shards"), _source(store, "rejects")
    parts = [f"SELECT font, synth_layout, true AS ok FROM {kept}" if kept else None,
             f"SELECT font, synth_layout, false AS ok FROM {rejected}" if rejected else None]
    union = " UNION ALL ".join(p for p in parts if p)
    report: dict[str, dict[str, dict[str, float]]] = {}
    if not union:
        return report
    for by in ("font", "synth_layout"):
        rows = con.execute(f"SELECT coalesce({by}, '(not rendered)'), count(*), count(*) FILTER (WHERE ok) "
                           f"FROM ({union}) GROUP BY 1 ORDER BY 1").fetchall()
        report[by.removeprefix("synth_")] = {name: {"images": n, "kept": k, "pass_rate": round(k / n, 4)}
                                             for name, n, k in rows}
    return report
