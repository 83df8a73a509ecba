"""A folder of images with same-name ``.txt`` captions (``a/b.jpg`` + ``a/b.txt``).

The sorted listing is cut into chunks of ``folder_chunk`` images; each chunk is a shard.
The key is the path relative to the folder without its extension, made printable
(``\\xNN``) when the name is not UTF-8. Sizes are checked before a file is read, so an
oversized image is a ``file_too_large`` reject that never enters memory. A symlink whose
target is gone is still listed, so an image that vanished leaves a reject, not nothing.

On an object store a chunk's sizes come from one listing of each folder its images are in
(images and captions together, no request per file), and each object is then read once.
A flat prefix of millions of images lists all of it for every chunk: nest such folders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pyarrow as pa

from schemas.config import SourceConfig, StorageConfig
from tasks.sources.base import (
    DEFAULT_MAX_MEMBER_BYTES,
    MISSING_IMAGE,
    UNREADABLE,
    BatchBuilder,
    Listing,
    SourceShard,
    decode_caption,
    drain,
    printable,
    too_large,
)
from tasks.storage import Entry, Store, is_remote, open_store


def discover(listing: Listing, cfg: SourceConfig) -> list[SourceShard]:
    images = listing.shard_files("folder")
    size = cfg.folder_chunk
    return [
        SourceShard(f"folder-{i // size:06d}", "folder", listing.base, tuple(images[i : i + size]))
        for i in range(0, len(images), size)
    ]


class _LocalFiles:
    """A chunk's files on a local disk, asked about when they are read."""

    def __init__(self, root: str):
        self.root = Path(root)

    def name(self, rel: str) -> str:
        return str(self.root / rel)

    def dangling(self, rel: str) -> bool:
        path = self.root / rel
        return path.is_symlink() and not path.exists()

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def stat(self, rel: str) -> tuple[int, int]:
        st = (self.root / rel).stat()
        return st.st_size, st.st_mtime_ns

    def read(self, rel: str, limit: int) -> bytes:
        return (self.root / rel).read_bytes()


class _StoreFiles:
    """A chunk's files on an object store, as one listing of their folders saw them."""

    def __init__(self, store: Store, members: tuple[str, ...]):
        self.store = store
        folders = sorted({rel.rpartition("/")[0] for rel in members})
        self.entries: dict[str, Entry] = {e.rel: e for folder in folders for e in store.list(folder)}

    def name(self, rel: str) -> str:
        return self.store.url(rel)

    def dangling(self, rel: str) -> bool:
        return False  # objects are not links

    def has(self, rel: str) -> bool:
        return rel in self.entries

    def stat(self, rel: str) -> tuple[int, int]:
        if (entry := self.entries.get(rel)) is None:
            raise FileNotFoundError(f"no such object: {self.name(rel)}")
        return entry.size, entry.mtime_ns

    def read(self, rel: str, limit: int) -> bytes:
        """At most ``limit + 1`` bytes, should the object have grown since it was listed."""
        with self.store.open_input_stream(rel) as fh:
            return fh.read(limit + 1)


_Files = _LocalFiles | _StoreFiles


def _files(shard: SourceShard, storage: StorageConfig | None) -> _Files:
    if is_remote(shard.path):
        return _StoreFiles(open_store(shard.path, storage), shard.members)
    return _LocalFiles(shard.path)


def _caption_of(rel: str) -> str:
    return PurePosixPath(rel).with_suffix(".txt").as_posix()


def _read_limited(files: _Files, rel: str, limit: int) -> tuple[bytes | None, str | None]:
    """(bytes, error): the size is checked before the read."""
    size = files.stat(rel)[0]
    if size > limit:
        return None, too_large(size, limit, PurePosixPath(rel).name)
    data = files.read(rel, limit)
    if len(data) > limit:  # grew since it was listed (the changed shard is refused after reading)
        return None, too_large(len(data), limit, PurePosixPath(rel).name)
    return data, None


def _sample(files: _Files, rel: str, limit: int) -> tuple[bytes | None, str | None, str | None]:
    """(image, caption, error) of one listed image."""
    if files.dangling(rel):
        return None, None, f"{MISSING_IMAGE}: {printable(rel)} is a symlink to a missing file"
    caption_rel = _caption_of(rel)
    try:
        image, error = _read_limited(files, rel, limit)
        raw, caption_error = _read_limited(files, caption_rel, limit) if files.has(caption_rel) else (None, None)
    except OSError as exc:
        return None, None, f"{UNREADABLE}: cannot read {printable(rel)}: {printable(str(exc))}"
    caption, utf8_error = decode_caption(raw)
    if caption is not None:  # an editor's final newline is not part of the caption (img2dataset writes none)
        caption = caption.removesuffix("\n").removesuffix("\r")
    return image, caption, error or caption_error or utf8_error


def read(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
         storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    files = _files(shard, storage)
    for rel in shard.members:
        image, caption, error = _sample(files, rel, max_member_bytes)
        key = printable(rel.rsplit(".", 1)[0])
        if out := builder.add(key, printable(files.name(rel)), image, caption, error):
            yield out
    yield from drain(builder)


def fingerprint(shard: SourceShard, storage: StorageConfig | None = None) -> dict[str, object]:
    """A digest of every member's and caption's size and modification time."""
    digest = hashlib.blake2b(digest_size=12)
    files = _files(shard, storage)
    for rel in shard.members:
        for name in (rel, _caption_of(rel)):
            path = files.name(name)
            try:
                size, mtime_ns = files.stat(name)
                digest.update(f"{path}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))
            except OSError:
                digest.update(f"{path}\0absent\n".encode("utf-8", "surrogateescape"))
    return {"files": len(shard.members), "digest": digest.hexdigest()}
