"""A folder of images with same-name ``.txt`` captions (``a/b.jpg`` + ``a/b.txt``).

The sorted listing is cut into chunks of ``folder_chunk`` images; each chunk is a shard.
The key is the path relative to the folder without its extension.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from schemas.config import SourceConfig
from tasks.sources.base import IMAGE_EXTENSIONS, UNREADABLE, BatchBuilder, SourceShard, decode_caption, drain


def list_images(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    )


def discover(root: Path, cfg: SourceConfig) -> list[SourceShard]:
    images = list_images(root)
    size = cfg.folder_chunk
    return [
        SourceShard(f"folder-{i // size:06d}", "folder", str(root), tuple(images[i : i + size]))
        for i in range(0, len(images), size)
    ]


def read(shard: SourceShard, cfg: SourceConfig) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    root = Path(shard.path)
    for rel in shard.members:
        path = root / rel
        key = rel.rsplit(".", 1)[0]
        caption_path = path.with_suffix(".txt")
        try:
            image = path.read_bytes()
            raw = caption_path.read_bytes() if caption_path.is_file() else None
            caption, error = decode_caption(raw)
        except OSError as exc:
            image, caption, error = None, None, f"{UNREADABLE}: cannot read {rel}: {exc}"
        if out := builder.add(key, str(path), image, caption, error):
            yield out
    yield from drain(builder)
