"""Source detection: ``--source PATH`` becomes a list of shards and a reader for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from schemas.config import SourceConfig
from tasks.sources import folder, parquet, webdataset
from tasks.sources.base import DEFAULT_MAX_MEMBER_BYTES, IMAGE_EXTENSIONS, SourceError, SourceShard

__all__ = ["SourceError", "SourceShard", "detect_kind", "discover", "read_shard"]

_READERS: dict[str, Callable[[SourceShard, SourceConfig, int], Iterator[pa.RecordBatch]]] = {
    "webdataset": webdataset.read,
    "parquet": parquet.read,
    "folder": folder.read,
}


def detect_kind(root: Path) -> str:
    """A .tar anywhere below wins (img2dataset writes sidecar .parquet beside its tars),
    then .parquet, then loose images."""
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".tar":
            return "webdataset"
        if suffix == ".parquet":
            return "parquet"
        raise SourceError(f"{root}: a source file must be .tar or .parquet")
    if any(p.is_file() for p in root.rglob("*.tar")):  # a directory named x.tar is not a tar
        return "webdataset"
    if any(p.is_file() for p in root.rglob("*.parquet")):
        return "parquet"
    if any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in root.rglob("*")):
        return "folder"
    raise SourceError(f"{root}: no .tar, .parquet or image files found")


def discover(source: str | Path, cfg: SourceConfig) -> list[SourceShard]:
    root = Path(source)
    if not root.exists():
        raise SourceError(f"source not found: {root}")
    kind = detect_kind(root)
    if kind == "webdataset":
        return webdataset.discover(root)
    if kind == "parquet":
        return parquet.discover(root, cfg)
    return folder.discover(root, cfg)


def read_shard(shard: SourceShard, cfg: SourceConfig,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[pa.RecordBatch]:
    """Record batches of one source shard; members over ``max_member_bytes`` are never read."""
    return _READERS[shard.kind](shard, cfg, max_member_bytes)
