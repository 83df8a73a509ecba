"""Keys unique across the whole output, not just within a source shard.

Shards run in parallel and cannot see each other's keys, so after they finish one DuckDB
pass (out of core, however many keys) ranks every kept key by (part file, row). The first
occurrence stays; each later one moves to ``rejects/`` as ``duplicate_key``.

The pass is a commit, not an edit, so a kill or a full disk at any point leaves what readers
see consistent (no row both kept and rejected, no half-written file) and the next call
finishes it:

1. plan: the DuckDB query above;
2. stage: every new file goes under ``_dedupe/`` (each part without its later occurrences,
   each ``{shard_id}.partNNNNN.dupes-{hash}.parquet`` reject file, each touched shard's
   manifest entry), fsynced. Staged Parquet files end in ``.staged``, so no ``*.parquet``
   glob (DuckDB's and pathlib's match dot-files too) ever sees them. A failure here (ENOSPC)
   removes ``_dedupe/`` and re-raises: nothing visible has changed;
3. commit: ``_dedupe/journal.json``, written atomically, lists the renames;
4. apply: per part, the new part replaces the old one (its duplicates leave ``shards/``),
   then its reject file appears in ``rejects/``, so a row is in at most one of the two at any
   instant; then the shard's manifest entry, whose counts and file list are read from the
   files it will have; then the journal goes.

On an object store a "rename" is a copy then a delete (tasks/storage.py): a kill between the two
leaves the staged file and the new target both there, which the roll-forward treats as a step
done but for its delete. What it plans over there is the manifest's committed parts only.

Every call first finishes a journal left by a killed pass, then removes what killed attempts
left (``_dedupe/``, and the ``.{name}.tmp-{pid}`` files of local atomic writes), then plans
anew. The journal keeps a digest of each target before and after its rename: a shard redone
since the kill (its manifest entry forgotten, its parts rewritten) no longer matches, and its
renames are dropped rather than applied over the new files; the new plan covers it.

A later pass can find new later occurrences in a part already cleaned (a shard whose files
sort earlier finished in a later run): its reject file is named by a hash of the keys it
moves, so it never overwrites the rows an earlier pass moved. Manifest entries whose file
list differs from the disk (outputs of the old in-place pass) are rewritten by the same commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.arrow import KEPT_BASE, reject_schema
from tasks.lock import output_lock
from tasks.shards import KINDS, MANIFEST, ROW_GROUP_ROWS, Manifest, committed_files, committed_glob
from tasks.storage import Store, as_store, duckdb_setup

log = logging.getLogger(__name__)

WORK = "_dedupe"  # outside shards/ and rejects/: staged files and the journal
JOURNAL = "journal.json"
STAGED = ".staged"  # after .parquet: no reader's *.parquet glob matches a staged file


@dataclass
class Rename:
    """One step of the commit: move ``src`` over ``dst`` (paths relative to the output).
    ``old`` and ``new`` are digests of ``dst`` before and after (None: no file), so a later
    call can tell a step still to do or done from one whose target someone else rewrote."""

    src: str
    dst: str
    old: str | None
    new: str | None
    rows: int = 0  # duplicate rows this step publishes in rejects/


@dataclass
class Group:
    """The steps of one source shard: rolled forward together or dropped together."""

    shard_id: str
    renames: list[Rename] = field(default_factory=list)


def _lock(store: Store, command: str):
    return output_lock(store.url(), command, storage=getattr(store, "storage", None))


def dedupe_keys(out: Store | str | Path) -> int:
    """Move later duplicates of kept keys to rejects/; returns how many rows moved in this call
    (including those of an interrupted pass it finished)."""
    store = as_store(out)
    with _lock(store, "duplicate-key pass"):  # re-entrant: a run calling this already holds it
        moved = _roll_forward(store, verify=True)
        _clear_leftovers(store)
        if _prepare(store):
            moved += _roll_forward(store, verify=False)
            _clear_leftovers(store)
    return moved


def recover(out: Store | str | Path) -> int:
    """Finish a pass that was killed and remove its leftovers, without starting a new one: a
    run calls this at its start, so nothing it (or a reader) sees in between is half a pass."""
    store = as_store(out)
    with _lock(store, "duplicate-key pass (recovery)"):
        moved = _roll_forward(store, verify=True)
        _clear_leftovers(store)
    return moved


def twins_of(out: Store | str | Path, shard_ids: set[str]) -> set[str]:
    """The shards holding ``duplicate_key`` rejects of keys that ``shard_ids`` keep: what must be
    curated again with them when they change, or those rejects would have no kept twin left."""
    store = as_store(out)
    manifest = Manifest(store)
    entries = [manifest.entry(s) for s in sorted(shard_ids) if store.exists(f"{MANIFEST}/{s}.json")]
    kept = [store.url(f) for e in entries for f in e.get("files", []) if f.startswith("shards/")]
    dupes = [f for f in committed_files(store, "rejects") if ".dupes-" in f.rsplit("/", 1)[-1]]
    if not kept or not dupes:
        return set()
    con = duckdb.connect()
    for statement in duckdb_setup(store):
        con.execute(statement)
    rows = con.execute(f"""
        SELECT DISTINCT filename FROM read_parquet({_sql_files(dupes)}, filename=true)
        WHERE reason = 'duplicate_key' AND key IN (SELECT key FROM read_parquet({_sql_files(kept)}))
    """).fetchall()
    return {_owner(name.removeprefix(store.url() + "/")) for (name,) in rows} - shard_ids


# -- plan and stage ---------------------------------------------------------------------------


def _sql_files(files: str | list[str]) -> str:
    quoted = [f"'{f.replace(chr(39), chr(39) * 2)}'" for f in ([files] if isinstance(files, str) else files)]
    return quoted[0] if isinstance(files, str) else f"[{', '.join(quoted)}]"


def _later_occurrences(store: Store) -> dict[str, list[int]]:
    """part (relative path) -> row numbers (in that file) of keys seen in an earlier place."""
    files = committed_glob(store, "shards")
    if files is None:
        return {}
    con = duckdb.connect()
    for statement in duckdb_setup(store):
        con.execute(statement)
    rows = con.execute(f"""
        SELECT filename, file_row_number FROM (
            SELECT filename, file_row_number,
                   row_number() OVER (PARTITION BY key ORDER BY filename, file_row_number) AS nth
            FROM read_parquet({_sql_files(files)}, filename=true, file_row_number=true)
        ) WHERE nth > 1 ORDER BY filename, file_row_number
    """).fetchall()
    found: dict[str, list[int]] = {}
    prefix = store.url() + "/"
    for filename, row in rows:
        found.setdefault(filename.removeprefix(prefix), []).append(row)
    return found


def _prepare(store: Store) -> bool:
    """Stage the pass and write its journal; False if there is nothing to do. On any failure
    (a full disk, say) what it wrote is removed before re-raising, so nothing visible changed."""
    try:
        groups = _stage_parts(store)
        _stage_manifests(store, groups)
        if not groups:
            return False
        _sync_tree(store, WORK)  # staged names durable before the journal points at them
        journal = [asdict(g) for g in groups.values()]
        store.write_bytes(f"{WORK}/{JOURNAL}", json.dumps(journal, indent=1).encode())
        store.sync_dir(WORK)
        return True
    except Exception as exc:  # a kill or Ctrl-C leaves them to the next run's recover()
        # pq.write_table keeps its file open after ENOSPC while the traceback lives: drop the
        # frames' locals, or the deleted file's space stays held by whoever keeps the exception.
        traceback.clear_frames(exc.__traceback__)
        store.delete_tree(WORK)
        raise


def _stage_parts(store: Store) -> dict[str, Group]:
    """Steps grouped by the source shard owning each part, as its manifest entry is per shard."""
    groups: dict[str, Group] = {}
    for part, rows in _later_occurrences(store).items():
        owner = _owner(part)
        groups.setdefault(owner, Group(owner)).renames += _stage_part(store, part, rows)
    return groups


def _stage_part(store: Store, part: str, rows: list[int]) -> list[Rename]:
    """The part without its later occurrences, then those rows as rejects: in that order, so
    applying them never shows a row in both folders."""
    table = pq.read_table(store.open_input_file(part))
    later = set(rows)
    drop = pa.array([i in later for i in range(table.num_rows)])
    dupes = table.filter(drop)
    group_rows = _row_group_rows(store, part)
    name = part.rsplit("/", 1)[-1]
    reject = f"rejects/{name.removesuffix('.parquet')}.dupes-{_keys_digest(dupes)}.parquet"
    return [_stage_table(store, part, table.filter(pc.invert(drop)), group_rows),
            _stage_table(store, reject, _as_rejects(dupes), group_rows, rows=len(rows))]


def _stage_table(store: Store, dst: str, table: pa.Table, group_rows: int, rows: int = 0) -> Rename:
    src = f"{WORK}/{dst}{STAGED}"
    store.write_parquet(src, table, group_rows)
    return _rename(store, src, dst, rows)


def _stage_manifests(store: Store, groups: dict[str, Group]) -> None:
    """The entry of every shard the pass touches (and of any whose file list is out of date)
    as it will be afterwards: counts and files read from the files it will then have."""
    entries = Manifest(store).entries()
    files = _files_by_owner(store, entries)
    for rename in [r for g in groups.values() for r in g.renames]:
        files.setdefault(_owner(rename.dst), {})[rename.dst] = rename.src
    for entry in entries:
        shard_id, after = entry["shard_id"], files.get(entry["shard_id"], {})
        if shard_id in groups or set(entry.get("files", [])) != set(after):
            Manifest(store.child(WORK)).record(shard_id, _entry_after(store, entry, after))  # same writer, _dedupe/
            name = f"{MANIFEST}/{shard_id}.json"
            groups.setdefault(shard_id, Group(shard_id)).renames.append(_rename(store, f"{WORK}/{name}", name))


def _entry_after(store: Store, entry: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    """``entry`` with kept, rejected, reasons and files as ``files`` (name -> where to read it
    now) say; the other fields (source, timings) stay."""
    kept = sum(pq.read_metadata(store.open_input_file(p)).num_rows
               for name, p in files.items() if name.startswith("shards/"))
    reasons = Counter(reason for name, p in files.items() if name.startswith("rejects/")
                      for reason in pq.read_table(store.open_input_file(p), columns=["reason"])["reason"].to_pylist())
    listed = [f for f in entry.get("files", []) if f in files]
    return entry | {"kept": kept, "rejected": sum(reasons.values()), "reasons": dict(reasons),
                    "files": listed + sorted(set(files) - set(listed))}


def _files_by_owner(store: Store, entries: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """name -> where to read it, per owning shard. Locally what the folders hold (outputs of the
    old in-place pass get their entries corrected); on an object store what the entries list, as
    a listing there may show an attempt that outlived its retry."""
    found: dict[str, dict[str, str]] = {}
    if store.renames:
        names = [e.rel for kind in KINDS for e in store.list(kind, ".parquet")]
    else:
        names = sorted({f for entry in entries for f in entry.get("files", [])})
    for name in names:
        found.setdefault(_owner(name), {})[name] = name
    return found


def _owner(rel: str) -> str:
    """Parts are ``{shard_id}.[{attempt}.]partNNNNN...parquet`` and shard ids hold no dot."""
    return rel.rsplit("/", 1)[-1].split(".", 1)[0]


def _row_group_rows(store: Store, part: str) -> int:
    """The part's own row group size (the run's ``output.row_group_rows``), kept on rewrite."""
    meta = pq.read_metadata(store.open_input_file(part))
    return max((meta.row_group(i).num_rows for i in range(meta.num_row_groups)), default=0) or ROW_GROUP_ROWS


def _keys_digest(rows: pa.Table) -> str:
    return hashlib.blake2b("\n".join(sorted(rows["key"].to_pylist())).encode(), digest_size=6).hexdigest()


def _as_rejects(rows: pa.Table) -> pa.Table:
    base = {f.name for f in KEPT_BASE}
    schema = reject_schema(f for f in rows.schema if f.name not in base)
    n = rows.num_rows
    extra = {"reason": pa.array(["duplicate_key"] * n),
             "error": pa.array(["key already kept from an earlier shard"] * n)}
    return pa.table({f.name: extra[f.name] if f.name in extra else rows[f.name] for f in schema}, schema=schema)


# -- commit -----------------------------------------------------------------------------------


def _roll_forward(store: Store, verify: bool) -> int:
    """Apply the journal, if there is one; every step is a rename that is skipped once done, so
    a call killed here is finished by the next. ``verify`` (a journal left by an earlier call)
    first checks each shard's targets are still the files the pass planned against."""
    journal = f"{WORK}/{JOURNAL}"
    if not store.exists(journal):
        return 0
    if verify:
        log.info("finishing the duplicate-key pass an earlier call left half done")
    groups = [Group(g["shard_id"], [Rename(**r) for r in g["renames"]]) for g in json.loads(store.read_bytes(journal))]
    moved = sum(_apply(store, g) for g in groups if not verify or _as_planned(store, g))
    for folder in (*KINDS, MANIFEST):
        store.sync_dir(folder)
    store.delete(journal)
    return moved


def _as_planned(store: Store, group: Group) -> bool:
    """Each target is still the file the pass planned against (step to do), the file it put
    there (step done), or, on an object store, the new file with the staged one not yet deleted
    (a copy done, its delete not). A shard redone since fails this and is left to the new plan."""
    for r in group.renames:
        staged = store.exists(r.src)
        if _digest(store, r.dst) not in ({r.old, r.new} if staged else {r.new}):
            log.warning("shard %s changed since the duplicate-key pass was planned (%s): planning it again",
                        group.shard_id, r.dst)
            return False
    return True


def _apply(store: Store, group: Group) -> int:
    """The group's renames not yet done, in journal order; returns the duplicate rows published."""
    moved = 0
    for r in group.renames:
        if store.exists(r.src):
            store.replace(r.src, r.dst)
            moved += r.rows
    return moved


def _clear_leftovers(store: Store) -> None:
    """Remove what killed attempts left: the work folder (only after its journal is applied),
    and ``.{name}.tmp-{pid}`` files of local atomic writes (the old in-place pass left them in
    shards/ and rejects/, a manifest write in _manifest/). No reader sees them, but nothing else
    removes them. Runs at the end of a run, under its lock, when no shard is being written."""
    store.delete_tree(WORK)
    if not store.renames:
        return
    for folder in (*KINDS, MANIFEST):
        for tmp in Path(store.path(folder)).glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def _rename(store: Store, src: str, dst: str, rows: int = 0) -> Rename:
    return Rename(src, dst, _digest(store, dst), _digest(store, src), rows)


def _digest(store: Store, rel: str) -> str | None:
    """Content hash, None if there is no file: which version of a file is in place, whatever
    copy or rename it went through."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with store.open_input_stream(rel) as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _sync_tree(store: Store, rel: str) -> None:
    """Local only: the staged files' folders, and the work folder's own entry, on disk."""
    if not store.renames:
        return
    root = Path(store.path(rel))
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        store.sync_dir(str(folder.relative_to(store.path())))
    store.sync_dir("")
