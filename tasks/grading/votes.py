"""The votes of the built-in grading page: one SQLite file, ``GDIR/votes.sqlite``.

``votes(key, grader, grade, at)`` holds one vote per (image, grader): a grader who grades an image again
replaces their vote (last change wins). ``skips(key, grader, at)`` holds the images a grader passed over
(a later grade of the same image removes the skip). The database is in WAL mode, so the page's readers do
not block its writer; every call opens its own connection (one per request, whatever thread serves it)
with a busy timeout, and a vote is committed before the call returns.

The images and their order come from ``GDIR/batch.parquet`` (its ``key`` column only), read again when
the file changes (a new round exported while the page runs).

Agreement (``agreement``): for every pair of graders, over the images both graded, the share of exact
agreement, the share within one level, and Cohen's kappa with quadratic weights; over all graders,
Krippendorff's alpha on the images with at least two votes, with the interval metric (the levels as
numbers 1-5; the headline figure) and with the ordinal metric (the levels only as ranks), both from the
coincidence matrix as in Krippendorff, "Computing Krippendorff's Alpha-Reliability" (2011).
"""

from __future__ import annotations

import datetime
import itertools
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.grading import BATCH, GRADES_SCHEMA, VOTES_DB

BUSY_TIMEOUT_MS = 10_000
GRADES = range(1, 6)
# the prefix of every Label Studio grader's name (``t2i grade import``): a page grader may not take one, or
# their votes would be counted as one grader's in the agreement figures (a store holding one still reads)
LABEL_STUDIO_GRADERS = "labelstudio:"

SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    key TEXT NOT NULL,
    grader TEXT NOT NULL,
    grade INTEGER NOT NULL CHECK (grade BETWEEN 1 AND 5),
    at TEXT NOT NULL,
    PRIMARY KEY (key, grader)
);
CREATE TABLE IF NOT EXISTS skips (
    key TEXT NOT NULL,
    grader TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (key, grader)
);
"""


class VoteError(ValueError):
    """A vote that cannot be stored: its text says why (the page shows it)."""


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_vote(key: Any, grader: Any, grade: Any = 1) -> tuple[str, str, int]:
    """The vote as stored (grader name trimmed), or ``VoteError``; the key is checked by the caller."""
    if not isinstance(key, str) or not key:
        raise VoteError("key must be a non-empty string")
    if not isinstance(grader, str) or not grader.strip():
        raise VoteError("grader must be a non-empty name")
    if len(grader.strip()) > 100:
        raise VoteError("grader name is longer than 100 characters")
    if grader.strip().lower().startswith(LABEL_STUDIO_GRADERS):
        raise VoteError(f"names starting with {LABEL_STUDIO_GRADERS!r} are Label Studio's graders: choose another")
    if isinstance(grade, bool) or not isinstance(grade, int):
        raise VoteError(f"grade must be an integer from 1 to 5, not {grade!r}")
    if grade not in GRADES:
        raise VoteError(f"grade must be from 1 to 5, not {grade}")
    return key, grader.strip(), grade


class VoteStore:
    """The votes of one grading workspace (``gdir``); safe to share between threads."""

    def __init__(self, gdir: str | Path, *, db: str | Path | None = None):
        self.gdir = Path(gdir)
        self.db = Path(db) if db is not None else self.gdir / VOTES_DB
        self._keys: list[str] = []
        self._index: dict[str, int] = {}
        self._batch_stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.db.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own for one call: committed on leaving, closed always."""
        con = sqlite3.connect(self.db, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            con.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable at each commit's checkpoint
            yield con
        finally:
            con.close()

    # -- the batch ---------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """The batch's keys in batch order (``batch.parquet`` read again when it changes)."""
        path = self.gdir / BATCH
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._batch_stamp:
                keys = pq.read_table(path, columns=["key"]).column("key").to_pylist() if stamp else []
                self._keys = list(dict.fromkeys(keys))
                self._index = {k: i for i, k in enumerate(self._keys)}
                self._batch_stamp = stamp
            return self._keys

    def has(self, key: str) -> bool:
        self.keys()
        return key in self._index

    # -- writing -----------------------------------------------------------------------------------

    def record(self, key: str, grader: str, grade: int) -> dict[str, Any]:
        """Store one vote now (replacing this grader's earlier vote on the image); ``VoteError`` if the
        grade is not an integer 1-5, the grader has no name or the key is not in the batch."""
        key, grader, grade = check_vote(key, grader, grade)
        if not self.has(key):
            raise VoteError(f"unknown key {key!r}: not in this workspace's batch")
        at = now()
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO votes (key, grader, grade, at) VALUES (?, ?, ?, ?) ON CONFLICT (key, grader) "
                        "DO UPDATE SET grade = excluded.grade, at = excluded.at", (key, grader, grade, at))
            con.execute("DELETE FROM skips WHERE key = ? AND grader = ?", (key, grader))
            con.execute("COMMIT")
        return {"key": key, "grader": grader, "grade": grade, "at": at}

    def skip(self, key: str, grader: str) -> dict[str, Any]:
        """This grader passes over the image (a vote they gave it stays)."""
        key, grader, _ = check_vote(key, grader)
        if not self.has(key):
            raise VoteError(f"unknown key {key!r}: not in this workspace's batch")
        at = now()
        with self.connect() as con:
            con.execute("INSERT OR REPLACE INTO skips (key, grader, at) VALUES (?, ?, ?)", (key, grader, at))
        return {"key": key, "grader": grader, "skipped": True, "at": at}

    # -- reading -----------------------------------------------------------------------------------

    def votes(self, grader: str | None = None) -> list[dict[str, Any]]:
        """Every vote (or one grader's), by key then grader."""
        sql, args = "SELECT key, grader, grade, at FROM votes", ()
        if grader is not None:
            sql, args = sql + " WHERE grader = ?", (grader.strip(),)
        with self.connect() as con:
            rows = con.execute(sql + " ORDER BY key, grader", args).fetchall()
        return [{"key": k, "grader": g, "grade": v, "at": at} for k, g, v, at in rows]

    def grade_of(self, key: str, grader: str) -> int | None:
        with self.connect() as con:
            row = con.execute("SELECT grade FROM votes WHERE key = ? AND grader = ?", (key, grader.strip())).fetchone()
        return row[0] if row else None

    def skipped(self, key: str, grader: str) -> bool:
        with self.connect() as con:
            return con.execute("SELECT 1 FROM skips WHERE key = ? AND grader = ?", (key, grader.strip())).fetchone() \
                is not None

    def history(self, grader: str) -> list[str]:
        """The batch's keys this grader graded or skipped, in batch order (what going back walks)."""
        keys = self.keys()
        with self.connect() as con:
            seen = {r[0] for r in con.execute("SELECT key FROM votes WHERE grader = ? UNION SELECT key FROM skips "
                                              "WHERE grader = ?", (grader.strip(), grader.strip()))}
        return [k for k in keys if k in seen]

    def progress(self, grader: str) -> dict[str, int]:
        """This grader's counts over the batch: graded, skipped, total (the batch's images) and waiting
        (images they have neither graded nor skipped; some may already have enough votes from others)."""
        keys = self.keys()
        index = self._index
        with self.connect() as con:
            graded = {r[0] for r in con.execute("SELECT key FROM votes WHERE grader = ?", (grader.strip(),))}
            skipped = {r[0] for r in con.execute("SELECT key FROM skips WHERE grader = ?", (grader.strip(),))}
        graded &= index.keys()
        skipped = (skipped & index.keys()) - graded
        return {"graded": len(graded), "skipped": len(skipped), "total": len(keys),
                "waiting": len(keys) - len(graded) - len(skipped)}

    def next_for(self, grader: str, votes_per_image: int = 3) -> str | None:
        """The first image, in batch order, this grader has neither graded nor skipped that has fewer than
        ``votes_per_image`` votes; None when there is none."""
        keys = self.keys()
        with self.connect() as con:
            mine = {r[0] for r in con.execute("SELECT key FROM votes WHERE grader = ? UNION SELECT key FROM skips "
                                              "WHERE grader = ?", (grader.strip(), grader.strip()))}
            counts = dict(con.execute("SELECT key, count(*) FROM votes GROUP BY key").fetchall())
        for key in keys:
            if key not in mine and counts.get(key, 0) < votes_per_image:
                return key
        return None

    def agreement(self) -> dict[str, Any]:
        """Agreement between graders over the batch's votes (see the module's text for the figures)."""
        return agreement(self.votes())

    def grades_table(self) -> pa.Table:
        """Every vote as rows of ``GRADES_SCHEMA`` (origin "page"), for ``t2i grade import``."""
        rows = self.votes()
        times = [datetime.datetime.fromisoformat(v["at"].replace("Z", "+00:00")) for v in rows]
        return pa.table({"key": [v["key"] for v in rows], "grader": [v["grader"] for v in rows],
                         "grade": [v["grade"] for v in rows], "time": times, "origin": ["page"] * len(rows)},
                        schema=GRADES_SCHEMA)


# -- agreement -------------------------------------------------------------------------------------


def agreement(votes: list[dict[str, Any]]) -> dict[str, Any]:
    """From votes (dicts with key, grader, grade): per pair of graders ``n`` (images both graded), ``exact``,
    ``within_one`` and ``kappa_quadratic``; overall ``alpha_interval`` and ``alpha_ordinal`` (Krippendorff)
    over the ``units`` (images) with at least two votes. A figure that cannot be computed is None."""
    by_key: dict[str, dict[str, int]] = defaultdict(dict)
    for v in votes:
        by_key[v["key"]][v["grader"]] = int(v["grade"])
    graders = sorted({g for grades in by_key.values() for g in grades})
    pairs = []
    for a, b in itertools.combinations(graders, 2):
        both = [(g[a], g[b]) for g in by_key.values() if a in g and b in g]
        n = len(both)
        pairs.append({"a": a, "b": b, "n": n,
                      "exact": sum(x == y for x, y in both) / n if n else None,
                      "within_one": sum(abs(x - y) <= 1 for x, y in both) / n if n else None,
                      "kappa_quadratic": weighted_kappa(both) if n else None})
    units = [list(g.values()) for g in by_key.values() if len(g) >= 2]
    return {"graders": graders, "votes": len(votes), "images": len(by_key), "units": len(units),
            "pairs": pairs,
            "alpha_interval": krippendorff_alpha(units, "interval"),
            "alpha_ordinal": krippendorff_alpha(units, "ordinal"),
            "statistic": "Krippendorff's alpha, interval metric (ordinal beside it), over images with >= 2 votes"}


def krippendorff_alpha(units: list[list[int]], metric: str = "interval") -> float | None:
    """Krippendorff's alpha over units (each the values its graders gave; a unit with fewer than two values
    is left out); ``metric`` "interval" ((c - k)^2) or "ordinal" (the squared count of values from c to k,
    less half of each end). None when there is no disagreement to expect (fewer than two values pairable,
    or all values the same)."""
    units = [u for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    if len(values) < 1:
        return None
    # coincidence matrix o[c][k]: each ordered pair of values within a unit, weighted 1 / (m_u - 1)
    o: dict[tuple[int, int], float] = defaultdict(float)
    for u in units:
        m = len(u)
        for i, j in itertools.permutations(range(m), 2):
            o[(u[i], u[j])] += 1 / (m - 1)
    n_c = {c: sum(o[(c, k)] for k in values) for c in values}
    n = sum(n_c.values())
    if n <= 1:
        return None
    delta = _metric(metric, values, n_c)
    observed = sum(o[(c, k)] * delta(c, k) for c in values for k in values)
    expected = sum(n_c[c] * n_c[k] * delta(c, k) for c in values for k in values) / (n - 1)
    if expected == 0:
        return None
    return 1 - observed / expected


def _metric(metric: str, values: list[int], n_c: dict[int, float]) -> Callable[[int, int], float]:
    if metric == "interval":
        return lambda c, k: float((c - k) ** 2)
    if metric == "ordinal":
        def ordinal(c: int, k: int) -> float:
            lo, hi = min(c, k), max(c, k)
            between = sum(n_c[g] for g in values if lo <= g <= hi)
            return (between - (n_c[lo] + n_c[hi]) / 2) ** 2
        return ordinal
    raise ValueError(f"unknown metric {metric!r} (interval or ordinal)")


def weighted_kappa(pairs: list[tuple[int, int]], levels: range = GRADES) -> float | None:
    """Cohen's kappa with quadratic weights for two graders' grades on the same images; None when the
    expected disagreement is 0 (both gave one and the same grade throughout)."""
    n = len(pairs)
    if not n:
        return None
    lv = list(levels)
    span = (lv[-1] - lv[0]) ** 2 or 1
    rows = {c: sum(a == c for a, _ in pairs) / n for c in lv}
    cols = {c: sum(b == c for _, b in pairs) / n for c in lv}
    observed = sum((a - b) ** 2 / span for a, b in pairs) / n
    expected = sum(rows[c] * cols[k] * (c - k) ** 2 / span for c in lv for k in lv)
    if expected == 0:
        return None
    return 1 - observed / expected
