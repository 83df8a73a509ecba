"""The output's layout and the manifest: which parts count.

Layout under the output (a local folder or an object-store prefix)::

    shards/{part}.parquet     kept rows
    rejects/{part}.parquet    rejected rows with their reason
    _manifest/{shard_id}.json this source shard is done, and these are its files (the commit)
    _attempts/{shard_id}/{token}.json   an attempt's record (tasks/attempts.py)
    _tmp/{shard_id}/{token}/  a local attempt's staged parts

The manifest entry is the commit: a shard's rows count only once its entry lists them. How an
attempt writes its parts and commits them is tasks/attempts.py; the writer is tasks/parts.py.

- Local: parts reach ``shards/`` and ``rejects/`` by rename only after their entry exists, as
  ``{shard_id}.part00000.parquet``: a glob of ``shards/*.parquet`` only ever sees committed parts.
- Object stores have no rename: parts are written straight under their final names, unique to
  the attempt (``{shard_id}.{token}.part00000.parquet``), so an attempt that outlives its retry
  (a node cut off, not dead) can never overwrite the parts the manifest lists. A glob may see
  parts of attempts still running, so ``committed_files`` lists the manifest's files instead.

On resume a shard with a manifest entry is skipped; any other shard's leftovers are deleted and
the shard is done again, so nothing is lost and nothing is written twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    rename after their commit); on an object store what the manifest lists, as a listing there can also show parts
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
