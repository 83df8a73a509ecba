"""Parquet files with an image-bytes column and a caption column (img2dataset's parquet
output, or any table); column names come from the config. Read batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import SourceConfig
from tasks.sources.base import MISSING_IMAGE, BatchBuilder, SourceError, SourceShard, drain, shard_id_for


def discover(root: Path, cfg: SourceConfig) -> list[SourceShard]:
    files = sorted(root.rglob("*.parquet")) if root.is_dir() else [root]
    base = root if root.is_dir() else root.parent
    for path in files:
        _check_columns(path, cfg)
    return [SourceShard(shard_id_for(base, p), "parquet", str(p)) for p in files]


def _check_columns(path: Path, cfg: SourceConfig) -> None:
    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise SourceError(f"{path}: not a readable Parquet file: {exc}") from exc
    for setting, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if column not in names:
            raise SourceError(
                f"{path} has no column {column!r}; set source.{setting} (columns: {', '.join(names)})"
            )


def _image_bytes(value: object) -> bytes | None:
    """Plain binary, or Hugging Face's Image struct {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) else None


def read(shard: SourceShard, cfg: SourceConfig) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    path = Path(shard.path)
    prefix = path.stem
    file = pq.ParquetFile(path)
    has_key = cfg.key_column in file.schema_arrow.names
    columns = [cfg.image_column, cfg.caption_column] + ([cfg.key_column] if has_key else [])
    index = 0
    for batch in file.iter_batches(batch_size=cfg.batch_rows, columns=columns):
        images = batch.column(cfg.image_column).to_pylist()
        captions = batch.column(cfg.caption_column).to_pylist()
        keys = batch.column(cfg.key_column).to_pylist() if has_key else [None] * len(images)
        for image, caption, key in zip(images, captions, keys, strict=True):
            row_key = str(key) if key not in (None, "") else f"{prefix}/{index}"
            data = _image_bytes(image)
            error = None if data is not None else f"{MISSING_IMAGE}: no bytes in column {cfg.image_column!r}"
            text = caption if isinstance(caption, str) or caption is None else str(caption)
            if out := builder.add(row_key, shard.path, data, text, error):
                yield out
            index += 1
    yield from drain(builder)
