"""A changed source shard curated again (``source.changed: recurate``) gives back what its keys took
from other shards, and a source that cannot be read is an error, never "changed"."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from conftest import photo_samples, write_webdataset

import tasks.runner as runner
from schemas.config import CurateConfig
from tasks.runner import run
from tasks.shards import Manifest

CFG = CurateConfig(rules={}, signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}},
                   source={"changed": "recurate"})


def rows(out: Path, kind: str) -> list[tuple]:
    cols = "key, source" if kind == "shards" else "key, source, reason"
    return duckdb.execute(f"SELECT {cols} FROM '{out}/{kind}/*.parquet' ORDER BY ALL").fetchall()


def test_recurating_a_changed_shard_returns_the_duplicates_it_no_longer_keeps(tmp_path: Path) -> None:
    """a.tar and b.tar share 12 keys (b's are duplicate_key rejects); a.tar is rewritten with other
    keys: the rerun keeps all 24, as a fresh run does (the filing kept 12 and left 12 orphans)."""
    src = tmp_path / "src"
    write_webdataset(src / "a.tar", photo_samples("x"))
    write_webdataset(src / "b.tar", photo_samples("x"))
    first = run(src, tmp_path / "out", CFG, use_ray=False)
    assert first.duplicates_moved == 12
    assert sum(1 for r in rows(tmp_path / "out", "rejects") if r[2] == "duplicate_key") == 12

    write_webdataset(src / "a.tar", photo_samples("y"))  # re-downloaded with other keys
    again = run(src, tmp_path / "out", CFG, use_ray=False)
    assert again.shards_done == 2 and again.failed == {}  # a, and b whose duplicates lost their twin
    kept = rows(tmp_path / "out", "shards")
    assert len(kept) == 24 and not [r for r in rows(tmp_path / "out", "rejects") if r[2] == "duplicate_key"]
    run(src, tmp_path / "fresh", CFG, use_ray=False)
    assert kept == rows(tmp_path / "fresh", "shards")
    assert rows(tmp_path / "out", "rejects") == rows(tmp_path / "fresh", "rejects")
    entries = Manifest(tmp_path / "out").entries()
    assert sum(e["kept"] for e in entries) == 24


def test_a_twin_still_held_stays_rejected(tmp_path: Path) -> None:
    """a.tar rewritten keeping half its keys: b's duplicates of those stay rejected, the rest come back."""
    src = tmp_path / "src"
    write_webdataset(src / "a.tar", photo_samples("x"))
    write_webdataset(src / "b.tar", photo_samples("x"))
    run(src, tmp_path / "out", CFG, use_ray=False)
    write_webdataset(src / "a.tar", list(photo_samples("x"))[:6] + list(photo_samples("y"))[:6])
    run(src, tmp_path / "out", CFG, use_ray=False)
    run(src, tmp_path / "fresh", CFG, use_ray=False)
    for kind in ("shards", "rejects"):
        assert rows(tmp_path / "out", kind) == rows(tmp_path / "fresh", kind)
    assert sum(1 for r in rows(tmp_path / "out", "rejects") if r[2] == "duplicate_key") == 6


@pytest.mark.parametrize("changed", ["recurate", "refuse"])
def test_an_unreadable_source_is_an_error_not_a_change(tmp_path: Path, monkeypatch, changed: str) -> None:
    """A done shard whose source cannot be read (a permission error, a store that keeps failing)
    is listed as failed with what happened; its committed rows stay, nothing is "changed"."""
    src = tmp_path / "src"
    write_webdataset(src / "a.tar", photo_samples("a"))
    write_webdataset(src / "b.tar", photo_samples("b"))
    cfg = CFG.model_copy(update={"source": CFG.source.model_copy(update={"changed": changed})})
    run(src, tmp_path / "out", cfg, use_ray=False)
    before = {kind: rows(tmp_path / "out", kind) for kind in ("shards", "rejects")}
    real = runner.fingerprint
    tries: list[str] = []

    def unreadable(shard, storage=None):
        if shard.path.endswith("b.tar"):
            tries.append(shard.path)
            raise PermissionError(13, "Permission denied", shard.path)
        return real(shard, storage)

    monkeypatch.setattr(runner, "fingerprint", unreadable)
    summary = run(src, tmp_path / "out", cfg, use_ray=False)
    [(shard_id, why)] = summary.failed.items()
    assert "cannot read the source" in why and "b.tar" in why and "Permission denied" in why
    assert tries == [str(src / "b.tar")]
    assert summary.shards_done == 0 and shard_id in Manifest(tmp_path / "out").done_ids()
    assert {kind: rows(tmp_path / "out", kind) for kind in ("shards", "rejects")} == before
