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

Every other column is the row's ``meta``, so what the table knew about a row (img2dataset's
``url``, ``original_width``, ``original_height``, ``status``, ``error_message``, ``sha256``,
``exif``, its ``--save_additional_columns``, or any other table's columns) is not lost: a JSON
object, column name to value, keys in the file's column order, read with the same batch as the
image (no second pass). A file with no other column has ``meta`` null. Binary columns (and
columns with binary inside, such as a second Hugging Face image) are left out of ``meta``, decided
from the schema so every row of a file has the same keys: they are image-sized payloads, and
rejects carry ``meta`` but never image bytes. String columns are copied as they are (img2dataset's
``exif`` stays its JSON text); dates and times are ISO text, decimals their digits, and NaN or an
infinity the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, so ``meta`` is strict JSON that
DuckDB's ``json`` functions read.

A row with no image bytes is a ``missing_image`` reject. When the file has img2dataset's
``status`` column and the row's status is not ``success``, the error says so in img2dataset's own
words: ``missing_image: img2dataset status failed_to_download: HTTP Error 404: Not Found`` (the
``error_message`` after the colon, when there is one), not a bare "no bytes".
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from decimal import Decimal
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
_BINARY_TYPES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view,
                 pa.types.is_fixed_size_binary)
STATUS_COLUMN, ERROR_MESSAGE_COLUMN = "status", "error_message"  # img2dataset's names


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


def _has_binary(kind: pa.DataType) -> bool:
    """Whether a column of this type can hold bytes, at any depth (a struct field, list items,
    dictionary values, map keys or items)."""
    if any(is_type(kind) for is_type in _BINARY_TYPES):
        return True
    if pa.types.is_dictionary(kind):
        return _has_binary(kind.value_type)
    if isinstance(kind, pa.ExtensionType):
        return _has_binary(kind.storage_type)
    return any(_has_binary(kind.field(i).type) for i in range(kind.num_fields))


def meta_columns(schema: pa.Schema, cfg: SourceConfig) -> list[str]:
    """The columns that make up ``meta``, in the file's order: all but the image, the caption,
    the key and binary ones (see the module docstring for why those are left out)."""
    taken = {cfg.image_column, cfg.caption_column, cfg.key_column}
    return [field.name for field in schema if field.name not in taken and not _has_binary(field.type)]


def _json_value(value: object) -> object:
    """A value from ``to_pylist`` as strict JSON: non-finite floats as text, map entries
    (key, value) pairs as lists; dates, times, decimals and the like as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)  # timedelta, anything else Arrow gives: its text, never a failed row


def _meta(row: dict) -> str:
    return json.dumps({name: _json_value(value) for name, value in row.items()}, ensure_ascii=False,
                      allow_nan=False)


def _missing_image(column: str, fields: dict) -> str:
    """The reject's error for a row without image bytes: img2dataset's status and message when
    the row has them (why it failed to download is the useful part), else where bytes were
    looked for."""
    status, message = fields.get(STATUS_COLUMN), fields.get(ERROR_MESSAGE_COLUMN)
    if isinstance(status, str) and status and status != "success":
        detail = f"img2dataset status {printable(status)}"
        if isinstance(message, str) and message:
            detail += f": {printable(message)}"
        return f"{MISSING_IMAGE}: {detail}"
    return f"{MISSING_IMAGE}: no bytes in column {column!r}"


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
    extra = meta_columns(file.schema_arrow, cfg)
    columns = [cfg.image_column, cfg.caption_column] + ([cfg.key_column] if has_key else []) + extra
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
            metas = batch.select(extra).to_pylist() if extra else [None] * len(images)
            for image, raw, key, fields in zip(images, captions, keys, metas, strict=True):
                row_key = str(key) if key not in (None, "") else f"{prefix}/{index}"
                data = _image_bytes(image)
                caption, error = (raw, None) if not isinstance(raw, bytes) else decode_caption(raw)
                if data is None:
                    error = _missing_image(cfg.image_column, fields or {})
                elif len(data) > max_member_bytes:
                    data, error = None, too_large(len(data), max_member_bytes, row_key)
                meta = _meta(fields) if fields is not None else None
                if out := builder.add(row_key, source, data, caption, error, meta):
                    yield out
                index += 1
        start += file.metadata.row_group(group).num_rows
    yield from drain(builder)
