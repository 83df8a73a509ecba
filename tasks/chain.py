"""The cascade over one record batch: decode once, signals cheap to expensive, rules after
each signal, so an image rejected early never pays for the later signals.

``Chain.score_batch`` is the one stage function the runner, the Prefect flow and the
benchmark all call: an input batch in, a kept batch and a reject batch out.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from schemas.arrow import kept_schema, reject_schema
from schemas.config import CurateConfig
from tasks.actors import ErrorRate, ItemError, ModelFailing, Pools, infer_on_pool
from tasks.alloc import keep_large_allocations
from tasks.buckets import BucketAssigner
from tasks.decode import DecodeError, ImageSample, describe, stable_text
from tasks.rules import first_failure
from tasks.signals import Sample, Signal, build_signals

log = logging.getLogger(__name__)

# Decoding at this short side still runs the whole entropy decoder (so truncation is
# caught) at 1/8 of the IDCT work, for configs whose signals read no pixels at all.
VERIFY_SIDE = 64

class SignalFailing(ModelFailing):
    """A signal failed on most rows of a shard: a broken model or setup, not bad rows. The
    run stops, rather than turning a whole pool into ``signal_error_*`` rejects."""


@dataclass
class _Row:
    """A sample plus everything known about it so far."""

    key: str
    source: str
    caption: str | None
    meta: str | None
    data: bytes | None
    values: dict[str, Any] = field(default_factory=dict)
    sample: Sample | None = None
    reason: str | None = None
    error: str | None = None

    def reject(self, reason: str, error: str | None) -> None:
        """Every error text passes here (source, decode, rule, signal, pool), so this one place
        keeps memory addresses out of rejects: two runs over the same data write equal rows."""
        self.reason, self.error = reason, None if error is None else stable_text(error)


@dataclass
class BatchResult:
    kept: pa.RecordBatch
    rejects: pa.RecordBatch
    decodes: int


class Chain:
    """Signals, rules and buckets built once per worker from the config."""

    def __init__(self, cfg: CurateConfig, pools: Pools | None = None, skip: frozenset[str] = frozenset()):
        """``pools``: actor handles per model signal (else models run here); ``skip``:
        signals left empty because they cannot run here (their columns stay, null)."""
        keep_large_allocations()  # per-image temporaries reuse the heap (tasks/alloc.py)
        self.cfg = cfg
        self.pools = pools or {}
        Image.MAX_IMAGE_PIXELS = cfg.decode.max_pixels  # Pillow's own check, behind ours
        self.signals: list[Signal] = build_signals(cfg.signals)
        self.active = [s for s in self.signals if s.name not in skip]
        sides = [s for s in (sig.pixel_side() for sig in self.active) if s is not None]
        self.decode_side = max(sides, default=VERIFY_SIDE)
        self.color = any(sig.color for sig in self.active if sig.pixel_side() is not None)
        self.signal_fields = [f for sig in self.signals for f in sig.fields]
        self.kept_schema = kept_schema(self.signal_fields)
        self._kept_rest_schema = pa.schema([f for f in self.kept_schema if f.name != "image"])
        self.reject_schema = reject_schema(self.signal_fields)
        self.buckets = BucketAssigner(cfg.buckets)
        self._rules_for = {
            sig.name: {c: b for c, b in cfg.rules.items() if c in sig.columns()} for sig in self.signals
        }
        self.errors = ErrorRate("signal", "shard", SignalFailing)  # per signal, over the whole shard
        # Where the time goes: CPU seconds of this process per step ("decode", then each signal:
        # its views, preparation and, without a pool, its model) and the rows that reached it.
        # Cheap to keep (two clock reads a step and batch); the bench reads it per row.
        self.core_s: Counter[str] = Counter()
        self.rows_in: Counter[str] = Counter()

    def _open(self, row: _Row) -> None:
        if row.reason:
            return
        try:
            image = ImageSample(
                row.data,
                max_pixels=self.cfg.decode.max_pixels,
                max_file_bytes=self.cfg.decode.max_file_bytes,
                decode_side=self.decode_side,
                color=self.color,
            )
            row.sample = Sample(row.key, row.caption, image, row.meta, row.values)  # the same dict, as it fills
        except DecodeError as exc:
            row.reject(exc.reason, exc.detail)
        except Exception as exc:
            row.reject("undecodable", describe(exc))

    def _run_signal(self, signal: Signal, rows: list[_Row]) -> None:
        live = [r for r in rows if not r.reason]
        self.rows_in[signal.name] += len(live)
        started = time.process_time()
        if signal.pixel_side() is not None:
            for r in live:  # decode (once) before the signal, so a bad image is a reject; the
                try:  # signal makes the view it reads (grey or RGB) itself
                    r.sample.image.load()
                except DecodeError as exc:
                    r.reject(exc.reason, exc.detail)
            live = [r for r in live if not r.reason]
            self.core_s["decode"] += time.process_time() - started
            started = time.process_time()
        if not live:
            return
        if signal.name in self.pools:
            live, results = self._on_pool(signal, live)
        else:
            try:
                results = signal.compute_batch([r.sample for r in live])
            except Exception:  # isolate the sample that breaks the batch
                log.warning("signal %s failed on a batch; retrying one by one", signal.name, exc_info=True)
                results = [self._one(signal, r) for r in live]
        self.core_s[signal.name] += time.process_time() - started
        rules = self._rules_for[signal.name]
        self.errors.tried[signal.name] += len(live)
        for r, values in zip(live, results, strict=True):
            if isinstance(values, ItemError):
                self._signal_error(signal.name, r, values.error)
                continue
            r.values.update(values)
            verdict = first_failure(values, rules)
            if verdict is not None:
                r.reject(verdict.reason, verdict.detail)

    def _signal_error(self, name: str, row: _Row, error: str) -> None:
        self.errors.fail(name, error)
        row.reject(f"signal_error_{name}", error)

    def _on_pool(self, signal: Signal, live: list[_Row]) -> tuple[list[_Row], list[dict[str, Any] | ItemError]]:
        """Prepare here (the decode stays in this task), infer on the signal's actors. A row
        whose preparation fails counts as the signal failing on it."""
        prepared, rows = [], []
        for r in live:
            try:
                prepared.append(signal.prepare(r.sample))
                rows.append(r)
            except Exception as exc:
                self.errors.tried[signal.name] += 1
                self._signal_error(signal.name, r, describe(exc))
        return rows, infer_on_pool(self.pools[signal.name], prepared, signal.params.batch_size)

    @staticmethod
    def _one(signal: Signal, row: _Row) -> dict[str, Any] | ItemError:
        try:
            return signal.compute(row.sample)
        except Exception as exc:
            return ItemError(describe(exc))

    def score_batch(self, batch: pa.RecordBatch, kept_keys: set[str]) -> BatchResult:
        rows = [_Row(d["key"], d["source"], d["caption"], d["meta"], d["image"]) for d in batch.to_pylist()]
        for row, err in zip(rows, batch.column("source_error").to_pylist(), strict=True):
            if err:
                reason, _, detail = err.partition(": ")
                row.reject(reason, detail or err)
        for row in rows:
            self._open(row)
        for signal in self.active:
            self._run_signal(signal, rows)
        for row in rows:  # a kept image must decode, even when no signal read its pixels
            if not row.reason:
                try:
                    row.sample.image.load()
                except DecodeError as exc:
                    row.reject(exc.reason, exc.detail)
        for row in rows:  # the first kept row of a key wins; tasks.dedupe does the same across shards
            if not row.reason:
                if row.key in kept_keys:
                    row.reject("duplicate_key", f"key {row.key!r} already kept from this source shard")
                kept_keys.add(row.key)
        decodes = sum(r.sample.image.decodes for r in rows if r.sample)
        self.errors.check(self.cfg.run.max_signal_error_fraction)
        return BatchResult(self._kept(batch, rows), self._rejects(rows), decodes)

    def _kept(self, batch: pa.RecordBatch, rows: list[_Row]) -> pa.RecordBatch:
        """The kept rows; their image bytes are taken from the input column in one copy (a
        Python list of them cost as much as a signal: 0.2 ms a row)."""
        out, keep = [], []
        for i, r in enumerate(rows):
            if r.reason:
                continue
            h = r.sample.image.header
            bw, bh = self.buckets.assign(h.width, h.height)
            keep.append(i)
            out.append({"key": r.key, "caption": r.caption, "source": r.source,
                        "meta": r.meta, "bucket_width": bw, "bucket_height": bh, **r.values})
        rest = pa.RecordBatch.from_pylist(out, schema=self._kept_rest_schema)
        images = batch.column("image").take(pa.array(keep, pa.int64())).cast(pa.binary())
        return pa.RecordBatch.from_arrays(
            [images if f.name == "image" else rest.column(f.name) for f in self.kept_schema], schema=self.kept_schema)

    def _rejects(self, rows: list[_Row]) -> pa.RecordBatch:
        """Caption and meta stay with a reject, so what was dropped can be read without joining
        back to the source; the image bytes do not, as rejects are for reading, not training."""
        out = [{"key": r.key, "source": r.source, "reason": r.reason, "error": r.error, "caption": r.caption,
                "meta": r.meta, **r.values}
               for r in rows if r.reason]
        return pa.RecordBatch.from_pylist(out, schema=self.reject_schema)
