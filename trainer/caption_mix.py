"""What the trainer mixes, said at start: before this, a run whose machine captions were missing
(no caption set, a set named otherwise, an English-only set) trained on originals only and said
nothing, so Kolors' 50:50 mix was silently 100:0.

``check_caption_set`` refuses a caption set the config names that is beside none of the shards'
curated outputs, naming the sets that are there; it runs before any model loads. The default set
(``captions``, not written in the config) may be missing: that is a warning, so curating and
then training with no caption pass in between still works. ``caption_mix`` counts what the
ShardReader will read for the selected rows (the caption set's column where the part's sidecar
has it, else the shard's own) and gives the expected original/machine share of the prompts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa

from trainer.captions import CaptionConfig
from trainer.row_index import RowIndex, _quote, connect, sidecar_sets

log = logging.getLogger(__name__)

HAS_TEXT = r"coalesce(regexp_matches({}, '\S'), false)"  # choose_caption strips: blank is none


@dataclass
class CaptionMix:
    """The selected rows' captions and the share of prompts each kind is expected to make up
    (before dropout, which turns ``dropout`` of all prompts into "")."""

    language: str
    column: str | None  # the machine-caption column for ``language``
    sidecar_set: str | None
    sets: list[str]  # the sidecar sets beside the shards
    rows: int  # selected
    synthetic_rows: int  # keep their own caption
    machine_rows: int  # not synthetic, with a machine caption in ``language``
    machine_only_rows: int  # of those, without an original caption: always the machine one
    machine_probability: float
    dropout: float
    sidecar_parts: int = 0  # files of the selection with a current sidecar of the set
    column_parts: int = 0  # of those, sidecars that hold ``column``
    machine_share: float = field(init=False)
    original_share: float = field(init=False)
    report: str = field(init=False)  # the start-of-run log line
    warning: str | None = field(init=False)  # why it is originals only though machine captions are asked for

    def __post_init__(self) -> None:
        p = self.machine_probability if self.column else 0.0
        both = self.machine_rows - self.machine_only_rows
        self.machine_share = round((p * both + self.machine_only_rows) / self.rows, 4) if self.rows else 0.0
        self.original_share = round(1.0 - self.machine_share, 4)
        self.report, self.warning = self._line(), self._problem()

    def _line(self) -> str:
        source = (self.column or "no column") + (f", caption set {self.sidecar_set!r}" if self.sidecar_set else "")
        return (f"captions: {self.machine_rows} of {self.rows} selected rows have a {self.language} machine caption "
                f"({source}), {self.synthetic_rows} synthetic keep their own; expected original:machine "
                f"{self.original_share:.0%}:{self.machine_share:.0%} (machine_probability "
                f"{self.machine_probability:g}), dropout {self.dropout:.0%}")

    def _problem(self) -> str | None:
        if self.machine_probability == 0 or self.rows == self.synthetic_rows or self.machine_rows:
            return None
        fix = "; set data.caption.machine_probability: 0 to train on original captions on purpose"
        if self.column is None:
            return f"no machine-caption column for language {self.language!r} (data.caption.machine_columns){fix}"
        if self.sidecar_set and self.sidecar_set not in self.sets:
            there = ", ".join(self.sets) or "none"
            return (f"no caption set {self.sidecar_set!r} beside the shards (sidecar sets there: {there}): "
                    f"run t2i caption for machine captions, or name the set in data.caption.sidecar_set{fix}")
        if self.sidecar_set and not self.sidecar_parts:
            return (f"caption set {self.sidecar_set!r} has no current sidecar for the selected rows' parts "
                    f"(not captioned yet, or changed since): run t2i caption{fix}")
        if self.sidecar_set and not self.column_parts:
            return (f"caption set {self.sidecar_set!r} holds no {self.column} column (an English-only set, captioned "
                    f"without a translator?): caption with a translator, or set data.caption.language{fix}")
        if self.sidecar_set:
            return f"caption set {self.sidecar_set!r} gives none of the rows a {self.column} caption{fix}"
        return f"no selected row has a {self.column} caption (data.caption.sidecar_set is null){fix}"


def check_caption_set(files: list[str], cfg: CaptionConfig) -> list[str]:
    """The sidecar sets beside ``files``; a set the config names that is not among them is an
    error naming it (unless the mix is originals only), raised before any model loads."""
    sets = sidecar_sets(files)
    named = "sidecar_set" in cfg.model_fields_set and cfg.sidecar_set
    if named and cfg.machine_probability > 0 and cfg.sidecar_set not in sets:
        raise ValueError(f"data.caption.sidecar_set: no caption set {cfg.sidecar_set!r} beside the shards' curated "
                         f"outputs; the sidecar sets there: {', '.join(sets) or 'none (run t2i caption)'}. "
                         "Set data.caption.machine_probability: 0 to train on original captions only")
    return sets


def caption_mix(index: RowIndex, cfg: CaptionConfig, sets: list[str]) -> CaptionMix:
    """The mix of ``index``'s rows (``sets`` as ``check_caption_set`` found them)."""
    synthetic, machine, machine_only, column_parts = _counts(index, cfg)
    return CaptionMix(cfg.language, cfg.machine_column, cfg.sidecar_set, sets, len(index), synthetic, machine,
                      machine_only, cfg.machine_probability, cfg.dropout,
                      sum(s is not None for s in index.sidecars), column_parts)


def report_caption_mix(mix: CaptionMix) -> None:
    """The report as a log line: a warning where the config asks for machine captions and gets none."""
    if mix.warning:
        log.warning("%s: training on original captions only (100:0). %s", mix.report, mix.warning)
    else:
        log.info("%s", mix.report)


def _counts(index: RowIndex, cfg: CaptionConfig) -> tuple[int, int, int, int]:
    """(synthetic, machine, machine-only) rows of ``index`` and the sidecars holding the machine
    column, as ShardReader reads them: a part's sidecar column where its current sidecar has it,
    else the shard's own column."""
    files = index.files
    sidecars = [s for s in index.sidecars if s]
    con = connect(files + sidecars)
    con.register("sel", pa.table({"file": index.file, "file_row": index.row}))
    src = "read_parquet($files, filename=true, file_row_number=true, union_by_name=true)"
    params: dict = {"files": files}
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}", params).fetchall()}

    def column(name: str | None, cast: str) -> str:
        return f"TRY_CAST(s.{_quote(name)} AS {cast})" if name in have else f"NULL::{cast}"

    col = cfg.machine_column
    beside: list[tuple[str, str]] = []  # (shard, sidecar) where the sidecar has the column
    if col and sidecars:
        with_col = {f for (f,) in con.execute("SELECT DISTINCT file_name FROM parquet_schema($sc) WHERE name = $c",
                                              {"sc": sidecars, "c": col}).fetchall()}
        beside = [(f, s) for f, s in zip(files, index.sidecars, strict=True) if s in with_col]
    machine, join = column(col, "VARCHAR"), ""
    if beside:
        params |= {"sh": [f for f, _ in beside], "sc": [s for _, s in beside]}
        join = ("LEFT JOIN (SELECT unnest($sh) AS shard, unnest($sc) AS sidecar) m ON s.filename = m.shard "
                f"LEFT JOIN (SELECT filename, key, TRY_CAST({_quote(col)} AS VARCHAR) AS machine "
                "FROM read_parquet($sc, filename=true, union_by_name=true)) c "
                "ON c.filename = m.sidecar AND c.key = s.key")
        machine = f"CASE WHEN m.shard IS NULL THEN {machine} ELSE c.machine END"
    rows = (f"SELECT coalesce({column(cfg.synthetic_column, 'BOOLEAN')}, false) AS synthetic, "
            f"{HAS_TEXT.format(column(cfg.original_column, 'VARCHAR'))} AS original, "
            f"{HAS_TEXT.format(machine)} AS machine "
            f"FROM {src} s JOIN (SELECT unnest($files) AS filename, unnest(range(len($files))) AS file) f "
            "ON s.filename = f.filename JOIN sel ON sel.file = f.file AND sel.file_row = s.file_row_number " + join)
    found = con.execute("SELECT count(*) FILTER (WHERE synthetic), count(*) FILTER (WHERE machine AND NOT synthetic), "
                        f"count(*) FILTER (WHERE machine AND NOT synthetic AND NOT original) FROM ({rows})",
                        params).fetchone()
    return int(found[0]), int(found[1]), int(found[2]), len(beside)
