"""One source shard, start to finish: read, score, write parts, publish, record as done.

This is the unit a Ray task (and, above it, a Prefect task) runs. It passes paths in and
small counts out; the rows never leave the worker.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from schemas.config import CurateConfig
from tasks.actors import Pools
from tasks.attempts import Attempt, clear_partial
from tasks.chain import Chain
from tasks.parts import PartWriter
from tasks.sources import SourceShard, fingerprint, read_shard
from tasks.storage import Store, as_store
from tasks.storage_retry import retries_counted

log = logging.getLogger(__name__)


class SourceChanged(RuntimeError):
    """The shard's file changed while it was read (still being written, say): its rows may be
    incomplete, so it is not recorded as done; a retry or a later run reads it again."""


@dataclass
class ShardResult:
    shard_id: str
    source: str
    kept: int = 0
    rejected: int = 0
    decodes: int = 0
    seconds: float = 0.0
    started_at: float = 0.0  # Unix time: for straggler and overlap analysis
    node: str = ""  # the Ray node that ran it ("" outside Ray): where stragglers and failures sit
    reasons: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    fingerprint: dict = field(default_factory=dict)  # tasks.sources.fingerprint, when read
    storage_retries: int = 0  # storage calls tried again after a transient error, up to the commit

    @classmethod
    def from_entry(cls, entry: dict) -> ShardResult:
        """The result a manifest entry records (fields added since default)."""
        return cls(**{f.name: entry[f.name] for f in fields(cls) if f.name in entry})

    @property
    def rows(self) -> int:
        return self.kept + self.rejected

    def to_dict(self) -> dict:
        return asdict(self)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def process_shard(shard: SourceShard, cfg: CurateConfig, out: Store | str | Path, pools: Pools | None = None,
                  skip: frozenset[str] = frozenset()) -> ShardResult:
    """Curate one shard into ``out`` (a local path or an object-store URL). Safe to call again
    after a crash: it clears the leftovers of an earlier attempt first, and its manifest entry,
    written last, is the commit (tasks/shards.py)."""
    started, started_at = time.perf_counter(), time.time()
    store = as_store(out, cfg.storage)
    chain = Chain(cfg, pools, skip)
    clear_partial(store, shard.shard_id)
    attempt = Attempt(store, shard.shard_id, ttl_s=cfg.run.attempt_ttl_s)
    writers = {
        kind: PartWriter(store, kind, shard.shard_id, schema, cfg.output.max_rows_per_shard,
                         cfg.output.max_bytes_per_shard, cfg.output.row_group_rows, attempt=attempt,
                         keep_empty=kind == "rejects")
        for kind, schema in (("shards", chain.kept_schema), ("rejects", chain.reject_schema))
    }
    result = ShardResult(shard.shard_id, shard.path, started_at=round(started_at, 3), node=_node_id(),
                         fingerprint=fingerprint(shard, cfg.storage))
    reasons: Counter[str] = Counter()
    kept_keys: set[str] = set()
    with attempt.alive():
        try:
            for batch in read_shard(shard, cfg.source, cfg.decode.max_file_bytes, cfg.storage):
                scored = chain.score_batch(batch, kept_keys)
                writers["shards"].add(scored.kept)
                writers["rejects"].add(scored.rejects)
                reasons.update(scored.rejects.column("reason").to_pylist())
                result.decodes += scored.decodes
            for writer in writers.values():
                writer.flush()
            if fingerprint(shard, cfg.storage) != result.fingerprint:
                raise SourceChanged(f"{shard.path} changed while it was read; it is not recorded as done "
                                    "(read again by a retry or the next run)")
        except BaseException:
            for writer in writers.values():
                writer.abort()
            _discard(attempt)
            raise
        result.files = [f for writer in writers.values() for f in writer.files]
        result.kept = writers["shards"].count
        result.rejected = writers["rejects"].count
        result.reasons = dict(reasons)
        result.seconds = round(time.perf_counter() - started, 3)
        result.storage_retries = retries_counted()
        standing = attempt.commit(result.to_dict())  # the commit, unless another attempt's came first
    return result if standing.get("attempt") == attempt.token else ShardResult.from_entry(standing)


def _discard(attempt: Attempt) -> None:
    """A failed attempt removes what it wrote, so its retry finds nothing to wait out; if even that
    fails (the store unreachable), its record expires and a later attempt or sweep removes it."""
    try:
        attempt.discard()
    except Exception as exc:
        log.warning("could not remove the parts of failed attempt %s at %s: %s", attempt.token, attempt.shard_id, exc)
