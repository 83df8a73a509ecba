"""Five-level grades from a graded sample to the whole pool: the model (fit, held-out figures beside
the majority baseline, no pickle), the grade pass as a sidecar set (row for row, resume, a changed
model refused), and the trainer's selection on the set's columns."""

from __future__ import annotations

import json
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS
from PIL import Image, ImageFilter

from schemas.config import CurateConfig
from tasks.grading import GRADES_SCHEMA
from tasks.grading.grade_pass import predict_pool
from tasks.grading.model import GradeModel, TooFewGrades, aggregate_votes, fit_grades
from tasks.runner import run
from tasks.sidecar import SetChanged
from trainer.data import DataConfig, RowIndex

IMAGES = 60
CURATE = {"signals": {"resolution": {}, "sharpness": {}, "quality": {}}, "rules": {},
          "source": {"folder_chunk": 20}, "output": {"row_group_rows": 8}}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A curated output of 60 images (3 parts of 20, row groups of 8): the 12 test photos, small,
    each at five blur radii, so sharpness spreads."""
    root = tmp_path_factory.mktemp("pool")
    src = root / "src"
    src.mkdir()
    for i in range(IMAGES):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        im.thumbnail((320, 320))
        radius = 0.8 * (i // len(PHOTOS))
        (im.filter(ImageFilter.GaussianBlur(radius)) if radius else im).save(src / f"{i:04d}.jpg", quality=90)
        (src / f"{i:04d}.txt").write_text(f"photo {i}")
    run(src, root / "out", CurateConfig.model_validate(CURATE), use_ray=False)
    return root / "out"


def rows_of(out: Path) -> pa.Table:
    parts = sorted((out / "shards").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f, columns=["key", "sharpness"]) for f in parts])


def synthetic_grades(out: Path, seed: int = 1, graders: int = 3, keys: list[str] | None = None) -> pa.Table:
    """Level from the sharpness quintile; each grader off by one a fifth of the time."""
    t = rows_of(out)
    names, sharp = t.column("key").to_pylist(), np.array(t.column("sharpness").to_pylist())
    cuts = np.quantile(sharp, [0.2, 0.4, 0.6, 0.8])
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    votes = []
    for k, s in zip(names, sharp, strict=True):
        if keys is not None and k not in keys:
            continue
        level = 1 + int(np.searchsorted(cuts, s))
        for g in range(graders):
            vote = int(np.clip(level + rng.choice([-1, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 1, 5))
            votes.append({"key": k, "grader": f"g{g}", "grade": vote, "time": now, "origin": "page"})
    return pa.Table.from_pylist(votes, schema=GRADES_SCHEMA)


@pytest.fixture(scope="module")
def model_path(pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = fit_grades(str(pool), synthetic_grades(pool))
    return model.save(tmp_path_factory.mktemp("model") / "grades.npz")


def copy_of(pool: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(pool, out)
    return out


def sidecar(out: Path, name: str = "grades") -> dict[str, dict]:
    return {r["key"]: r for f in sorted((out / name).glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def test_votes_are_the_median_rounded_down():
    now = datetime.now(UTC)
    votes = [("a", 3), ("a", 4), ("b", 2), ("b", 4), ("b", 5), ("c", 5), ("c", 5), ("c", 1), ("c", 1), ("d", 1)]
    table = pa.Table.from_pylist([{"key": k, "grader": f"g{i}", "grade": g, "time": now, "origin": "page"}
                                  for i, (k, g) in enumerate(votes)], schema=GRADES_SCHEMA)
    agg = {r["key"]: (r["level"], r["votes"]) for r in aggregate_votes(table).to_pylist()}
    assert agg == {"a": (3, 2), "b": (4, 3), "c": (3, 4), "d": (1, 1)}


def test_model_beats_the_majority_baseline_on_held_out_rows(pool: Path, model_path: Path):
    model = GradeModel.load(model_path)
    rep = model.report
    assert rep is not None and rep.graded_rows == IMAGES and rep.votes == 3 * IMAGES and rep.unmatched_keys == 0
    assert set(rep.levels) == {1, 2, 3, 4, 5}
    assert rep.train_rows + rep.holdout_rows == IMAGES and rep.holdout_rows >= 10
    assert rep.accuracy > rep.baseline_accuracy + 0.2, rep
    assert rep.mae < rep.baseline_mae, rep
    assert "sharpness" in model.features and "bucket_width" not in model.features
    print(json.dumps(rep.to_dict()))


def test_saved_model_holds_no_pickle(pool: Path, model_path: Path):
    with zipfile.ZipFile(model_path) as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    with np.load(model_path, allow_pickle=False) as z:
        assert all(z[n].dtype != object for n in z.files)
        settings = json.loads(bytes(z["settings"]).decode())
    assert settings["features"] and settings["model_id"].startswith("grade-")
    again = GradeModel.load(model_path)
    x = np.array([[320, 240, 240, 1.33, 20000, np.nan, np.nan, 900.0, 20.0][: len(again.features)]])
    assert again.predict(x)[0].dtype == np.int8
    # an edited file is refused, not used
    with np.load(model_path, allow_pickle=False) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["coef"] = arrays["coef"] * 2
    edited = model_path.with_name("edited.npz")
    np.savez(edited, **arrays)
    with pytest.raises(Exception, match="do not match its id"):
        GradeModel.load(edited)


def test_grade_pass_every_row_resume_and_a_changed_model(pool: Path, model_path: Path, tmp_path: Path):
    out = copy_of(pool, tmp_path)
    summary = predict_pool(str(out), model_path, use_ray=False)
    assert (summary.parts_total, summary.parts_done, summary.rows, summary.set_rows) == (3, 3, IMAGES, IMAGES)
    model = GradeModel.load(model_path)
    for part in sorted((out / "shards").glob("*.parquet")):
        shard, side = pq.ParquetFile(part), pq.ParquetFile(out / "grades" / part.name)
        assert side.read().column("key").to_pylist() == shard.read(columns=["key"]).column("key").to_pylist()
        assert [side.metadata.row_group(g).num_rows for g in range(side.metadata.num_row_groups)] == \
            [shard.metadata.row_group(g).num_rows for g in range(shard.metadata.num_row_groups)]
        t = side.read()
        assert t.schema.field("quality_level").type == pa.int8()
        assert t.schema.field("quality_confidence").type == pa.float32()
        assert t.column("grade_error").null_count == t.num_rows
        # the pass's levels are the model's on the part's own signals
        rows = shard.read(columns=model.features).to_pylist()
        assert t.column("quality_level").to_pylist() == model.predict_rows(rows)[0].tolist()
        assert set(t.column("grade_model").to_pylist()) == {model.model_id}
        assert (out / "grades" / "_manifest" / f"{part.stem}.json").exists()
    stamp = json.loads((out / "grades" / "_run.json").read_text())
    assert stamp["model"] == model.model_id and stamp["features"] == model.features

    again = predict_pool(str(out), model_path, use_ray=False)
    assert (again.parts_skipped, again.parts_done, again.set_rows) == (3, 0, IMAGES)
    first = sorted((out / "shards").glob("*.parquet"))[0].stem
    (out / "grades" / "_manifest" / f"{first}.json").unlink()  # as if killed before that part's commit
    (out / "grades" / f"{first}.parquet").unlink()
    resumed = predict_pool(str(out), model_path, use_ray=False)
    assert (resumed.parts_skipped, resumed.parts_done, resumed.set_rows) == (2, 1, IMAGES)

    other = fit_grades(str(out), synthetic_grades(out, seed=7), seed=3).save(tmp_path / "other.npz")
    with pytest.raises(SetChanged, match="model"):
        predict_pool(str(out), other, use_ray=False)
    beside = predict_pool(str(out), other, set_name="grades-v2", use_ray=False)
    assert beside.set_rows == IMAGES and len(sidecar(out)) == IMAGES  # the first set untouched


def test_trainer_selects_on_the_sidecar_levels(pool: Path, model_path: Path, tmp_path: Path):
    out = copy_of(pool, tmp_path)
    predict_pool(str(out), model_path, use_ray=False)
    levels = sidecar(out)
    cfg = {"shards": [str(out)], "resolution": 64}
    index = RowIndex.build(DataConfig(**cfg, select={"quality_level": {"min": 4}}))
    want = sorted(k for k, r in levels.items() if r["quality_level"] >= 4)
    assert 0 < len(want) < IMAGES and sorted(index.keys.to_pylist()) == want
    # with a shard column too, and a range
    index = RowIndex.build(DataConfig(**cfg, select={"quality_level": {"min": 2, "max": 3}, "width": {"min": 1}}))
    assert sorted(index.keys.to_pylist()) == sorted(k for k, r in levels.items() if 2 <= r["quality_level"] <= 3)

    # a part without its sidecar: its rows read NULL and fail the bound
    first = sorted((out / "shards").glob("*.parquet"))[0]
    gone = set(pq.read_table(first, columns=["key"]).column("key").to_pylist())
    (out / "grades" / "_manifest" / f"{first.stem}.json").unlink()
    index = RowIndex.build(DataConfig(**cfg, select={"quality_level": {"min": 4}}))
    assert sorted(index.keys.to_pylist()) == sorted(set(want) - gone)

    # two sets with the column: ambiguous unless named set.column
    other = fit_grades(str(out), synthetic_grades(out, seed=7), seed=3).save(tmp_path / "other.npz")
    predict_pool(str(out), other, set_name="v2", use_ray=False)
    with pytest.raises(ValueError, match=r"is in the sidecar sets \['grades', 'v2'\]: name one"):
        RowIndex.build(DataConfig(**cfg, select={"quality_level": {"min": 4}}))
    v2 = sidecar(out, "v2")
    index = RowIndex.build(DataConfig(**cfg, select={"v2.quality_level": {"min": 4}}))
    assert sorted(index.keys.to_pylist()) == sorted(k for k, r in v2.items() if r["quality_level"] >= 4)
    with pytest.raises(ValueError, match="unknown column 'no_such'"):
        RowIndex.build(DataConfig(**cfg, select={"no_such": {"min": 4}}))


def test_too_few_grades_is_a_clear_error(pool: Path):
    keys = rows_of(pool).column("key").to_pylist()
    with pytest.raises(TooFewGrades, match="at least 20 graded rows"):
        fit_grades(str(pool), synthetic_grades(pool, keys=keys[:12]))
    now = datetime.now(UTC)
    one_level = pa.Table.from_pylist([{"key": k, "grader": "g", "grade": 4, "time": now, "origin": "page"}
                                      for k in keys], schema=GRADES_SCHEMA)
    with pytest.raises(TooFewGrades, match="2 levels"):
        fit_grades(str(pool), one_level)
    strangers = pa.Table.from_pylist([{"key": f"x{i}", "grader": "g", "grade": 1 + i % 5, "time": now,
                                       "origin": "page"} for i in range(40)], schema=GRADES_SCHEMA)
    with pytest.raises(TooFewGrades, match="0 graded rows"):
        fit_grades(str(pool), strangers)


def test_grade_pass_through_ray_equals_in_process(pool: Path, model_path: Path, tmp_path: Path, ray_runtime):
    here, there = copy_of(pool, tmp_path / "here"), copy_of(pool, tmp_path / "ray")
    predict_pool(str(here), model_path, use_ray=False)
    summary = predict_pool(str(there), model_path, use_ray=True)
    assert (summary.parts_done, summary.set_rows, summary.failed) == (3, IMAGES, {})
    assert sidecar(there) == sidecar(here)
