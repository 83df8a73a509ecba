"""Source detection: ``--source PATH`` becomes a list of shards and a reader for them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.config import SourceConfig
from tasks.sources import folder, parquet, webdataset
from tasks.sources.base import DEFAULT_MAX_MEMBER_BYTES, IMAGE_EXTENSIONS, SourceError, SourceShard

__all__ = ["SourceError", "SourceShard", "detect_kind", "discover", "fingerprint", "read_shard"]

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
    root = Path(source).resolve()  # shard tasks may run elsewhere (other nodes, other working directories)
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


def fingerprint(shard: SourceShard) -> dict[str, Any]:
    """What tells that a source shard changed: its file's size and modification time (for a
    folder chunk, a digest of every member's and caption's). Recorded in the manifest when the
    shard is done, compared again after reading it and on every later run."""
    if shard.kind != "folder":
        st = os.stat(shard.path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.blake2b(digest_size=12)
    root = Path(shard.path)
    for rel in shard.members:
        image = root / rel
        for path in (image, image.with_suffix(".txt")):
            try:
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                digest.update(f"{path}\0absent\n".encode("utf-8", "surrogateescape"))
    return {"files": len(shard.members), "digest": digest.hexdigest()}
