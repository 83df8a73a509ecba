"""Source detection: ``--source PATH`` (or ``s3://bucket/prefix``) becomes a list of shards and a
reader for them. Local and remote sources share each reader; only the opening of a file differs
(tasks/sources/base.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.config import SourceConfig, StorageConfig
from tasks.sources import folder, parquet, synth, webdataset
from tasks.sources.base import DEFAULT_MAX_MEMBER_BYTES, Listing, SourceError, SourceShard, list_source, stat

log = logging.getLogger(__name__)

__all__ = ["SourceError", "SourceShard", "detect_kind", "discover", "fingerprint", "read_shard"]

_READERS: dict[str, Callable[[SourceShard, SourceConfig, int, StorageConfig | None], Iterator[pa.RecordBatch]]] = {
    "webdataset": webdataset.read,
    "parquet": parquet.read,
    "folder": folder.read,
    "synth": synth.read,
}


def detect_kind(source: str | Path, storage: StorageConfig | None = None) -> str:
    """A .tar anywhere below wins (img2dataset writes sidecar .parquet beside its tars),
    then .parquet, then loose images."""
    return list_source(source, storage).kind()


def discover(source: str | Path, cfg: SourceConfig, storage: StorageConfig | None = None) -> list[SourceShard]:
    """The source's shards, from one listing; ``SourceError`` before any work if it cannot be read."""
    listing = list_source(source, storage)
    kind = listing.kind()
    _say_what_is_left_out(listing, kind)
    if kind == "webdataset":
        return webdataset.discover(listing)
    if kind == "parquet":
        return parquet.discover(listing, cfg, storage)
    return folder.discover(listing, cfg)


_KIND_NAMES = {"webdataset": ".tar files", "parquet": ".parquet files", "folder": "image files"}


def _say_what_is_left_out(listing: Listing, kind: str) -> None:
    """A source is read as one kind (tars, else Parquet, else loose images): files of the other
    kinds below it are left out, which a user mixing them should hear about. Parquet files beside
    tars are img2dataset's own sidecars (the same rows): named, but not as a warning."""
    if listing.single:
        return
    left = {other: len(listing.shard_files(other)) for other in _KIND_NAMES if other != kind}
    left = {other: n for other, n in left.items() if n}
    if not left:
        return
    taken = f"{len(listing.shard_files(kind))} {_KIND_NAMES[kind]}"
    dropped = " and ".join(f"{n} {_KIND_NAMES[other]}" for other, n in left.items())
    sidecars_only = kind == "webdataset" and set(left) == {"parquet"}
    (log.info if sidecars_only else log.warning)(
        "source %s: reading its %s as %s; left out %s below it (a source is read as one kind: tars, else "
        "Parquet, else loose images; point --source at the folder of the kind you want)",
        listing.base, taken, kind, dropped)


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
    if shard.kind == "synth":
        return synth.fingerprint(shard)
    size, mtime_ns = stat(shard.path, storage)
    return {"size": size, "mtime_ns": mtime_ns}
