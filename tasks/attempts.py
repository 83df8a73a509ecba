"""Attempts at a source shard, and the commit that lets exactly one of them land.

A shard may be attempted more than once at the same time: a node cut off from Ray goes on
writing while its retry runs elsewhere, and a killed run's tasks may outlive its driver. So:

- Every attempt has a random token. Its parts are staged under names of its own: locally
  ``_tmp/{shard_id}/{token}/{kind}-{name}``, on an object store (no rename there) straight under
  ``{kind}/{shard_id}.{token}.partNNNNN.parquet``.
- Before a part is opened its name goes into the attempt's record,
  ``_attempts/{shard_id}/{token}.json`` (with the host, pid and the pid's start time), so that
  whoever finds the record can remove the parts. A heartbeat thread writes the record again every
  ttl/4 while the attempt runs.
- The commit is the manifest entry, created only if none exists (a hard link locally, a
  conditional PUT on S3 and GCS): of attempts racing, one wins. Before it, the attempt checks that
  its heartbeat never lapsed for half a ttl (else a sweeper may have judged it dead and removed its
  parts: it stops instead, ``AttemptExpired``) and that every part it lists exists
  (``PartsMissing``). The entry names the winning token. Locally the parts are then renamed into
  ``shards/`` and ``rejects/``, so no reader sees a part before its commit; a kill between the
  entry and the renames is finished by the next ``settle`` (a roll-forward, not a loss).
- Another attempt's files are removed only once it is known to be over: it lost the commit (the
  entry names another token), its process is gone (same host), or its record is older than its
  ttl (by the store's clock: an object's Last-Modified against the response's Date).

``settle`` does that for one shard (each attempt starts with it); ``sweep_uncommitted`` for the
whole output (a run's start and end, under the output's lock).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from tasks.shards import ATTEMPTS, KINDS, MANIFEST, TMP, Manifest
from tasks.storage import Store, as_store

log = logging.getLogger(__name__)

ATTEMPT_TTL_S = 120.0


class AttemptExpired(RuntimeError):
    """The attempt's heartbeat lapsed: another may have removed its parts, so it must not commit
    (the shard is retried)."""


class PartsMissing(RuntimeError):
    """A part the commit would list is not there: the commit is refused (the shard is retried)."""


def _process_start(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class Attempt:
    """One attempt at one shard: its token, record, heartbeat and commit (see the module docstring).
    Use ``with attempt.alive():`` around the writing and the commit."""

    def __init__(self, store: Store, shard_id: str, token: str | None = None, ttl_s: float = ATTEMPT_TTL_S):
        self.store, self.shard_id = store, shard_id
        self.token = token or secrets.token_hex(4)
        self.ttl_s = float(ttl_s)
        self.files: list[str] = []  # final names ({kind}/{name}) of the parts begun
        self._renewed: float | None = None  # monotonic time of the last record write that went through
        self._lapsed = False  # a gap of half a ttl between two writes: a sweeper may think us dead
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def record(self) -> str:
        return f"{ATTEMPTS}/{self.shard_id}/{self.token}.json"

    def staged(self, rel: str) -> str:
        """Where the part ``rel`` (``{kind}/{name}``) is written before its commit."""
        if not self.store.renames:
            return rel
        kind, name = rel.split("/", 1)
        return f"{TMP}/{self.shard_id}/{self.token}/{kind}-{name}"

    def note(self, rel: str) -> None:
        """Before the part exists: a kill leaves it findable."""
        self.files.append(rel)
        self.renew()

    # -- heartbeat -----------------------------------------------------------------------------

    def renew(self) -> None:
        """Write the record (whole: one another attempt deleted comes back complete)."""
        body = {"files": self.files, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "ttl_s": self.ttl_s}
        with self._mutex:
            sent = time.monotonic()
            self.store.write_bytes(self.record, json.dumps(body).encode())
            if self._renewed is not None and sent - self._renewed > self.ttl_s / 2:
                self._lapsed = True
            self._renewed = sent

    def alive(self) -> _Heartbeat:
        return _Heartbeat(self)

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self.files:
                continue  # no record yet: nothing of ours to find
            try:
                self.renew()
            except Exception as exc:  # the store unreachable: the commit checks the gap
                log.warning("attempt %s at %s: could not renew its record: %s", self.token, self.shard_id, exc)

    def expired(self) -> str | None:
        """Why this attempt may no longer commit, or None."""
        if self._renewed is None:
            return None  # never wrote a record: nobody can have judged it dead
        if self._lapsed:
            return f"its record went unrenewed for over {self.ttl_s / 2:g} s"
        if time.monotonic() - self._renewed > self.ttl_s / 4:
            self.renew()  # the heartbeat is due: write it now rather than guess
            if self._lapsed:
                return f"its record went unrenewed for over {self.ttl_s / 2:g} s"
        return None

    # -- the end of an attempt -----------------------------------------------------------------

    def commit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Create the shard's manifest entry unless another attempt's stands; returns the entry
        that stands. The loser removes its parts, so the shard's rows are there once."""
        if why := self.expired():
            raise AttemptExpired(f"attempt {self.token} at shard {self.shard_id} may not commit: {why}")
        if (standing := self._standing()) is not None:
            return standing
        missing = [rel for rel in entry["files"] if not self.store.exists(self.staged(rel))]
        if missing:
            raise PartsMissing(f"attempt {self.token} at shard {self.shard_id}: {', '.join(missing)} "
                               "gone before the commit; the shard is done again")
        entry = entry | {"attempt": self.token}
        try:
            created = self.store.create(f"{MANIFEST}/{self.shard_id}.json", json.dumps(entry, indent=1).encode())
        except Exception:
            if not self._created_anyway():
                raise
            created = True
        if not created:
            standing = Manifest(self.store).entry(self.shard_id)
            if not _won(standing, self.token, self.files):
                self.discard()
                return standing
        publish(self.store, self.shard_id, self.token, entry["files"])
        self.store.delete(self.record)  # committed: its parts are no longer leftovers to sweep
        return entry

    def _created_anyway(self) -> bool:
        """After the entry's create raised (a full disk, a reply lost): True if our entry stands all
        the same; else this attempt is over and removes its parts (a failure to look leaves them
        to a later ``settle``)."""
        try:
            if self.store.exists(f"{MANIFEST}/{self.shard_id}.json") and \
                    _won(Manifest(self.store).entry(self.shard_id), self.token, self.files):
                return True
            self.discard()
        except Exception as exc:
            log.warning("attempt %s at %s: could not look at its commit: %s", self.token, self.shard_id, exc)
        return False

    def _standing(self) -> dict[str, Any] | None:
        """Another attempt's entry, if one stands already (this one then lost: its parts go)."""
        if not self.store.exists(f"{MANIFEST}/{self.shard_id}.json"):
            return None
        standing = Manifest(self.store).entry(self.shard_id)
        if _won(standing, self.token, self.files):
            return None
        self.discard()
        return standing

    def discard(self) -> None:
        """Remove this attempt's files and record (it failed, or another attempt committed)."""
        remove(self.store, self.shard_id, self.token, self.files)


class _Heartbeat:
    """The attempt's record renewed every ttl/4 for the block's time."""

    def __init__(self, attempt: Attempt):
        self.attempt = attempt

    def __enter__(self) -> Attempt:
        a = self.attempt
        a._stop.clear()
        a._thread = threading.Thread(target=a._beat, name=f"attempt {a.shard_id}", daemon=True)
        a._thread.start()
        return a

    def __exit__(self, *exc: object) -> None:
        self.attempt._stop.set()
        if self.attempt._thread is not None:
            self.attempt._thread.join()


def _won(entry: dict[str, Any], token: str, files: list[str]) -> bool:
    """Whether ``entry`` is this attempt's commit (a create whose reply was lost, then retried).
    Entries written before entries named their attempt are matched by their file list."""
    if "attempt" in entry:
        return entry["attempt"] == token
    return sorted(entry.get("files", [])) == sorted(files)


def publish(store: Store, shard_id: str, token: str, files: list[str]) -> None:
    """Make a committed attempt's parts visible: locally, each staged part renamed into place
    (skipped when done already, so a kill here is finished by calling it again); on an object
    store they are in place already."""
    if not store.renames:
        return
    for rel in files:
        staged = f"{TMP}/{shard_id}/{token}/{rel.replace('/', '-', 1)}"
        with suppress(FileNotFoundError):
            store.replace(staged, rel)
    for kind in KINDS:
        store.sync_dir(kind)
    _remove_staging(store, shard_id, token)


def _remove_staging(store: Store, shard_id: str, token: str) -> None:
    """A local attempt's staging folder, and the shard's once empty."""
    store.delete_tree(f"{TMP}/{shard_id}/{token}")
    with suppress(OSError):
        Path(store.path(f"{TMP}/{shard_id}")).rmdir()


def remove(store: Store, shard_id: str, token: str, files: list[str]) -> None:
    """An attempt's parts, then its record (so a kill in between leaves the record to find them)."""
    if store.renames:
        _remove_staging(store, shard_id, token)
    else:
        for rel in files:
            store.delete(rel)
    store.delete(f"{ATTEMPTS}/{shard_id}/{token}.json")


def _over(store: Store, record: str, body: dict[str, Any]) -> str | None:
    """Why the attempt of this record is over, or None while it may still be running."""
    if body.get("host") == socket.gethostname() and isinstance(body.get("pid"), int):
        start = _process_start(body["pid"])
        if start is None or (body.get("pid_start") and abs(start - body["pid_start"]) > 0.01):
            return "its process is gone"
    age = store.age_s(record)
    ttl = float(body.get("ttl_s") or ATTEMPT_TTL_S)
    if age is None or age > ttl:
        return f"its record is {age:.0f} s old (ttl {ttl:g} s)" if age is not None else "its record is gone"
    return None


def _read(store: Store, rel: str) -> dict[str, Any] | None:
    try:
        body = json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # half a record (an old local write): its files are found from the layout
    return body if isinstance(body, dict) else {}


def settle(out: Store | str | Path, shard_id: str) -> int:
    """Settle every attempt at ``shard_id`` that is over: a committed one's parts published (a
    roll-forward), a loser's or a dead one's removed; live ones are left alone. Returns how many
    attempts it settled."""
    store = as_store(out)
    entry = Manifest(store).entry(shard_id) if store.exists(f"{MANIFEST}/{shard_id}.json") else None
    settled = 0
    tokens = set()
    for found in store.list(f"{ATTEMPTS}/{shard_id}", ".json"):
        token = found.rel.rsplit("/", 1)[-1].removesuffix(".json")
        body = _read(store, found.rel)
        if body is None:
            continue  # settled meanwhile by its own attempt
        tokens.add(token)
        files = [f for f in body.get("files", []) if isinstance(f, str)]
        if entry is not None and _won(entry, token, files):
            publish(store, shard_id, token, files)
            store.delete(found.rel)
            settled += 1
            continue
        why = "another attempt committed" if entry is not None else _over(store, found.rel, body)
        if why:
            log.info("removing attempt %s at shard %s: %s", token, shard_id, why)
            remove(store, shard_id, token, files)
            settled += 1
    if store.renames:
        settled += _clear_staging(store, shard_id, tokens)
    return settled


def _clear_staging(store: Store, shard_id: str, recorded: set[str]) -> int:
    """Local staging no record names (an attempt killed before its first record, or the layout of
    older versions: files straight under ``_tmp/{shard_id}/``): never a live attempt's."""
    root = Path(store.path(f"{TMP}/{shard_id}"))
    if not root.is_dir():
        return 0
    gone = 0
    for child in root.iterdir():
        if child.is_dir() and child.name in recorded:
            continue
        store.delete_tree(f"{TMP}/{shard_id}/{child.name}") if child.is_dir() else child.unlink(missing_ok=True)
        gone += 1
    with suppress(OSError):
        root.rmdir()  # empty now
    return gone


def clear_partial(out: Store | str | Path, shard_id: str) -> None:
    """What an attempt does first: settle the shard's earlier attempts that are over."""
    settle(out, shard_id)


def drop_committed(out: Store | str | Path, shard_id: str) -> None:
    """Delete a done shard's files, then its entry (its source changed): a kill in between leaves
    an entry whose source still reads as changed, so the next run drops it again."""
    store = as_store(out)
    manifest = Manifest(store)
    files = manifest.entry(shard_id).get("files", []) if store.exists(f"{MANIFEST}/{shard_id}.json") else []
    settle(store, shard_id)  # first: a committed attempt's roll-forward publishes what goes next
    for rel in files:
        store.delete(rel)
    manifest.forget(shard_id)


def sweep_uncommitted(out: Store | str | Path) -> int:
    """Settle every shard's attempts (a run's start and end, under the output's lock), then remove
    parts that no entry lists and no live attempt owns (a record lost; locally, parts an older
    version published before their entry), so that afterwards a glob of ``shards/*.parquet`` shows
    exactly the committed parts and those of attempts still running. Returns how many went."""
    store = as_store(out)
    shards = {e.rel.split("/")[1] for e in store.list(ATTEMPTS, ".json", recursive=True)}
    if store.renames:
        shards |= {e.rel.split("/")[1] for e in store.list(TMP, recursive=True)}
    gone = sum(settle(store, shard_id) for shard_id in sorted(shards))
    entries = Manifest(store).entries()
    listed = {f for entry in entries for f in entry.get("files", [])}
    live = {(e.rel.split("/")[1], e.rel.rsplit("/", 1)[-1].removesuffix(".json"))
            for e in store.list(ATTEMPTS, ".json", recursive=True)}
    done = {entry.get("shard_id") for entry in entries}
    for kind in KINDS:
        for part in store.list(kind, ".parquet"):
            if part.rel in listed or _owned(part.rel, live, done, store.renames):
                continue
            store.delete(part.rel)
            gone += 1
    if store.renames:
        with suppress(OSError):
            Path(store.path(TMP)).rmdir()
    return gone


def _owned(rel: str, live: set[tuple[str, str]], done: set[str | None], renames: bool) -> bool:
    """Whether a part no entry lists is still someone's: a live attempt's (object stores), or, locally,
    one of a committed shard (an entry the duplicate-key pass corrects; locally parts only ever
    arrive by a committed attempt's rename)."""
    name = rel.rsplit("/", 1)[-1]
    shard_id = name.split(".", 1)[0]
    if renames:
        return shard_id in done
    token = name.split(".")[1] if name.count(".") >= 3 else ""
    return (shard_id, token) in live
