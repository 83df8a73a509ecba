"""Source detection: ``--source PATH`` (or ``s3://bucket/prefix``) becomes a list of shards and a
reader for them. Local and remote sources share each reader; only the opening of a file differs
(tasks/sources/base.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.config import SourceConfig, StorageConfig
from tasks.sources import folder, parquet, webdataset
from tasks.sources.base import DEFAULT_MAX_MEMBER_BYTES, SourceError, SourceShard, list_source, stat

__all__ = ["SourceError", "SourceShard", "detect_kind", "discover", "fingerprint", "read_shard"]

_READERS: dict[str, Callable[[SourceShard, SourceConfig, int, StorageConfig | None], Iterator[pa.RecordBatch]]] = {
    "webdataset": webdataset.read,
    "parquet": parquet.read,
    "folder": folder.read,
}


def detect_kind(source: str | Path, storage: StorageConfig | None = None) -> str:
    """A .tar anywhere below wins (img2dataset writes sidecar .parquet beside its tars),
    then .parquet, then loose images."""
    return list_source(source, storage).kind()


def discover(source: str | Path, cfg: SourceConfig, storage: StorageConfig | None = None) -> list[SourceShard]:
    """The source's shards, from one listing; ``SourceError`` before any work if it cannot be read."""
    listing = list_source(source, storage)
    kind = listing.kind()
    if kind == "webdataset":
        return webdataset.discover(listing)
    if kind == "parquet":
        return parquet.discover(listing, cfg, storage)
    return folder.discover(listing, cfg)


def read_shard(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one source shard; members over ``max_member_bytes`` are never read."""
    return _READERS[shard.kind](shard, cfg, max_member_bytes, storage)


def fingerprint(shard: SourceShard, storage: StorageConfig | None = None) -> dict[str, Any]:
    """What tells that a source shard changed: its file's size and modification time (for a
    folder chunk, a digest of every member's and caption's). Recorded in the manifest when the
    shard is done, compared again after reading it and on every later run. On an object store
    the times come from the listing (whole seconds on S3)."""
    if shard.kind == "folder":
        return folder.fingerprint(shard, storage)
    size, mtime_ns = stat(shard.path, storage)
    return {"size": size, "mtime_ns": mtime_ns}
