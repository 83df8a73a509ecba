"""img2dataset's webdataset output: ``NNNNN.tar`` holding ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``.

The tar is streamed (``r|*``), members of one key arriving together as webdataset
writes them. A tar that breaks part-way yields the rows before the break and then one
row that records the break, so the shard's accounting says where it stopped.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from schemas.config import SourceConfig
from tasks.sources.base import (
    IMAGE_EXTENSIONS,
    MISSING_IMAGE,
    UNREADABLE,
    BatchBuilder,
    SourceShard,
    UnreadableSource,
    decode_caption,
    drain,
    shard_id_for,
)

UNREADABLE_SUFFIX = "/__unreadable_rest__"


def discover(root: Path) -> list[SourceShard]:
    tars = sorted(root.rglob("*.tar")) if root.is_dir() else [root]
    base = root if root.is_dir() else root.parent
    return [SourceShard(shard_id_for(base, p), "webdataset", str(p)) for p in tars]


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


class _Group:
    def __init__(self, key: str):
        self.key = key
        self.image: bytes | None = None
        self.caption_raw: bytes | None = None
        self.meta_raw: bytes | None = None


def _emit(builder: BatchBuilder, group: _Group, source: str) -> pa.RecordBatch | None:
    caption, error = decode_caption(group.caption_raw)
    if group.image is None:
        error = error or f"{MISSING_IMAGE}: no image member for this key"
    meta = group.meta_raw.decode("utf-8", "replace") if group.meta_raw else None
    return builder.add(group.key, source, group.image, caption, error, meta)


def read(shard: SourceShard, cfg: SourceConfig) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    group: _Group | None = None
    try:
        with tarfile.open(shard.path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split(member.name)
                if group is None or key != group.key:
                    if group is not None and (batch := _emit(builder, group, shard.path)):
                        yield batch
                    group = _Group(key)
                handle = tar.extractfile(member)
                data = handle.read() if handle else b""
                if ext in IMAGE_EXTENSIONS and group.image is None:
                    group.image = data
                elif ext in ("txt", "caption"):
                    group.caption_raw = data
                elif ext == "json":
                    group.meta_raw = data
        if group is not None and (batch := _emit(builder, group, shard.path)):
            yield batch
    except (tarfile.TarError, OSError, EOFError) as exc:
        if cfg.unreadable == "fail":
            raise UnreadableSource(f"{shard.path}: tar unreadable after "
                                   f"{group.key if group else 'the start'}: {type(exc).__name__}: {exc}") from exc
        # The group in progress may be incomplete: it is part of what could not be read.
        builder.add(
            key=f"{shard.shard_id}{UNREADABLE_SUFFIX}",
            source=shard.path,
            source_error=f"{UNREADABLE}: tar unreadable after {group.key if group else 'the start'}: "
            f"{type(exc).__name__}: {exc}",
        )
    yield from drain(builder)
