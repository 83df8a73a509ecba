"""One filesystem layer for sources and outputs: local paths, ``s3://`` and ``gs://``.

A ``Store`` is a root (a local folder, or a bucket and prefix) on a ``pyarrow.fs`` filesystem;
code names files by their path below the root (``shards/x.part00000.parquet``). pyarrow's
filesystems stream (an input stream reads a tar member by member, a Parquet file fetches the row
groups asked for) and write objects by multipart upload, which an object store shows only when
the upload completes: a killed writer leaves no half object behind, only an upload the store's
lifecycle rule removes.

Object stores have no rename, so publishing cannot be "write beside, then rename" there:
``Store.renames`` tells callers which kind they have (see tasks/shards.py for how a shard is
published on each). Local writes keep their fsync-then-rename.

On an object store every call is tried again after transient errors (a refused or reset
connection, a timeout, HTTP 5xx, throttling) for up to ``storage.retry_s``, and every read of an
S3 file too: tasks/storage_retry.py.

Endpoint, region and credentials come from ``storage:`` in the config or, for what it leaves out,
from the standard variables (``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``/
``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE`` and ``~/.aws``). They are never part of a ``Store``'s text, so neither logs nor
the run's stamp can carry them.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.config import ConfigError, StorageConfig
from tasks.storage_retry import RetryingReads, retrying

T = TypeVar("T")

REMOTE_SCHEMES = ("s3", "gs")


class StorageError(ConfigError):
    """The store cannot be used at all (wrong credentials, no such bucket): found before any work."""


@dataclass(frozen=True)
class Entry:
    """A file below a store's root: its relative path, size and modification time."""

    rel: str
    size: int
    mtime_ns: int


def is_remote(location: str | Path) -> bool:
    return urllib.parse.urlsplit(str(location)).scheme in REMOTE_SCHEMES


class Store:
    """Files below one root. Relative paths use ``/`` on every filesystem."""

    renames = True  # os.replace is atomic here; object stores override

    def __init__(self, fs: pafs.FileSystem, root: str, url: str):
        self.fs, self.root, self.url_root = fs, root.rstrip("/"), url.rstrip("/")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url_root!r})"

    def __str__(self) -> str:
        return self.url_root

    # -- names ---------------------------------------------------------------------------------

    def path(self, rel: str = "") -> str:
        """The filesystem's own path (no scheme), for pyarrow calls."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """What users and DuckDB name the file by: a local path or ``s3://bucket/key``."""
        return f"{self.url_root}/{rel}" if rel else self.url_root

    def child(self, rel: str) -> Store:
        return type(self)(self.fs, self.path(rel), self.url(rel))

    # -- reading -------------------------------------------------------------------------------

    def _try(self, op: Callable[[], T], what: str) -> T:
        """``op()``; an object store tries it again after transient errors (tasks/storage_retry.py)."""
        return op()

    def info(self, rel: str) -> Entry | None:
        found = self._try(lambda: self.fs.get_file_info(self.path(rel)), f"looking up {self.url(rel)}")
        if found.type != pafs.FileType.File:
            return None
        return Entry(rel, found.size or 0, found.mtime_ns or 0)

    def exists(self, rel: str) -> bool:
        return self.info(rel) is not None

    def read_bytes(self, rel: str) -> bytes:
        def once() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()

        return self._try(once, f"reading {self.url(rel)}")

    def open_input_stream(self, rel: str) -> pa.NativeFile:
        """Sequential reads (a tar, streamed)."""
        return self._try(lambda: self.fs.open_input_stream(self.path(rel)), f"opening {self.url(rel)}")

    def open_input_file(self, rel: str) -> pa.NativeFile:
        """Random access (a Parquet file: footer, then the row groups asked for)."""
        return self._try(lambda: self.fs.open_input_file(self.path(rel)), f"opening {self.url(rel)}")

    def list(self, rel: str = "", suffix: str = "", recursive: bool = False) -> list[Entry]:
        """Files below ``rel`` (sorted by path); nothing if ``rel`` does not exist."""
        base = self.path(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        found = self._try(lambda: self.fs.get_file_info(selector), f"listing {self.url(rel)}")
        entries = [Entry(f.path[len(self.root) + 1:], f.size or 0, f.mtime_ns or 0) for f in found
                   if f.type == pafs.FileType.File and f.path.endswith(suffix)]
        return sorted(entries, key=lambda e: e.rel)

    # -- writing -------------------------------------------------------------------------------

    def write(self, rel: str, fill: Callable[[IO[bytes]], Any]) -> None:
        """``fill(fh)`` writes the file, which appears whole at ``rel`` or not at all. On an object
        store a write that fails for a transient error is done again from the start, so ``fill``
        must write from what it holds (not from a stream it consumes)."""
        def once() -> None:
            with self.writer(rel) as fh:
                fill(fh)

        self._try(once, f"writing {self.url(rel)}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """All or nothing: a reader sees the old file, the new one, or none."""
        self.write(rel, lambda fh: fh.write(data))

    def write_parquet(self, rel: str, table: pa.Table, row_group_rows: int) -> None:
        """An empty table is written with no row group at all: a row group of 0 rows makes some
        readers fail (Hugging Face datasets takes its batch size from the first group)."""
        def fill(fh: IO[bytes]) -> None:
            if table.num_rows:
                pq.write_table(table, fh, compression="zstd", row_group_size=row_group_rows)
            else:
                pq.ParquetWriter(fh, table.schema, compression="zstd").close()

        self.write(rel, fill)

    @contextmanager
    def writer(self, rel: str) -> Iterator[IO[bytes]]:
        """A file that appears whole at ``rel`` when the block ends, and not at all if it raises."""
        with self.fs.open_output_stream(self.path(rel)) as fh:
            yield fh

    def open_writer(self, rel: str) -> pa.NativeFile:
        """An output stream written in place (the object appears when it is closed). Only its
        opening is retried: an upload that fails part-way fails its unit, whose retry starts over."""
        return self._try(lambda: self.fs.open_output_stream(self.path(rel)), f"opening {self.url(rel)} to write")

    def delete(self, rel: str) -> None:
        with suppress(FileNotFoundError):  # a retry after a lost reply finds it gone: done too
            self._try(lambda: self.fs.delete_file(self.path(rel)), f"deleting {self.url(rel)}")

    def delete_tree(self, rel: str) -> None:
        """Every object below ``rel`` (an object store has no folders to remove)."""
        for entry in self.list(rel, recursive=True):
            self.delete(entry.rel)

    def replace(self, src: str, dst: str) -> None:
        """Put ``src`` at ``dst``: a rename here; on an object store a copy (the new ``dst`` appears
        whole) then a delete of ``src``, so a kill in between leaves both, never neither."""
        self._try(lambda: self.fs.move(self.path(src), self.path(dst)), f"moving {self.url(src)} to {dst}")

    def sync_dir(self, rel: str) -> None:
        """Make the renames in a folder durable (local only; object stores have no folders)."""

    def check(self) -> None:
        """Fail now, with a clear message, if the root cannot be listed (nothing written)."""

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist, atomically: False if it does."""
        raise NotImplementedError

    def age_s(self, rel: str) -> float | None:
        """Seconds since ``rel`` was last written, by the clock of whoever stamps its time (None:
        no file): what tells a live writer's heartbeat from a dead one's."""
        raise NotImplementedError


class LocalStore(Store):
    """A local folder: writes are fsynced and renamed into place."""

    def __init__(self, root: str | Path):
        root = str(Path(root).resolve())  # shard tasks elsewhere (other working directories) get this path
        super().__init__(pafs.LocalFileSystem(), root, root)

    def child(self, rel: str) -> LocalStore:
        return LocalStore(self.path(rel))

    @contextmanager
    def writer(self, rel: str) -> Iterator[IO[bytes]]:
        path = Path(self.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        # Our own handle: pyarrow's own file, on ENOSPC, stays open (space held) while the
        # exception's traceback lives.
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())  # on disk before the rename (and a manifest) can say it is done
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)

    def open_writer(self, rel: str) -> IO[bytes]:
        path = Path(self.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "wb")

    def replace(self, src: str, dst: str) -> None:
        Path(self.path(dst)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(src), self.path(dst))

    def sync_dir(self, rel: str) -> None:
        path = self.path(rel)
        if not os.path.isdir(path):
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete_tree(self, rel: str) -> None:
        shutil.rmtree(self.path(rel), ignore_errors=True)

    def create(self, rel: str, data: bytes) -> bool:
        """The file written beside, fsynced, then hard-linked into place: a link fails if the name
        exists, so of writers racing exactly one succeeds, and a reader never sees half a file."""
        path = Path(self.path(rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.sync_dir(str(path.parent.relative_to(self.root)))
        return True

    def age_s(self, rel: str) -> float | None:
        found = self.info(rel)
        return None if found is None else time.time() - found.mtime_ns / 1e9


class ObjectStore(Store):
    """A bucket and prefix on S3 or GCS (or a MinIO/SeaweedFS speaking S3)."""

    renames = False
    storage: StorageConfig | None = None  # the settings it was opened with (for DuckDB, the lease)

    def child(self, rel: str) -> ObjectStore:
        store = ObjectStore(self.fs, self.path(rel), self.url(rel))
        store.storage = self.storage
        return store

    def _try(self, op: Callable[[], T], what: str) -> T:
        return retrying(op, what, (self.storage or StorageConfig()).retry_s)

    def open_input_stream(self, rel: str) -> pa.NativeFile:
        if not self.url_root.startswith("s3://"):
            return super().open_input_stream(rel)
        return self.open_input_file(rel)  # on S3 the same object (ranged GETs), and it can tell its position

    def open_input_file(self, rel: str) -> pa.NativeFile:
        """On S3 each read is retried too (GCS's client resumes its own downloads)."""
        raw = super().open_input_file(rel)
        if not self.url_root.startswith("s3://"):
            return raw
        what = f"reading {self.url(rel)}"
        return pa.PythonFile(RetryingReads(raw, lambda op: self._try(op, what)), mode="r")

    def create(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist (a conditional PUT): False if it does (also when
        a try whose reply was lost had written it: callers compare what stands with what they wrote)."""
        from tasks.lease import create_once  # boto3 and the GCS JSON API, only where needed

        return self._try(lambda: create_once(self.url(rel), data, self.storage), f"creating {self.url(rel)}")

    def age_s(self, rel: str) -> float | None:
        from tasks.lease import object_age_s

        return self._try(lambda: object_age_s(self.url(rel), self.storage), f"looking up {self.url(rel)}")

    def check(self) -> None:
        bucket = self.root.split("/", 1)[0]
        try:
            self.fs.get_file_info(pafs.FileSelector(self.root + "/", allow_not_found=True, recursive=False))
            found = self.fs.get_file_info(bucket).type
        except OSError as exc:
            raise StorageError(f"cannot list {self.url_root} (bucket {bucket}): {store_error_text(exc)}") from None
        if found == pafs.FileType.NotFound:
            raise StorageError(f"cannot use {self.url_root}: the bucket {bucket} does not exist (create it first)")


def store_error_text(exc: BaseException) -> str:
    text = str(exc)
    for code, hint in (("NO_SUCH_BUCKET", "the bucket does not exist"),
                       ("SIGNATURE_DOES_NOT_MATCH", "wrong secret key"),
                       ("INVALID_ACCESS_KEY_ID", "unknown access key"),
                       ("ACCESS_DENIED", "access denied (wrong or missing credentials)")):
        if code in text:
            return f"{hint} ({text.splitlines()[0]})"
    return text.splitlines()[0] if text else type(exc).__name__


def open_store(location: str | Path, storage: StorageConfig | None = None) -> Store:
    """The store for a local path or an ``s3://bucket/prefix`` / ``gs://bucket/prefix`` URL."""
    text = str(location)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in REMOTE_SCHEMES:
        if parts.scheme and len(parts.scheme) > 1:  # c:\ is a drive, not a scheme
            raise StorageError(f"{text}: unsupported storage scheme {parts.scheme}:// (use a local path, s3:// or gs://)")
        return LocalStore(text)
    if not parts.netloc:
        raise StorageError(f"{text}: no bucket named")
    root = f"{parts.netloc}{parts.path}".rstrip("/")
    storage = storage or StorageConfig()
    store = ObjectStore(_filesystem(parts.scheme, storage), root, f"{parts.scheme}://{root}")
    store.storage = storage
    return store


@dataclass(frozen=True)
class S3Settings:
    """What every S3 client here (pyarrow, DuckDB's httpfs, boto3 for the lease) is built from:
    the config's values, else the standard variables. ``key``/``secret`` None: the client's own
    chain (variables, AWS_PROFILE, ~/.aws, an instance role)."""

    endpoint: str | None
    region: str | None
    key: str | None
    secret: str | None
    anonymous: bool

    def __repr__(self) -> str:  # never the keys
        return f"S3Settings(endpoint={self.endpoint!r}, region={self.region!r}, anonymous={self.anonymous})"


def s3_settings(storage: StorageConfig | None = None) -> S3Settings:
    storage = storage or StorageConfig()
    keys = None, None
    if storage.access_key_id and storage.secret_access_key:
        keys = storage.access_key_id.get_secret_value(), storage.secret_access_key.get_secret_value()
    return S3Settings(
        endpoint=storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region=storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        key=keys[0], secret=keys[1], anonymous=storage.anonymous)


def _filesystem(scheme: str, storage: StorageConfig) -> pafs.FileSystem:
    if scheme == "gs":
        return _gcs(storage.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST"))
    s = s3_settings(storage)
    return _s3(s.endpoint, s.region, s.key, s.secret, s.anonymous)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None, key: str | None, secret: str | None,
        anonymous: bool) -> pafs.S3FileSystem:
    """One client per setting in a process (each part and manifest write reuses it)."""
    kwargs: dict[str, Any] = {"region": region or "us-east-1", "anonymous": anonymous,
                              "connect_timeout": 10, "request_timeout": 120,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    if endpoint:
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs |= {"endpoint_override": url.netloc, "scheme": url.scheme}
    if key and secret:
        kwargs |= {"access_key": key, "secret_key": secret}
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=4)
def _gcs(endpoint: str | None) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {"retry_time_limit": datetime.timedelta(seconds=120)}
    if endpoint:
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs |= {"endpoint_override": url.netloc, "scheme": url.scheme, "anonymous": True}
    return pafs.GcsFileSystem(**kwargs)


# A forked process (a DataLoader worker) must not use the clients its parent cached: they would share
# pooled connections and read each other's replies (corrupt Parquet footers, seen). Each child makes its own.
for _cached in (_s3, _gcs):
    os.register_at_fork(after_in_child=_cached.cache_clear)


def duckdb_setup(store: Store, storage: StorageConfig | None = None) -> list[str]:
    """DuckDB statements that let it read ``store``'s files by URL (httpfs with the same endpoint,
    region and keys); none for a local store. Keys go into a temporary secret of the connection,
    never into a file."""
    if not isinstance(store, ObjectStore):
        return []
    if store.url_root.startswith("gs://"):
        return [load_httpfs(), _gcs_secret(storage or store.storage or StorageConfig())]
    settings = s3_settings(storage or store.storage)
    endpoint, region = settings.endpoint, settings.region or "us-east-1"
    key = settings.key or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = settings.secret or os.environ.get("AWS_SECRET_ACCESS_KEY")
    fields = [("TYPE", "s3"), ("REGION", region)]
    if key and secret:
        fields += [("KEY_ID", key), ("SECRET", secret)]
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            fields.append(("SESSION_TOKEN", token))
    else:
        fields.append(("PROVIDER", "credential_chain"))
    return [load_httpfs(), _secret(fields, endpoint, "https")]


def _secret(fields: list[tuple[str, str]], endpoint: str | None, default_scheme: str) -> str:
    """A connection's temporary DuckDB secret; a custom endpoint is addressed path-style."""
    if endpoint:
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"{default_scheme}://{endpoint}")
        fields = [*fields, ("ENDPOINT", url.netloc), ("URL_STYLE", "path"),
                  ("USE_SSL", str(url.scheme == "https").lower())]
    body = ", ".join(f"{k} {_sql_value(v)}" for k, v in fields)
    return f"CREATE OR REPLACE TEMPORARY SECRET t2i_store ({body})"


def _gcs_secret(storage: StorageConfig) -> str:
    """httpfs reads gs:// through GCS's S3-compatible XML API: HMAC keys (storage.access_key_id /
    secret_access_key) on GCS; an emulator (storage.endpoint_url, STORAGE_EMULATOR_HOST) needs none."""
    fields = [("TYPE", "gcs")]
    if storage.access_key_id and storage.secret_access_key:
        fields += [("KEY_ID", storage.access_key_id.get_secret_value()),
                   ("SECRET", storage.secret_access_key.get_secret_value())]
    return _secret(fields, storage.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST"), "http")


def _sql_value(value: str) -> str:
    if value in ("true", "false") or value == "s3" or value == "credential_chain":
        return value if value in ("true", "false") else f"'{value}'"
    return "'" + value.replace("'", "''") + "'"


def load_httpfs() -> str:
    """LOAD from the wheel that ships the extension (no download at run time)."""
    try:
        import duckdb_extension_httpfs  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StorageError("DuckDB over s3:// needs its httpfs extension: pip install duckdb-extension-httpfs "
                           "(the version of duckdb)") from exc
    import duckdb

    path = Path(duckdb_extension_httpfs.__file__).parent / f"extensions/v{duckdb.__version__}/httpfs.duckdb_extension"
    if not path.exists():
        raise StorageError(f"no httpfs extension for duckdb {duckdb.__version__} at {path}")
    return "LOAD '" + str(path).replace("'", "''") + "'"


def as_store(location: Store | str | Path, storage: StorageConfig | None = None) -> Store:
    """``location`` as a store (a store is returned as it is)."""
    return location if isinstance(location, Store) else open_store(location, storage)


def location(where: str | Path) -> str:
    """A source or output as recorded (stamp, manifest): an object-store URL as given, a local
    path made absolute."""
    if str(where).startswith("synth:"):  # the synthetic source (tasks/sources/synth.py): no place on disk
        return str(where)
    return str(where).rstrip("/") if is_remote(where) else str(Path(where).resolve())
