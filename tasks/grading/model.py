"""A model that carries the five levels from the graded sample to the whole pool.

``fit_grades`` joins the grades (``GRADES_SCHEMA``: one row per vote) to a curated output's rows by
key and fits a multinomial logistic regression (softmax, L2, L-BFGS from scipy) from the rows'
numeric signals to the level. No CLIP embedding is stored in the shards (the aesthetic signal
keeps only its score), so the features are the signal vector: every numeric column of the shards
that is a signal (``width``, ``sharpness``, ``quality``, ``aesthetic``, ...), not the row's
bookkeeping (``bucket_*``, ``phash``).

* Votes: an image's level is the **median** of its votes; where the two middle votes differ (an
  even count) the half is rounded **down**, to the stricter level, so a 3/4 split does not pass a
  ``quality_level >= 4`` selection. Votes outside 1..5 are an error.
* Features: signed ``log1p`` (signals span orders of magnitude: sharpness is a variance,
  ``file_bytes`` bytes), nulls and non-finite values imputed with the training median, one
  missing-indicator per feature, then standardised with the training mean and deviation.
* Figures: ``holdout`` of the graded rows (seeded) is held out; the model fit on the rest is scored
  there (accuracy, mean absolute error in levels) beside the majority-class baseline (the training
  rows' most common level), so a useless model shows as one. The model returned is then fit
  on every graded row.
* Confidence: the predicted level's probability.

A model is saved as one ``.npz`` of plain arrays (the settings as a JSON string in a uint8 array),
readable with ``np.load(allow_pickle=False)``: nothing is unpickled. Its ``model_id`` is a hash of
the arrays and settings (not of the zip's bytes, which carry timestamps), checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.config import ConfigError
from tasks.grading import LEVELS

log = logging.getLogger(__name__)

MIN_GRADED_ROWS = 20
FORMAT = "t2i-grade-model/1"
# Numeric columns of a shard that are not signals of the image.
NOT_FEATURES = frozenset({"key", "bucket_width", "bucket_height", "phash"})


class TooFewGrades(ConfigError):
    """Too few graded rows (or levels) to fit or judge a model."""


@dataclass
class GradeReport:
    """How well the model did on the held-out graded rows (None: no hold-out)."""

    graded_rows: int  # graded images found in the output
    votes: int
    unmatched_keys: int  # graded keys not in the output's shards
    levels: dict[int, int]  # level -> graded images
    train_rows: int = 0
    holdout_rows: int = 0
    accuracy: float | None = None
    mae: float | None = None  # mean absolute error in levels
    baseline_level: int | None = None  # the majority class of the training rows
    baseline_accuracy: float | None = None
    baseline_mae: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "levels": {str(k): v for k, v in self.levels.items()}}


@dataclass
class GradeModel:
    features: list[str]
    classes: np.ndarray  # int: the levels the model can predict, ascending
    coef: np.ndarray  # (n_inputs, n_classes) over [features..., missing indicators...]
    intercept: np.ndarray  # (n_classes,)
    median: np.ndarray  # per feature, after the log transform (imputation)
    mean: np.ndarray  # per input (standardisation)
    scale: np.ndarray
    l2: float = 1e-2
    report: GradeReport | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- prediction ------------------------------------------------------------------------------

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return _inputs(_transform(x), self.median, self.mean, self.scale)

    def proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities per row of ``x`` (rows x features, NaN = missing)."""
        return _softmax(self.inputs(x) @ self.coef + self.intercept)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The level (int8) and its probability (float32) per row."""
        p = self.proba(x)
        best = p.argmax(axis=1)
        return self.classes[best].astype(np.int8), p[np.arange(len(p)), best].astype(np.float32)

    def predict_rows(self, rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        return self.predict(_matrix_from_rows(rows, self.features))

    # -- storage ---------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"format": FORMAT, "features": self.features, "l2": self.l2, "meta": self.meta,
                "report": self.report.to_dict() if self.report else None}

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"classes": self.classes.astype(np.int64), "coef": self.coef.astype(np.float64),
                "intercept": self.intercept.astype(np.float64), "median": self.median.astype(np.float64),
                "mean": self.mean.astype(np.float64), "scale": self.scale.astype(np.float64)}

    @property
    def model_id(self) -> str:
        """``grade-`` and a hash of what the model computes with (and its settings)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(json.dumps(self._settings(), sort_keys=True).encode())
        for name, a in sorted(self._arrays().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return f"grade-{h.hexdigest()}"

    def save(self, path: str | Path) -> Path:
        """One ``.npz`` of plain arrays; the settings as JSON bytes. Returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")  # np.savez would add it anyway
        settings = {**self._settings(), "model_id": self.model_id}
        blob = np.frombuffer(json.dumps(settings, sort_keys=True).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, settings=blob, **self._arrays())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GradeModel:
        """Read a saved model (no pickle: ``allow_pickle=False``); its id must match its contents."""
        try:
            with np.load(path, allow_pickle=False) as z:
                settings = json.loads(bytes(z["settings"]).decode())
                arrays = {k: z[k] for k in ("classes", "coef", "intercept", "median", "mean", "scale")}
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is not a grade model ({exc})") from exc
        if settings.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a grade model (format {settings.get('format')!r}, not {FORMAT!r})")
        rep = settings.get("report")
        report = GradeReport(**{**rep, "levels": {int(k): v for k, v in rep["levels"].items()}}) if rep else None
        model = cls(list(settings["features"]), arrays["classes"], arrays["coef"], arrays["intercept"],
                    arrays["median"], arrays["mean"], arrays["scale"], float(settings["l2"]), report,
                    dict(settings.get("meta") or {}))
        if model.model_id != settings.get("model_id"):
            raise ConfigError(f"{path}: the model's contents do not match its id {settings.get('model_id')} "
                              "(a damaged or edited file)")
        return model


# -- fitting --------------------------------------------------------------------------------------


def aggregate_votes(grades: pa.Table) -> pa.Table:
    """One row per key: ``level`` (the median vote, a half rounded down) and ``votes``."""
    if grades.num_rows == 0:
        return pa.table({"key": pa.array([], pa.string()), "level": pa.array([], pa.int8()),
                         "votes": pa.array([], pa.int64())})
    for col in ("key", "grade"):
        if col not in grades.column_names:
            raise ConfigError(f"the grades table has no {col!r} column (GRADES_SCHEMA: key, grader, grade, ...)")
    keys = grades.column("key").to_pylist()
    values = np.asarray(grades.column("grade").to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isin(values, list(LEVELS))
    if bad.any():
        raise ConfigError(f"{int(bad.sum())} votes are not a level 1..5 (first: {values[bad][0]!r} for "
                          f"{keys[int(np.flatnonzero(bad)[0])]!r})")
    votes: dict[str, list[float]] = {}
    for k, v in zip(keys, values, strict=True):
        votes.setdefault(k, []).append(v)
    names = sorted(votes)
    levels = [int(np.floor(np.median(votes[k]))) for k in names]
    return pa.table({"key": pa.array(names, pa.string()), "level": pa.array(levels, pa.int8()),
                     "votes": pa.array([len(votes[k]) for k in names], pa.int64())})


def numeric_columns(schema: pa.Schema) -> list[str]:
    """The schema's signal columns a model can use: integers, floats and booleans, not bookkeeping."""
    return [f.name for f in schema if f.name not in NOT_FEATURES
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type))]


def read_pool(shards: str | Path, features: Sequence[str] | None = None) -> tuple[pa.Table, list[str]]:
    """``key`` and the feature columns of every committed part (a column a part lacks reads null);
    with ``features`` None, the numeric signal columns any part has."""
    from tasks.sidecar import list_parts
    from tasks.storage import as_store

    store = as_store(shards)
    parts = list_parts(store)
    if not parts:
        raise ConfigError(f"{store.url()} holds no committed shards/ part: run `t2i curate` first")
    schemas = []
    for p in parts:  # each file open only while it is read: a pool of thousands of parts is fine
        with store.open_input_file(p.rel) as fh:
            schemas.append(pq.read_schema(fh))
    if features is None:
        found: dict[str, None] = {}
        for schema in schemas:
            found.update(dict.fromkeys(numeric_columns(schema)))
        features = list(found)
    features = list(features)
    if not features:
        raise ConfigError(f"{store.url()}'s shards hold no numeric signal column to grade from")
    anywhere = {n for schema in schemas for n in schema.names}
    missing = [c for c in features if c not in anywhere]
    if missing:
        raise ConfigError(f"features {missing} are in no shard of {store.url()}")
    tables = []
    for p, schema in zip(parts, schemas, strict=True):
        present = [c for c in ["key", *features] if c in schema.names]
        with store.open_input_file(p.rel) as fh:
            t = pq.ParquetFile(fh).read(columns=present)
        cols = {"key": t.column("key").cast(pa.string())}
        for c in features:
            cols[c] = t.column(c).cast(pa.float64()) if c in present else pa.nulls(t.num_rows, pa.float64())
        tables.append(pa.table(cols))
    return pa.concat_tables(tables), features


def fit_grades(shards: str | Path, grades: str | Path | pa.Table, *, features: Sequence[str] | None = None,
               seed: int = 0, holdout: float = 0.2, l2: float = 1e-2) -> GradeModel:
    """Fit a level model on the graded rows of the curated output ``shards``; ``grades`` is a grades
    table (``GRADES_SCHEMA``) or the path of ``grades.parquet``. The model's ``report`` holds the
    held-out figures beside the majority baseline."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), not {holdout}")
    table = grades if isinstance(grades, pa.Table) else pq.read_table(str(grades))
    votes = aggregate_votes(table)
    pool, features = read_pool(shards, features)
    graded = {k: (lvl, n) for k, lvl, n in zip(votes.column("key").to_pylist(), votes.column("level").to_pylist(),
                                               votes.column("votes").to_pylist(), strict=True)}
    keep = pc.is_in(pool.column("key"), value_set=votes.column("key"))
    rows = pool.filter(keep)
    keys = rows.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        log.warning("some graded keys occur in more than one row of %s: each row is used", shards)
    y = np.array([graded[k][0] for k in keys], dtype=np.int64)
    x = _matrix(rows, features)
    unmatched = len(graded) - len(set(keys))
    if unmatched:
        log.warning("%d graded keys are not in %s's shards (rejected or removed since): left out", unmatched, shards)
    levels = {int(v): int((y == v).sum()) for v in np.unique(y)}
    report = GradeReport(graded_rows=len(y), votes=sum(graded[k][1] for k in set(keys)), unmatched_keys=unmatched,
                         levels=levels)
    if len(y) < MIN_GRADED_ROWS or len(levels) < 2:
        raise TooFewGrades(
            f"{len(y)} graded rows of {shards} with {len(levels)} level(s) {sorted(levels)}: a grade model needs "
            f"at least {MIN_GRADED_ROWS} graded rows and 2 levels (grade more of the sample: t2i grade serve)")
    if holdout:
        train, test = _split(y, holdout, seed)
        if len(np.unique(y[train])) >= 2 and len(test):
            held = _fit(x[train], y[train], features, l2)
            pred, _ = held.predict(x[test])
            counts = np.bincount(y[train])
            base = int(counts.argmax())
            report.train_rows, report.holdout_rows = len(train), len(test)
            report.accuracy = float((pred == y[test]).mean())
            report.mae = float(np.abs(pred.astype(np.int64) - y[test]).mean())
            report.baseline_level = base
            report.baseline_accuracy = float((y[test] == base).mean())
            report.baseline_mae = float(np.abs(y[test] - base).mean())
        else:
            log.warning("the hold-out split left fewer than 2 levels to train on: no held-out figures")
    model = _fit(x, y, features, l2)
    model.report = report
    model.meta = {"seed": seed, "holdout": holdout}
    return model


def _split(y: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per level, ``holdout`` of its rows (rounded, at least one where the level has two) to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for level in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == level))
        n = max(round(holdout * len(idx)), 1) if len(idx) > 1 else 0
        test += idx[:n].tolist()
        train += idx[n:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def _fit(x: np.ndarray, y: np.ndarray, features: list[str], l2: float) -> GradeModel:
    from scipy.optimize import minimize

    t = _transform(x)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-null feature: imputed with 0
        median = np.nanmedian(t, axis=0) if len(t) else np.zeros(t.shape[1])
    median = np.where(np.isfinite(median), median, 0.0)
    raw = _raw_inputs(t, median)
    mean, scale = raw.mean(axis=0), raw.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (raw - mean) / scale
    classes = np.unique(y)
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    n, d, k = z.shape[0], z.shape[1], len(classes)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        coef, b = w[: d * k].reshape(d, k), w[d * k:]
        logits = z @ coef + b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        value = -(onehot * logp).sum() / n + 0.5 * l2 * (coef**2).sum()
        g = (p - onehot) / n
        return value, np.concatenate([(z.T @ g + l2 * coef).ravel(), g.sum(axis=0)])

    res = minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B", options={"maxiter": 1000})
    coef, b = res.x[: d * k].reshape(d, k), res.x[d * k:]
    return GradeModel(list(features), classes, coef, b, median, mean, scale, l2)


# -- features -------------------------------------------------------------------------------------


def _matrix(table: pa.Table, features: Sequence[str]) -> np.ndarray:
    cols = []
    for c in features:
        a = table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
        cols.append(np.asarray(a, dtype=np.float64))
    return np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))


def _matrix_from_rows(rows: Sequence[dict[str, Any]], features: Sequence[str]) -> np.ndarray:
    out = np.full((len(rows), len(features)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(features):
            v = r.get(c)
            if v is not None:
                out[i, j] = float(v)
    return out


def _transform(x: np.ndarray) -> np.ndarray:
    """Signed log1p; non-finite values become NaN (missing)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        t = np.sign(x) * np.log1p(np.abs(x))
    return np.where(np.isfinite(t), t, np.nan)


def _raw_inputs(t: np.ndarray, median: np.ndarray) -> np.ndarray:
    missing = np.isnan(t)
    return np.concatenate([np.where(missing, median[None, :], t), missing.astype(np.float64)], axis=1)


def _inputs(t: np.ndarray, median: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (_raw_inputs(t, median) - mean) / scale


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)
