"""A folder of images with same-name ``.txt`` captions (``a/b.jpg`` + ``a/b.txt``).

The sorted listing is cut into chunks of ``folder_chunk`` images; each chunk is a shard.
The key is the path relative to the folder without its extension, made printable
(``\\xNN``) when the name is not UTF-8. Sizes are checked before a file is read, so an
oversized image is a ``file_too_large`` reject that never enters memory. A symlink whose
target is gone is still listed, so an image that vanished leaves a reject, not nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from schemas.config import SourceConfig
from tasks.sources.base import (
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_EXTENSIONS,
    MISSING_IMAGE,
    UNREADABLE,
    BatchBuilder,
    SourceShard,
    decode_caption,
    drain,
    printable,
    too_large,
)


def list_images(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


def discover(root: Path, cfg: SourceConfig) -> list[SourceShard]:
    images = list_images(root)
    size = cfg.folder_chunk
    return [
        SourceShard(f"folder-{i // size:06d}", "folder", str(root), tuple(images[i : i + size]))
        for i in range(0, len(images), size)
    ]


def _read_limited(path: Path, limit: int) -> tuple[bytes | None, str | None]:
    """(bytes, error): the size is checked before the read."""
    size = path.stat().st_size
    if size > limit:
        return None, too_large(size, limit, path.name)
    return path.read_bytes(), None


def _sample(path: Path, rel: str, limit: int) -> tuple[bytes | None, str | None, str | None]:
    """(image, caption, error) of one listed image."""
    if path.is_symlink() and not path.exists():
        return None, None, f"{MISSING_IMAGE}: {printable(rel)} is a symlink to a missing file"
    caption_path = path.with_suffix(".txt")
    try:
        image, error = _read_limited(path, limit)
        raw, caption_error = _read_limited(caption_path, limit) if caption_path.is_file() else (None, None)
    except OSError as exc:
        return None, None, f"{UNREADABLE}: cannot read {printable(rel)}: {printable(str(exc))}"
    caption, utf8_error = decode_caption(raw)
    return image, caption, error or caption_error or utf8_error


def read(shard: SourceShard, cfg: SourceConfig,
         max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    root = Path(shard.path)
    for rel in shard.members:
        path = root / rel
        image, caption, error = _sample(path, rel, max_member_bytes)
        key = printable(rel.rsplit(".", 1)[0])
        if out := builder.add(key, printable(str(path)), image, caption, error):
            yield out
    yield from drain(builder)
