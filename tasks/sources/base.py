"""A source is split into shards, the unit of work, of resume and of output naming.

Each reader streams one shard as Arrow record batches in ``INPUT_SCHEMA``; no reader
holds more than one batch of rows. Rows the reader cannot give whole carry
``source_error`` and are rejected downstream, so they are counted, not dropped.

A source is a local path or an object-store URL (``s3://bucket/prefix``). It is listed once
(``list_source``); a shard names its file by a string that any node can open again with the
run's ``storage:`` settings: the absolute local path, or the object's full URL. Credentials
come from the settings or the environment, never from a shard, a row or an error text.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa

from schemas.arrow import INPUT_SCHEMA
from schemas.config import DecodeConfig, StorageConfig
from tasks.storage import StorageError, is_remote, open_store

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
    path: str  # the shard file, or the folder root: an absolute local path or the object's URL
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
    """``shard_id_of`` the path below ``root`` (a file named as the source: its name)."""
    return shard_id_of(path.relative_to(root).as_posix() if path != root else path.name)


def shard_id_of(rel: str) -> str:
    """Readable and unique: the relative path with unsafe characters folded, plus a short
    hash of the exact relative path (two names that fold alike stay apart). No dots, so
    ``{id}.part*`` never matches another shard's files. Only the path below the source root
    counts, so the same layout gets the same ids on a local disk and on an object store."""
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


# -- where a source lives ---------------------------------------------------------------------

SHARD_SUFFIXES = {"webdataset": ".tar", "parquet": ".parquet"}
STREAM_BUFFER = 8 << 20  # an object store answers each read of a stream with a request: read 8 MiB at once


def is_image(rel: str) -> bool:
    return PurePosixPath(rel).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Listed:
    """A path below the source root whose suffix may matter. ``usable``: a regular file (or an
    object) for a .tar or .parquet; for an image also a symlink, even a broken one, so that an
    image that vanished leaves a reject rather than nothing."""

    rel: str
    usable: bool = True


@dataclass(frozen=True)
class Listing:
    """A source listed once: ``base`` (a local folder or a URL) and what lies below it."""

    base: str
    entries: tuple[Listed, ...]
    single: bool = False  # the source named one file: ``entries`` is just it

    def location(self, rel: str) -> str:
        """What a shard task opens ``rel`` by: an absolute path, or the object's URL."""
        return f"{self.base}/{rel}" if is_remote(self.base) else str(Path(self.base) / rel)

    def shard_files(self, kind: str) -> list[str]:
        """The files of one kind, in the order shards are listed (tars and Parquet files by
        path components, as ``sorted`` orders paths; images by their relative path)."""
        if self.single:
            return [e.rel for e in self.entries]
        if kind == "folder":
            return sorted(e.rel for e in self.entries if e.usable and is_image(e.rel))
        suffix = SHARD_SUFFIXES[kind]
        return sorted((e.rel for e in self.entries if e.usable and e.rel.endswith(suffix)),
                      key=lambda rel: rel.split("/"))

    def kind(self) -> str:
        """A .tar anywhere below wins (img2dataset writes sidecar .parquet beside its tars),
        then .parquet, then loose images."""
        if self.single:
            suffix = PurePosixPath(self.entries[0].rel).suffix.lower()
            for kind, wanted in SHARD_SUFFIXES.items():
                if suffix == wanted:
                    return kind
            raise SourceError(f"{self.location(self.entries[0].rel)}: a source file must be .tar or .parquet")
        for kind, suffix in SHARD_SUFFIXES.items():
            if any(e.usable and e.rel.endswith(suffix) for e in self.entries):
                return kind
        if any(is_image(e.rel) for e in self.entries):
            return "folder"
        raise SourceError(f"{self.base}: no .tar, .parquet or image files found")


def list_source(source: str | Path, storage: StorageConfig | None = None) -> Listing:
    """The source's files, from one listing; a source that cannot be read at all (missing path,
    prefix or bucket, wrong credentials) is a ``SourceError`` naming it, before any work."""
    if is_remote(source):
        return _list_remote(str(source), storage)
    root = Path(source).resolve()  # shard tasks may run elsewhere (other nodes, other working directories)
    if not root.exists():
        raise SourceError(f"source not found: {root}")
    if root.is_file():
        return Listing(str(root.parent), (Listed(root.name),), single=True)
    # a directory named x.tar is not a tar; a broken symlink named x.jpg is an image that vanished
    entries = tuple(Listed(p.relative_to(root).as_posix(), p.is_file() or (is_image(p.name) and p.is_symlink()))
                    for p in root.rglob("*") if _may_matter(p.name))
    return Listing(str(root), entries)


def _may_matter(name: str) -> bool:
    """Only these are kept from a listing (captions are looked up when a chunk is read)."""
    return name.endswith(tuple(SHARD_SUFFIXES.values())) or is_image(name)


def _list_remote(url: str, storage: StorageConfig | None) -> Listing:
    try:
        store = open_store(url, storage)
        store.check()  # a missing bucket or wrong keys: said here, with the store's own words
    except StorageError as exc:
        raise SourceError(f"source unreadable: {exc}") from None
    try:
        if store.info("") is not None:  # the URL names one object
            base, _, name = store.url().rpartition("/")
            return Listing(base, (Listed(name),), single=True)
        found = store.list("", recursive=True)
    except OSError as exc:
        raise SourceError(f"source {store.url()}: cannot list it: {first_line(exc)}") from None
    if not found:
        raise SourceError(f"source not found: {store.url()} (no object of that name, none below it)")
    return Listing(store.url(), tuple(Listed(e.rel) for e in found if _may_matter(e.rel)))


def first_line(exc: BaseException) -> str:
    """An error's text for a message (the store's errors carry no credentials)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def open_stream(location: str, storage: StorageConfig | None = None) -> IO[bytes]:
    """Sequential reads of a shard's file (a tar, streamed): the local file, or the object
    through a buffer (each read of a bare object stream is one request)."""
    if not is_remote(location):
        return open(location, "rb")
    return pa.BufferedInputStream(open_store(location, storage).open_input_stream(""), STREAM_BUFFER)


@contextmanager
def random_access(location: str, storage: StorageConfig | None = None) -> Iterator[str | pa.NativeFile]:
    """What ``pq.ParquetFile`` opens: a local path as it is (pyarrow opens it), or the object
    as a random-access file (the footer, then the row groups asked for), closed afterwards."""
    if not is_remote(location):
        yield location
        return
    with open_store(location, storage).open_input_file("") as fh:
        yield fh


def stat(location: str, storage: StorageConfig | None = None) -> tuple[int, int]:
    """(size, mtime_ns) of a shard's file; ``OSError`` if it is gone or cannot be asked about."""
    if not is_remote(location):
        st = Path(location).stat()
        return st.st_size, st.st_mtime_ns
    found = open_store(location, storage).info("")
    if found is None:
        raise FileNotFoundError(f"no such object: {location}")
    return found.size, found.mtime_ns
