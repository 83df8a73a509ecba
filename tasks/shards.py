"""Atomic Parquet output and the manifest that makes a killed run resumable, on any store.

Layout under the output (a local folder or an object-store prefix)::

    shards/{part}.parquet     kept rows
    rejects/{part}.parquet    rejected rows with their reason
    _manifest/{shard_id}.json written last: this source shard is done, and these are its files

The manifest entry is the commit: a shard's rows count only once its entry lists them.

- Local: parts are written under ``_tmp/{shard_id}/`` (fsynced), renamed into place when the
  shard is finished, then the entry is written (``{shard_id}.part00000.parquet``). A glob of
  ``shards/*.parquet`` therefore only ever sees committed parts.
- Object stores have no rename: parts are written straight under their final names, unique to
  the attempt (``{shard_id}.{attempt}.part00000.parquet``), so an attempt that outlives its
  retry (a node cut off, not dead) can never overwrite the parts the manifest lists. Before
  each part is opened its name is added to ``_attempts/{shard_id}/{attempt}.json``; that record
  is what lets a resumed run (``sweep_uncommitted``) delete an attempt's leftovers without
  listing the whole output. While a record exists, a glob may see uncommitted parts, so
  ``committed_files`` lists the manifest's files instead.

On resume a shard with a manifest entry is skipped; any other shard's leftovers are deleted and
the shard is done again, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.storage import Store, as_store

KINDS = ("shards", "rejects")
MANIFEST = "_manifest"
ATTEMPTS = "_attempts"
TMP = "_tmp"

ROW_GROUP_ROWS = 256


class Manifest:
    """Which source shards are finished, one small JSON file each (no shared file to lock)."""

    def __init__(self, out: Store | str | Path):
        self.store = as_store(out)

    def _rel(self, shard_id: str) -> str:
        return f"{MANIFEST}/{shard_id}.json"

    def done_ids(self) -> set[str]:
        return {e.rel.rsplit("/", 1)[-1].removesuffix(".json") for e in self.store.list(MANIFEST, ".json")}

    def record(self, shard_id: str, entry: dict[str, Any]) -> None:
        self.store.write_bytes(self._rel(shard_id), json.dumps(entry, indent=1).encode())

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(self.store.read_bytes(e.rel)) for e in self.store.list(MANIFEST, ".json")]

    def entry(self, shard_id: str) -> dict[str, Any]:
        return json.loads(self.store.read_bytes(self._rel(shard_id)))

    def forget(self, shard_id: str) -> None:
        """Mark a shard not done (its source changed): the next attempt redoes it whole."""
        self.store.delete(self._rel(shard_id))


def committed_files(out: Store | str | Path, kind: str) -> list[str]:
    """The URLs of ``kind``'s committed parts: locally what the folder holds (parts arrive by
    rename); on an object store what the manifest lists, as a listing there can also show parts
    of attempts that never committed (one on a lost node that went on writing, say)."""
    store = as_store(out)
    if store.renames:
        return [store.url(e.rel) for e in store.list(kind, ".parquet")]
    listed = {f for entry in Manifest(store).entries() for f in entry.get("files", []) if f.startswith(f"{kind}/")}
    return [store.url(rel) for rel in sorted(listed)]


def committed_glob(out: Store | str | Path, kind: str) -> str | list[str] | None:
    """What DuckDB's ``read_parquet`` should read for ``kind``: the folder's glob locally, the
    list of committed parts on an object store; None if there is none."""
    store = as_store(out)
    files = committed_files(store, kind)
    if not files:
        return None
    return store.url(f"{kind}/*.parquet") if store.renames else files


class Attempt:
    """One attempt at a shard on an object store: the names of the parts it has begun, kept in
    ``_attempts/{shard_id}/{attempt}.json`` (written whole each time, so a record another attempt
    deleted comes back complete), so whoever finds it can delete them."""

    def __init__(self, store: Store, shard_id: str, token: str | None = None):
        self.store, self.shard_id = store, shard_id
        self.token = token or secrets.token_hex(4)
        self.files: list[str] = []

    @property
    def record(self) -> str:
        return f"{ATTEMPTS}/{self.shard_id}/{self.token}.json"

    def note(self, rel: str) -> None:
        """Before the part exists: a kill leaves it findable."""
        self.files.append(rel)
        self.store.write_bytes(self.record, json.dumps({"files": self.files}).encode())

    def discard(self) -> None:
        for rel in self.files:
            self.store.delete(rel)
        self.store.delete(self.record)

    def commit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Write the shard's manifest entry unless another attempt committed first (an attempt on
        a lost node that went on writing, and its retry); returns the entry that stands. The
        attempt that lost deletes its parts, so the shard's rows are there once."""
        rel = f"{MANIFEST}/{self.shard_id}.json"
        if not self.store.create(rel, json.dumps(entry, indent=1).encode()):
            standing = Manifest(self.store).entry(self.shard_id)
            if sorted(standing.get("files", [])) != sorted(entry["files"]):
                self.discard()
                return standing
        self.store.delete(self.record)  # committed: its parts are no longer leftovers to sweep
        return entry


def clear_partial(out: Store | str | Path, shard_id: str) -> None:
    """Remove whatever an interrupted attempt at this shard left behind."""
    store = as_store(out)
    if store.renames:
        store.delete_tree(f"{TMP}/{shard_id}")
        for kind in KINDS:
            for leftover in Path(store.path(kind)).glob(f"{shard_id}.part*.parquet"):
                leftover.unlink(missing_ok=True)
        return
    keep = set()
    if store.exists(f"{MANIFEST}/{shard_id}.json"):
        keep = set(Manifest(store).entry(shard_id).get("files", []))
    for record in store.list(f"{ATTEMPTS}/{shard_id}", ".json"):
        for rel in json.loads(store.read_bytes(record.rel)).get("files", []):
            if rel not in keep:
                store.delete(rel)
        store.delete(record.rel)


def drop_committed(out: Store | str | Path, shard_id: str) -> None:
    """Delete a done shard's files, then its entry (its source changed): a kill in between leaves
    an entry whose source still reads as changed, so the next run drops it again."""
    store = as_store(out)
    manifest = Manifest(store)
    files = manifest.entry(shard_id).get("files", []) if store.exists(f"{MANIFEST}/{shard_id}.json") else []
    for rel in files:
        store.delete(rel)
    clear_partial(store, shard_id)
    manifest.forget(shard_id)


def sweep_uncommitted(out: Store | str | Path) -> int:
    """Remove every attempt's leftovers (a run's start and end, under the output's lock, when
    no shard of this run is being written): the parts attempt records name, then any part no
    manifest entry lists (an attempt whose record was lost), so that afterwards a glob of
    ``shards/*.parquet`` shows exactly the committed parts. Returns how many files went."""
    store = as_store(out)
    if store.renames:
        store.delete_tree(TMP)
        return 0
    shards = {e.rel.split("/")[1] for e in store.list(ATTEMPTS, ".json", recursive=True)}
    for shard_id in sorted(shards):
        clear_partial(store, shard_id)
    listed = {f for entry in Manifest(store).entries() for f in entry.get("files", [])}
    orphans = [e.rel for kind in KINDS for e in store.list(kind, ".parquet") if e.rel not in listed]
    for rel in orphans:
        store.delete(rel)
    return len(orphans) + len(shards)


class PartWriter:
    """Streams batches of one kind for one source shard into parts, cut by rows or bytes.

    Rows go to the open part's file a row group at a time, so a shard task holds at most one
    row group of output (plus the input batch being scored), whatever ``max_rows`` is: memory
    does not grow with part size. ``keep_empty`` writes one empty part for a shard with no rows
    (rejects: so ``FROM 'out/rejects/*.parquet'`` works on an output with none). ``publish``
    makes the finished parts visible (a rename locally; nothing to do on an object store, where
    they were written in place)."""

    def __init__(self, out: Store | str | Path, kind: str, shard_id: str, schema: pa.Schema, max_rows: int,
                 max_bytes: int, row_group_rows: int = ROW_GROUP_ROWS, attempt: Attempt | None = None,
                 keep_empty: bool = False):
        self.store = as_store(out)
        self.kind, self.shard_id, self.schema = kind, shard_id, schema
        self.max_rows, self.max_bytes, self.row_group_rows = max_rows, max_bytes, row_group_rows
        self.attempt = attempt or Attempt(self.store, shard_id)  # shared by a shard's two writers
        self.keep_empty = keep_empty
        self.pending: list[pa.RecordBatch] = []  # rows not yet in a row group
        self.pending_rows = 0
        self.part_rows = 0  # rows in the open part, written or pending
        self.part_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.sink: Any = None
        self.parts: list[str] = []
        self.count = 0

    def add(self, batch: pa.RecordBatch) -> None:
        """Rows beyond ``max_rows`` roll into the next part; a part may pass ``max_bytes``
        by at most one batch."""
        self.count += batch.num_rows
        while batch.num_rows:
            room = self.max_rows - self.part_rows
            head, batch = batch.slice(0, room), batch.slice(room)
            self.pending.append(head)
            self.pending_rows += head.num_rows
            self.part_rows += head.num_rows
            self.part_bytes += head.nbytes
            if self.pending_rows >= self.row_group_rows:
                self._write_pending()
            if self.part_rows >= self.max_rows or self.part_bytes >= self.max_bytes:
                self.flush()

    def _write_pending(self) -> None:
        if not self.pending_rows:
            return
        if self.writer is None:
            self._open_part()
        self.writer.write_table(pa.Table.from_batches(self.pending, schema=self.schema),
                                row_group_size=self.row_group_rows)
        self.pending, self.pending_rows = [], 0

    def _open_part(self) -> None:
        rel = self._staged(len(self.parts))
        if not self.store.renames:
            self.attempt.note(rel)
        self.sink = self.store.open_writer(rel)
        self.writer = pq.ParquetWriter(self.sink, self.schema, compression="zstd")

    def _name(self, index: int) -> str:
        if self.store.renames:
            return f"{self.shard_id}.part{index:05d}.parquet"
        return f"{self.shard_id}.{self.attempt.token}.part{index:05d}.parquet"

    def _final(self, index: int) -> str:
        return f"{self.kind}/{self._name(index)}"

    def _staged(self, index: int) -> str:
        return f"{TMP}/{self.shard_id}/{self.kind}-{self._name(index)}" if self.store.renames else self._final(index)

    def flush(self) -> None:
        """Close the open part (durable: fsynced locally, the upload completed on an object
        store); the next rows start a new one."""
        self._write_pending()
        if self.writer is None and self.keep_empty and not self.parts and not self.count:
            self._open_part()  # an empty part: the folder's glob has a file with every column
        if self.writer is None:
            return
        self.writer.close()
        self._close_sink()
        self.writer = None
        self.parts.append(self._name(len(self.parts)))
        self.part_rows, self.part_bytes = 0, 0

    def _close_sink(self) -> None:
        sink, self.sink = self.sink, None
        if sink is None or getattr(sink, "closed", False):
            return
        if not isinstance(sink, pa.NativeFile):  # a local file of our own
            sink.flush()
            os.fsync(sink.fileno())  # on disk before the manifest says done
        sink.close()

    def abort(self) -> None:
        """Close an open file after a failure and remove it (closing an object-store stream
        completes its upload: the half part would otherwise appear)."""
        if self.writer is None:
            return
        try:
            self.writer.close()
        finally:
            self.writer = None
            sink, self.sink = self.sink, None
            if sink is not None and not getattr(sink, "closed", False):
                sink.close()
            self.store.delete(self._staged(len(self.parts)))

    def publish(self) -> list[str]:
        """Make finished parts visible in ``{kind}/``; call after ``flush``."""
        if self.store.renames:
            for name in self.parts:
                self.store.replace(f"{TMP}/{self.shard_id}/{self.kind}-{name}", f"{self.kind}/{name}")
        return [f"{self.kind}/{name}" for name in self.parts]
