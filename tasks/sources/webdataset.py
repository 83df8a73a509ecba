"""img2dataset's webdataset output: ``NNNNN.tar`` holding ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``.

The tar is streamed (``r|*``), members of one key arriving together as webdataset
writes them; from an object store too (an input stream, never the whole tar in memory).
A tar that breaks part-way yields the rows before the break and then one row that
records the break, so the shard's accounting says where it stopped.

Members are read only after their size (from the tar header) is checked against
``max_member_bytes``: an oversized image gives its row with no bytes as a
``file_too_large`` reject, and members of unknown types (``.mp4``, ...) are never read.
Link members (symlink, hardlink) are ``source_unreadable``: a webdataset tar holds
regular files, and a link's target is not part of the stream.

Keys whose members are not adjacent (``tar cf x.tar *.jpg *.txt``) are not regrouped:
that would mean buffering the whole tar. The tar's keys are remembered (strings only),
and a run of members whose key was already emitted is a ``noncontiguous_key`` reject,
unless both runs carry an image: that is a sample written twice, left to the key
dedupe. The first run still goes through as it was (for ``*.jpg *.txt``: images without
captions, kept for recaptioning); the reject rows say why their captions are missing.

Names that are not UTF-8 (Latin-1 bytes in a member name) become printable keys with
``\\xNN`` escapes rather than surrogates, which Arrow cannot store.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

import pyarrow as pa

from schemas.config import SourceConfig, StorageConfig
from tasks.sources.base import (
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_EXTENSIONS,
    MISSING_IMAGE,
    UNREADABLE,
    UNREADABLE_SUFFIX,
    BatchBuilder,
    Listing,
    SourceShard,
    UnreadableSource,
    decode_caption,
    drain,
    open_stream,
    printable,
    shard_id_of,
    too_large,
)

NONCONTIGUOUS_KEY = "noncontiguous_key"
CAPTION_EXTENSIONS = frozenset({"txt", "caption"})


def discover(listing: Listing) -> list[SourceShard]:
    return [SourceShard(shard_id_of(rel), "webdataset", listing.location(rel))
            for rel in listing.shard_files("webdataset")]


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return printable(f"{head}/{stem}" if head else stem), ext.lower()


class _Group:
    """The adjacent members of one key."""

    def __init__(self, key: str):
        self.key = key
        self.exts: list[str] = []
        self.has_image = False  # an image member was present, read or not
        self.image: bytes | None = None
        self.caption_raw: bytes | None = None
        self.meta_raw: bytes | None = None
        self.error: str | None = None  # the first link or size problem of a member


def _emit(builder: BatchBuilder, group: _Group, source: str, seen: dict[str, bool]) -> pa.RecordBatch | None:
    """``seen``: key -> whether an emitted run of that key had an image."""
    caption, error = decode_caption(group.caption_raw)
    earlier = seen.get(group.key)
    if earlier is not None and not (earlier and group.has_image):
        error = (f"{NONCONTIGUOUS_KEY}: the members of {group.key} are not adjacent in the tar (img2dataset "
                 f"writes them adjacent); this later run ({', '.join(group.exts)}) is not joined to the "
                 "earlier one, which was emitted on its own")
        group.image = None
    elif group.error:
        error = group.error
    elif not group.has_image:
        error = error or f"{MISSING_IMAGE}: no image member for this key"
    seen[group.key] = bool(earlier) or group.has_image
    meta = group.meta_raw.decode("utf-8", "replace") if group.meta_raw else None
    return builder.add(group.key, source, group.image, caption, error, meta)


def _take(tar: tarfile.TarFile, member: tarfile.TarInfo, group: _Group, ext: str, limit: int) -> None:
    """Read one member into its group, unless it is a link, too large or not wanted."""
    is_image = ext in IMAGE_EXTENSIONS
    group.exts.append(ext)
    if not (is_image or ext in CAPTION_EXTENSIONS or ext == "json"):
        return  # unknown types are never read: the stream skips over them
    if is_image and group.has_image:
        return  # a second image of one key: the first one is the sample
    group.has_image |= is_image
    if member.issym() or member.islnk():
        group.error = group.error or (f"{UNREADABLE}: {printable(member.name)} is a link member "
                                      f"(to {printable(member.linkname)}); webdataset tars hold regular files")
        return
    if member.size > limit:
        group.error = group.error or too_large(member.size, limit, member.name)
        return
    handle = tar.extractfile(member)
    data = handle.read() if handle else b""
    if is_image:
        group.image = data
    elif ext == "json":
        group.meta_raw = data
    else:
        group.caption_raw = data


def read(shard: SourceShard, cfg: SourceConfig, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
         storage: StorageConfig | None = None) -> Iterator[pa.RecordBatch]:
    builder = BatchBuilder(cfg.batch_rows)
    source = printable(shard.path)
    group: _Group | None = None
    seen: dict[str, bool] = {}
    try:
        with open_stream(shard.path, storage) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
            for member in tar:
                if not (member.isfile() or member.issym() or member.islnk()):
                    continue
                key, ext = _split(member.name)
                if group is None or key != group.key:
                    if group is not None and (batch := _emit(builder, group, source, seen)):
                        yield batch
                    group = _Group(key)
                _take(tar, member, group, ext, max_member_bytes)
        if group is not None and (batch := _emit(builder, group, source, seen)):
            yield batch
    except (tarfile.TarError, OSError, EOFError, pa.ArrowException) as exc:
        where = f"tar unreadable after {group.key if group else 'the start'}: {type(exc).__name__}: {exc}"
        if cfg.unreadable == "fail":
            raise UnreadableSource(f"{source}: {where}") from exc
        # The group in progress may be incomplete: it is part of what could not be read.
        builder.add(key=f"{shard.shard_id}{UNREADABLE_SUFFIX}", source=source,
                    source_error=f"{UNREADABLE}: {printable(where)}")
    yield from drain(builder)
