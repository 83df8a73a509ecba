"""Parquet files with an image-bytes column and a caption column (img2dataset's parquet
output, or any table); column names come from the config.

Read one row group at a time, batch by batch, so a corrupt row group costs only its own
rows: with ``source.unreadable: salvage`` each of them becomes a ``source_unreadable``
reject (the row count is in the footer) and reading goes on with the next group; with
``fail`` the shard fails. Captions must be a string or binary column; binary captions
are decoded as UTF-8 like a tar's ``.txt``, anything else is refused before work starts.

Without a key column, the key is the file's path below the source root, without
``.parquet``, plus the row index (``year=2023/part-0/17``): files of the same name in
different folders keep apart. Discovery records that path in ``SourceShard.members``.

On an object store the file is opened for random access: discovery reads only footers (a few
files at once), a reader fetches the row groups one by one, never the whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import SourceConfig, StorageConfig
from tasks.sources.base import (
    DEFAULT_MAX_MEMBER_BYTES,
    MISSING_IMAGE,
    UNREADABLE,
    UNREADABLE_SUFFIX,
    BatchBuilder,
    Listing,
    SourceError,
    SourceShard,
    UnreadableSource,
    decode_caption,
    drain,
    printable,
    random_access,
    shard_id_of,
    too_large,
)
from tasks.storage import is_remote

_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
               pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_null)
_READ_ERRORS = (OSError, pa.ArrowException)


def discover(listing: Listing, cfg: SourceConfig, storage: StorageConfig | None = None) -> list[SourceShard]:
    shards = [SourceShard(shard_id_of(rel), "parquet", listing.location(rel), (rel,))
              for rel in listing.shard_files("parquet")]
    # Footers over the network: a few at once; the first bad file in order is the one reported.
    with ThreadPoolExecutor(8 if is_remote(listing.base) else 1) as pool:
        list(pool.map(lambda shard: _check_columns(shard.path, cfg, storage), shards))
    return shards


def _check_columns(location: str, cfg: SourceConfig, storage: StorageConfig | None) -> None:
    try:
        with random_access(location, storage) as file:
            schema = pq.read_schema(file)
    except Exception as exc:
        raise SourceError(f"{location}: not a readable Parquet file: {exc}") from exc
    _check_schema(location, schema, cfg)


def _check_schema(path: str, schema: pa.Schema, cfg: SourceConfig) -> None:
    names = schema.names
    for setting, column in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if column not in names:
            raise SourceError(
                f"{path} has no column {column!r}; set source.{setting} (columns: {', '.join(names)})"
            )
    kind = schema.field(cfg.caption_column).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not any(is_type(value) for is_type in _TEXT_TYPES):
        raise SourceError(f"{path}: caption column {cfg.caption_column!r} has type {kind}; captions must be "
                          "a string or binary (UTF-8) column, set source.caption_column to one")


def _image_bytes(value: object) -> bytes | None:
    """Plain binary, or Hugging Face's Image struct {bytes, path}."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) else None


def _key_prefix(shard: SourceShard) -> str:
    rel = shard.members[0] if shard.members else PurePosixPath(shard.path).name
    return printable(PurePosixPath(rel).with_suffix("").as_posix())


def _batches(file: pq.ParquetFile, group: int, columns: list[str],
             batch_rows: int) -> Iterator[pa.RecordBatch | Exception]:
    """One row group's batches; a read error ends them as a last item rather than being
    raised, so it is never mistaken for an error of the caller's own code."""
    try:
        yield from file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
    except _READ_ERRORS as exc:
        yield exc


def read(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
         storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    with ExitStack() as stack:  # a remote file is closed when the reader ends, however it ends
        yield from _read(shard, cfg, max_member_bytes, storage, stack)


def _read(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int, storage: StorageConfig | None,
          stack: ExitStack) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    source, prefix = printable(shard.path), _key_prefix(shard)

    def broken(where: str, exc: Exception) -> str:
        message = printable(f"{where} unreadable: {type(exc).__name__}: {exc}")
        if cfg.unreadable == "fail":
            raise UnreadableSource(f"{source}: {message}") from exc
        return f"{UNREADABLE}: {message}"

    try:
        file = pq.ParquetFile(stack.enter_context(random_access(shard.path, storage)),
                              page_checksum_verification=True)
    except _READ_ERRORS as exc:
        builder.add(f"{shard.shard_id}{UNREADABLE_SUFFIX}", source, source_error=broken("file", exc))
        yield from drain(builder)
        return
    _check_schema(source, file.schema_arrow, cfg)
    has_key = cfg.key_column in file.schema_arrow.names
    columns = [cfg.image_column, cfg.caption_column] + ([cfg.key_column] if has_key else [])
    start = 0  # row index of the group's first row in the file
    for group in range(file.num_row_groups):
        index = start
        for batch in _batches(file, group, columns, cfg.batch_rows):
            if isinstance(batch, Exception):  # the group's rows not given yet are rejected
                rows = file.metadata.row_group(group).num_rows
                error = broken(f"row group {group} ({index - start} of its {rows} rows read before)", batch)
                for i in range(index, start + rows):
                    if out := builder.add(f"{prefix}/{i}", source, source_error=error):
                        yield out
                break
            images = batch.column(cfg.image_column).to_pylist()
            captions = batch.column(cfg.caption_column).to_pylist()
            keys = batch.column(cfg.key_column).to_pylist() if has_key else [None] * len(images)
            for image, raw, key in zip(images, captions, keys, strict=True):
                row_key = str(key) if key not in (None, "") else f"{prefix}/{index}"
                data = _image_bytes(image)
                caption, error = (raw, None) if not isinstance(raw, bytes) else decode_caption(raw)
                if data is None:
                    error = f"{MISSING_IMAGE}: no bytes in column {cfg.image_column!r}"
                elif len(data) > max_member_bytes:
                    data, error = None, too_large(len(data), max_member_bytes, row_key)
                if out := builder.add(row_key, source, data, caption, error):
                    yield out
                index += 1
        start += file.metadata.row_group(group).num_rows
    yield from drain(builder)
