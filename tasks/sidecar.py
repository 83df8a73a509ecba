"""A pass over a curated output's parts that writes sidecar Parquet files: the shards are never rewritten.

Layout, under the curated output (a local folder or an object-store prefix)::

    {set}/{part}.parquet            one per part of shards/: key plus the stages' columns, row for row
    {set}/_manifest/{part}.json     written last: this part is done (rows, errors, the part's size)
    {set}/_partial/{part}/size-N/gNNNNN.parquet   one per row group of a part in progress (N: the part's
                                                  size): a kill loses at most one
    {set}/_run.json                 what makes the set (model, prompt, ...): a rerun that differs is refused

A sidecar has the part's keys in the part's order and row groups of the part's sizes, so a reader
of row group g of a part reads row group g of its sidecar (the trainer does), and DuckDB joins
them ``USING (key)``. Every row read is written: a row a stage failed on has nulls and the error.

A rerun skips parts whose manifest entry matches the part as it is now; a part a later
``t2i curate`` added is done; a part that changed (recurated, or rewritten by the key pass) is
done again; a sidecar whose part is gone is removed, so a glob of ``{set}/*.parquet`` matches the
shards. The pass holds the output's lock (tasks/lock.py), as curation does.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.config import ConfigError, DecodeConfig, RunConfig, StorageConfig, config_differences
from tasks.actors import ErrorRate, ItemError, Pools, Resources, call_splitting_on_oom, infer_on_pool
from tasks.decode import describe
from tasks.shards import committed_files
from tasks.stage import Stage
from tasks.storage import Store, as_store
from tasks.storage_retry import retries_counted

log = logging.getLogger(__name__)

PART_MANIFEST = "_manifest"
PARTIAL = "_partial"
SET_STAMP = "_run.json"
ERROR_FIELD = pa.field("caption_error", pa.string())

class SetChanged(ConfigError):
    """The set's folder holds output made with other settings: a rerun would mix two sets."""


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    resources: Resources
    request_rows: int
    batch_size: int


@dataclass(frozen=True)
class SidecarPass:
    """One kind of pass: its set's folder, its stages in order, and what defines the set."""

    name: str
    stages: tuple[StagePlan, ...]
    definition: dict[str, Any]  # stamped; a rerun that differs here is refused
    error_field: pa.Field = ERROR_FIELD
    run: RunConfig = field(default_factory=RunConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("key", pa.string()), *(f for p in self.stages for f in p.stage.writes),
                          self.error_field])

    def reads(self) -> list[str]:
        """The part's columns a pass reads (an earlier stage's columns come from the stage)."""
        written = {f.name for p in self.stages for f in p.stage.writes}
        return ["key", *dict.fromkeys(c for p in self.stages for c in p.stage.reads if c not in written)]


@dataclass(frozen=True)
class Part:
    """One committed part of ``shards/``; ``shard_id`` is its file stem (the dispatcher's unit id)."""

    shard_id: str
    rel: str
    size: int

    @property
    def identity(self) -> dict[str, Any]:
        return {"rel": self.rel, "size": self.size}


@dataclass
class PartResult:
    shard_id: str
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # per stage
    file: str = ""
    part: dict[str, Any] = field(default_factory=dict)
    resumed_groups: int = 0  # row groups taken from an earlier attempt's checkpoints
    seconds: float = 0.0
    storage_retries: int = 0  # storage calls tried again after a transient error, up to the commit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_parts(store: Store) -> list[Part]:
    """The committed parts of ``shards/``, by name (the manifest's list on an object store)."""
    parts = []
    root = store.url()
    for url in committed_files(store, "shards"):
        rel = url.removeprefix(root).lstrip("/") if url.startswith(root) else url
        info = store.info(rel)
        if info is None:
            continue
        parts.append(Part(rel.rsplit("/", 1)[-1].removesuffix(".parquet"), rel, info.size))
    return sorted(parts, key=lambda p: p.shard_id)


def guard_set(store: Store, spec: SidecarPass, *, write: bool) -> None:
    """Refuse a set made with other settings, naming them; stamp a new set (``write``)."""
    rel = f"{spec.name}/{SET_STAMP}"
    if store.exists(rel):
        before = json.loads(store.read_bytes(rel))
        differ = config_differences(before, spec.definition)
        if differ:
            raise SetChanged(
                f"{store.url(spec.name)} holds a set made with other settings ({', '.join(differ)} differ); "
                f"set output.name to a new set name to write a second set beside it, or remove "
                f"{store.url(spec.name)} to start over")
    elif write:
        store.write_bytes(rel, json.dumps(spec.definition, indent=1, sort_keys=True).encode())


def plan_parts(store: Store, spec: SidecarPass, parts: list[Part]) -> list[Part]:
    """The parts to do. A sidecar whose part is gone or changed is removed first (a changed part
    is then done again), so the set never holds rows of a part as it was before."""
    current = {p.shard_id: p for p in parts}
    done = set()
    for entry in store.list(f"{spec.name}/{PART_MANIFEST}", ".json"):
        stem = entry.rel.rsplit("/", 1)[-1].removesuffix(".json")
        recorded = json.loads(store.read_bytes(entry.rel))
        if stem in current and recorded.get("part") == current[stem].identity:
            done.add(stem)
            continue
        why = "is no longer in shards/" if stem not in current else "changed since it was done"
        log.warning("part %s %s: its %s sidecar is removed%s", stem, why, spec.name,
                    " and made again" if stem in current else "")
        # the file first, the entry last: a kill in between leaves an entry that no longer matches, which
        # the next run removes the same way (the other order would leave a file no entry names, for good)
        store.delete(f"{spec.name}/{stem}.parquet")
        store.delete_tree(f"{spec.name}/{PARTIAL}/{stem}")
        store.delete(entry.rel)
    # checkpoints of parts gone since, done (a kill between a part's commit and its clean-up), or of
    # another version of the part (recurated with the same keys before it was ever committed)
    found = {tuple(e.rel.split("/")[2:4]) for e in store.list(f"{spec.name}/{PARTIAL}", ".parquet", recursive=True)}
    for stem, version in found:
        if stem not in current or stem in done:
            store.delete_tree(f"{spec.name}/{PARTIAL}/{stem}")
        elif version != checkpoint_version(current[stem]):
            store.delete_tree(f"{spec.name}/{PARTIAL}/{stem}/{version}")
    return [p for p in parts if p.shard_id not in done]


def checkpoint_version(part: Part) -> str:
    """The folder a part's checkpoints go in, named by the part's size: checkpoints of an earlier
    version of the part (same name, same keys, other rows) are never taken for this one's."""
    return f"size-{part.size}"


def process_part(part: Part, pools: Pools | None, spec: SidecarPass, out: str,
                 progress: Callable[[int], None] | None = None) -> PartResult:
    """One part: every row group through the stages (or from its checkpoint), then the sidecar,
    then its manifest entry (the commit)."""
    started = time.perf_counter()
    store = as_store(out, spec.storage)
    result = PartResult(part.shard_id, part=part.identity)
    pf = pq.ParquetFile(store.open_input_file(part.rel))
    columns = [c for c in spec.reads() if c in pf.schema_arrow.names]
    counts = ErrorRate("stage", "part")
    tables = []
    for g in range(pf.metadata.num_row_groups):
        keys = pf.read_row_group(g, columns=["key"]).column("key")
        ckpt = f"{spec.name}/{PARTIAL}/{part.shard_id}/{checkpoint_version(part)}/g{g:05d}.parquet"
        table = _checkpoint(store, ckpt, keys, spec.schema)
        if table is None:
            table = run_stages(pf.read_row_group(g, columns=columns), spec, pools, counts)
            store.write_parquet(ckpt, table, max(1, table.num_rows))
        else:
            result.resumed_groups += 1
            count_checkpoint(counts, table, spec)
        tables.append(table)
        counts.check(spec.run.max_signal_error_fraction)
        if progress:
            progress(table.num_rows)
    counts.check(spec.run.max_signal_error_fraction, whole=True)
    result.rows = sum(t.num_rows for t in tables)
    if result.rows != pf.metadata.num_rows:
        raise RuntimeError(f"{part.rel}: {pf.metadata.num_rows} rows read but {result.rows} written")
    result.file = f"{spec.name}/{part.shard_id}.parquet"
    _write_groups(store, result.file, tables, spec.schema)
    result.errors = dict(counts.failed)
    result.seconds = round(time.perf_counter() - started, 3)
    result.storage_retries = retries_counted()
    store.write_bytes(f"{spec.name}/{PART_MANIFEST}/{part.shard_id}.json", json.dumps(result.to_dict()).encode())
    store.delete_tree(f"{spec.name}/{PARTIAL}/{part.shard_id}")
    return result


def _checkpoint(store: Store, rel: str, keys: pa.ChunkedArray, schema: pa.Schema) -> pa.Table | None:
    """An earlier attempt's row group, if it is whole and for these very keys (else redone)."""
    if not store.exists(rel):
        return None
    try:
        table = pq.read_table(store.open_input_file(rel))
    except Exception:  # a torn or foreign file: do the group again
        return None
    if table.schema != schema or table.column("key").to_pylist() != keys.to_pylist():
        return None
    return table


def _write_groups(store: Store, rel: str, tables: list[pa.Table], schema: pa.Schema) -> None:
    """One row group per part row group, so row group g of the sidecar is row group g of the part.
    Written from ``tables`` (in memory), so a write the store fails is done again whole."""
    def fill(fh: Any) -> None:
        writer = pq.ParquetWriter(fh, schema, compression="zstd")
        for table in tables:
            if table.num_rows:
                writer.write_table(table, row_group_size=table.num_rows)
        writer.close()

    store.write(rel, fill)


def count_checkpoint(errors: ErrorRate, table: pa.Table, spec: SidecarPass) -> None:
    """A row group taken from its checkpoint counts as if it had just run: each stage ran on the rows
    no earlier stage failed on (stages that did not want a row cannot be told apart: counted too)."""
    failed = [e for e in table.column(spec.error_field.name).to_pylist() if e]
    alive = table.num_rows
    for plan in spec.stages:
        mine = [e for e in failed if e.split(":", 1)[0] == plan.stage.name]
        errors.tried[plan.stage.name] += alive
        for e in mine:
            errors.fail(plan.stage.name, e.split(": ", 1)[-1])
        alive -= len(mine)


def run_stages(batch: pa.Table, spec: SidecarPass, pools: Pools | None, counts: ErrorRate) -> pa.Table:
    """One row group through every stage: a row a stage fails on keeps nulls from there on and
    its error; the others go on to the next stage."""
    rows = batch.to_pylist()
    values: list[dict[str, Any]] = [{"key": r["key"]} for r in rows]
    errors: list[str | None] = [None] * len(rows)
    for plan in spec.stages:
        stage = plan.stage
        todo = [i for i in range(len(rows)) if errors[i] is None and stage.wants({**rows[i], **values[i]})]
        prepared, ready = [], []
        for i in todo:
            try:
                prepared.append(stage.prepare({**rows[i], **values[i]}))
                ready.append(i)
            except Exception as exc:
                errors[i] = f"{stage.name}: {describe(exc)}"
                counts.fail(stage.name, describe(exc))
        counts.tried[stage.name] += len(todo)
        results = (infer_on_pool(pools[stage.name], prepared, plan.request_rows) if pools is not None
                   else infer_here(stage, prepared, plan.batch_size))
        for i, res in zip(ready, results, strict=True):
            if isinstance(res, ItemError):
                errors[i] = f"{stage.name}: {res.error}"
                counts.fail(stage.name, res.error)
            else:
                values[i].update(res)
    for v, e in zip(values, errors, strict=True):
        v[spec.error_field.name] = e
    return pa.Table.from_pylist(values, schema=spec.schema)


_LOADED: dict[str, Stage] = {}


def infer_here(stage: Stage, inputs: list[Any], batch_size: int) -> list[dict[str, Any] | ItemError]:
    """Without Ray (tests, ``--no-ray``): the stage's model in this process, loaded once; a batch
    that raises is done row by row, so one bad row is that row's error."""
    key = f"{type(stage).__qualname__}:{json.dumps(stage.params.model_dump(mode='json'), sort_keys=True)}"
    model = _LOADED.setdefault(key, stage)
    model.ensure_setup()
    out: list[dict[str, Any] | ItemError] = []
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i : i + batch_size]
        try:
            out += call_splitting_on_oom(model.infer, chunk)
        except Exception:
            for item in chunk:
                try:
                    out += model.infer([item])
                except Exception as exc:
                    out.append(ItemError(describe(exc)))
    return out
