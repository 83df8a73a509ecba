"""`t2i grade` end to end as a data team runs it: export a sample of a curated output, grade it
(votes as the page stores them), import, fit, predict for the whole pool, then train on the rows
the model calls level 4 or 5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import PHOTOS
from PIL import Image, ImageFilter

from schemas.config import CurateConfig
from tasks.grading.votes import VoteStore
from tasks.runner import run
from trainer.data import DataConfig, RowIndex


def t2i(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2i.cli", *args], capture_output=True, text=True, timeout=300)


def curated(root: Path) -> Path:
    """60 images: each photo at five blur radii, so sharpness says something about quality."""
    src = root / "src"
    src.mkdir()
    for i in range(60):
        img = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").filter(ImageFilter.GaussianBlur(i // 12 * 1.5))
        img.save(src / f"{i:03d}.jpg", quality=90)
    cfg = CurateConfig.model_validate({"signals": {"resolution": {}, "sharpness": {}}, "rules": {},
                                       "source": {"folder_chunk": 20}})
    run(src, root / "out", cfg, use_ray=False)
    return root / "out"


def test_export_grade_import_fit_predict_and_select(tmp_path: Path) -> None:
    out = curated(tmp_path)
    gdir = tmp_path / "grading"
    exported = t2i("grade", "export", "--shards", str(out), "--n", "48", "--out", str(gdir))
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["drawn"] == 48

    sharp = dict(duckdb.sql(f"SELECT key, sharpness FROM '{out}/shards/*.parquet'").fetchall())
    cuts = np.quantile(list(sharp.values()), [0.2, 0.4, 0.6, 0.8])
    votes = VoteStore(gdir)
    batch = [k for (k,) in duckdb.sql(f"SELECT key FROM '{gdir}/batch.parquet'").fetchall()]
    for i, key in enumerate(batch):  # two graders who mostly agree that sharper is better
        level = 1 + int(np.searchsorted(cuts, sharp[key]))
        votes.record(key, "ann", level)
        votes.record(key, "bo", level if i % 5 else max(1, level - 1))

    imported = t2i("grade", "import", str(gdir))
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert summary["votes"] == 96 and summary["images"] == 48
    (pair,) = summary["agreement"]["pairs"]  # ann and bo differ on every fifth image, by one level at most
    assert (pair["n"], pair["within_one"]) == (48, 1.0) and 0.75 <= pair["exact"] < 1.0

    fitted = t2i("grade", "fit", "--shards", str(out), "--grades", str(gdir), "--model", str(tmp_path / "m.npz"))
    assert fitted.returncode == 0, fitted.stderr
    report = json.loads(fitted.stdout)
    assert report["accuracy"] > report["baseline_accuracy"] and report["mae"] < report["baseline_mae"]

    predicted = t2i("grade", "predict", "--shards", str(out), "--model", str(tmp_path / "m.npz"), "--no-ray")
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["set_rows"] == 60
    good = {k for (k,) in duckdb.sql(f"SELECT key FROM '{out}/grades/*.parquet' WHERE quality_level >= 4").fetchall()}
    index = RowIndex.build(DataConfig(shards=[str(out)], select={"quality_level": {"min": 4}}, resolution=512))
    assert {index.key(i) for i in range(len(index))} == good and 0 < len(good) < 60


def test_grading_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    out = curated(tmp_path)
    too_many = t2i("grade", "export", "--shards", str(out), "--n", "0", "--out", str(tmp_path / "g"))
    assert too_many.returncode == 2 and too_many.stderr.startswith("error: ")
    few = tmp_path / "few"
    t2i("grade", "export", "--shards", str(out), "--n", "5", "--out", str(few))
    VoteStore(few).record(duckdb.sql(f"SELECT key FROM '{few}/batch.parquet' LIMIT 1").fetchone()[0], "ann", 3)
    assert t2i("grade", "import", str(few)).returncode == 0
    unfit = t2i("grade", "fit", "--shards", str(out), "--grades", str(few), "--model", str(tmp_path / "m.npz"))
    assert unfit.returncode == 2 and "error: " in unfit.stderr and "Traceback" not in unfit.stderr


def test_labelstudio_source_options_apply_to_the_exports_after_them() -> None:
    from t2i.grade_cli import group_exports
    from tasks.grading.importer import GradeImportError

    url, server = ("labelstudio_url", "http://a:8080"), ("labelstudio_server", "b")
    users = ("labelstudio_users", "u.json")
    # given once: to every export, before or after them
    assert group_exports([("labelstudio", ["x.json"]), url, ("labelstudio", ["y.json"])]) == \
        [("x.json", dict([url])), ("y.json", dict([url]))]
    # several servers: each one's options before its exports; two options may describe one server
    assert group_exports([url, ("labelstudio", ["x.json"]), server, users, ("labelstudio", ["y.json", "z.json"])]) == \
        [("x.json", dict([url])), ("y.json", dict([server, users])), ("z.json", dict([server, users]))]
    assert group_exports([("labelstudio", ["x.json"])]) == [("x.json", {})]
    with pytest.raises(GradeImportError, match=r"--labelstudio-url given twice for the same exports"):
        group_exports([url, ("labelstudio_url", "http://c"), ("labelstudio", ["x.json"])])
    with pytest.raises(GradeImportError, match=r"--labelstudio-server b is followed by no --labelstudio export"):
        group_exports([url, ("labelstudio", ["x.json"]), server])


def test_import_refuses_bare_ids_of_an_unnamed_server_and_names_them_under_a_server_named(tmp_path: Path) -> None:
    out = curated(tmp_path)
    gdir = tmp_path / "g"
    assert t2i("grade", "export", "--shards", str(out), "--n", "3", "--out", str(gdir)).returncode == 0
    key = duckdb.sql(f"SELECT key FROM '{gdir}/batch.parquet' LIMIT 1").fetchone()[0]
    ann = {"id": 9, "completed_by": 1, "project": 4, "created_at": "2026-01-02T03:04:05Z",
           "result": [{"from_name": "quality", "type": "rating", "value": {"rating": 4}}]}
    (tmp_path / "e.json").write_text(json.dumps([{"id": 7, "project": 4, "data": {"key": key}, "annotations": [ann]}]))
    refused = t2i("grade", "import", str(gdir), "--labelstudio", str(tmp_path / "e.json"))
    assert refused.returncode == 2 and "e.json names 1 grader by Label Studio user id only (ids 1)" in refused.stderr
    named = t2i("grade", "import", str(gdir), "--labelstudio", str(tmp_path / "e.json"), "--labelstudio-server", "lab")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["graders"] == {"labelstudio:lab/project-4/user-1": 1}
    bad = t2i("grade", "import", str(gdir), "--labelstudio-users", str(tmp_path / "none.json"), "--labelstudio",
              str(tmp_path / "e.json"))
    assert bad.returncode == 2 and "none.json: no such file" in bad.stderr and "Traceback" not in bad.stderr
