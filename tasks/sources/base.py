"""A source is split into shards, the unit of work, of resume and of output naming.

Each reader streams one shard as Arrow record batches in ``INPUT_SCHEMA``; no reader
holds more than one batch of rows. Rows the reader cannot give whole carry
``source_error`` and are rejected downstream, so they are counted, not dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.arrow import INPUT_SCHEMA
from schemas.config import DecodeConfig

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})


class SourceError(ValueError):
    """The source cannot be read at all (missing path, wrong columns); raised before work starts."""


class UnreadableSource(RuntimeError):
    """A shard that breaks part-way, with ``source.unreadable: fail``: the shard fails."""


# A row's ``source_error`` is "reason: detail"; the reason becomes the reject reason.
MISSING_IMAGE = "missing_image"
UNREADABLE = "source_unreadable"


@dataclass(frozen=True)
class SourceShard:
    """One unit of work. ``shard_id`` is stable across runs and safe in file names."""

    shard_id: str
    kind: str  # webdataset | parquet | folder
    path: str  # the shard file, or the folder root
    members: tuple[str, ...] = field(default=(), repr=False)  # folder: relative image paths


UNREADABLE_SUFFIX = "/__unreadable_rest__"
FILE_TOO_LARGE = "file_too_large"  # the reason tasks.decode gives for the same limit
DEFAULT_MAX_MEMBER_BYTES: int = DecodeConfig.model_fields["max_file_bytes"].default


def printable(name: str) -> str:
    """A file name as valid UTF-8: undecodable bytes (surrogates from the file system or
    tarfile) become ``\\xNN``, so the name can be a key or a ``source`` in Arrow."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def too_large(size: int, limit: int, name: str) -> str:
    """Error text for a member or file over ``decode.max_file_bytes``, found before reading it."""
    return f"{FILE_TOO_LARGE}: {size} bytes > max_file_bytes {limit} ({printable(name)})"


def shard_id_for(root: Path, path: Path) -> str:
    """Readable and unique: the relative path with unsafe characters folded, plus a short
    hash of the exact relative path (two names that fold alike stay apart). No dots, so
    ``{id}.part*`` never matches another shard's files."""
    rel = path.relative_to(root).as_posix() if path != root else path.name
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", rel.rsplit(".", 1)[0])[-60:]
    # surrogateescape: a file name that is not UTF-8 (Latin-1 from an old archive) still hashes.
    return f"{stem}-{hashlib.sha1(rel.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


class BatchBuilder:
    """Collects input rows and hands out full record batches."""

    def __init__(self, batch_rows: int):
        self.batch_rows = batch_rows
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        key: str,
        source: str,
        image: bytes | None = None,
        caption: str | None = None,
        source_error: str | None = None,
        meta: str | None = None,
    ) -> pa.RecordBatch | None:
        self.rows.append(
            {"key": key, "image": image, "caption": caption, "source": source,
             "source_error": source_error, "meta": meta}
        )
        return self.flush() if len(self.rows) >= self.batch_rows else None

    def flush(self) -> pa.RecordBatch | None:
        if not self.rows:
            return None
        batch = pa.RecordBatch.from_pylist(self.rows, schema=INPUT_SCHEMA)
        self.rows = []
        return batch


def decode_caption(raw: bytes | None) -> tuple[str | None, str | None]:
    """(caption, error): invalid UTF-8 is an error, never silently replaced."""
    if raw is None:
        return None, None
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"caption_not_utf8: {exc}"


def drain(builder: BatchBuilder) -> Iterator[pa.RecordBatch]:
    batch = builder.flush()
    if batch is not None:
        yield batch
