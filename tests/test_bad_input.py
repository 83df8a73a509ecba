"""A run over broken samples mixed with good ones finishes and accounts for every row,
on a real Ray runtime."""

from __future__ import annotations

from pathlib import Path

import duckdb
from corpus import UNDECODABLE, build

from schemas.config import Bounds, CurateConfig, SourceConfig
from tasks.runner import run
from tasks.shards import Manifest


def read(out: Path, kind: str) -> list[dict]:
    columns = "* EXCLUDE (image)" if kind == "shards" else "*"
    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{out}/{kind}/*.parquet')").df().to_dict("records")


def config() -> CurateConfig:
    # Only the caption rule: what is judged here is decoding and accounting, not taste.
    return CurateConfig(rules={"caption_chars": Bounds(max=4096)}, source=SourceConfig(unreadable="salvage"))


def test_broken_corpus_is_fully_accounted(tmp_path, ray_runtime):
    expected = build(tmp_path / "src")
    summary = run(tmp_path / "src", tmp_path / "out", config())
    assert summary.failed == {} and summary.shards_done == 3
    kept, rejects = read(tmp_path / "out", "shards"), read(tmp_path / "out", "rejects")
    kept_keys = [r["key"] for r in kept]
    assert len(kept_keys) == len(set(kept_keys)), "keys are unique in the output"

    must_keep = {k for k, reason in expected.items() if reason is None} | {"dup_after_bad"}
    assert must_keep <= set(kept_keys), f"good samples lost: {must_keep - set(kept_keys)}"
    by_key = {}
    for r in rejects:
        by_key.setdefault(r["key"], []).append(r)
    for key, reason in expected.items():
        if reason is not None and key != "dup_after_bad":
            assert [r["reason"] for r in by_key[key]] == [reason], key
    for key in UNDECODABLE:
        assert by_key[key][0]["error"], f"{key} has no error text"
    assert [r["reason"] for r in by_key["good_photo_0"]] == ["duplicate_key"]
    assert [r["reason"] for r in by_key["dup_after_bad"]] == ["undecodable"]

    tail_kept = [k for k in kept_keys if k.startswith("tail_")]
    unreadable = [k for k in by_key if k.endswith("/__unreadable_rest__")]
    assert len(unreadable) == 1 and 1 <= len(tail_kept) < 6
    assert "source_unreadable" in by_key[unreadable[0]][0]["reason"]

    total_in = len(expected) + 2 + 6  # +2: the second samples of the two repeated keys
    accounted = len(kept) + len(rejects) - 1 + (6 - len(tail_kept))  # the marker stands for the unread tail
    assert accounted == total_in
    assert summary.kept + summary.rejected == len(kept) + len(rejects)


def test_kept_rows_carry_the_promised_columns(tmp_path, ray_runtime):
    build(tmp_path / "src")
    run(tmp_path / "src", tmp_path / "out", config())
    query = f"SELECT * FROM read_parquet('{tmp_path}/out/shards/*.parquet') WHERE key='good_exif_rotated'"
    row = duckdb.sql(query).df()
    rec = row.to_dict("records")[0]
    for col in ("key", "image", "width", "height", "caption", "source", "sharpness", "phash", "bucket_width",
                "bucket_height"):
        assert col in rec and rec[col] is not None, col
    assert (rec["width"], rec["height"]) == (480, 640)  # EXIF orientation 8 swaps the axes
    assert rec["bucket_width"] < rec["bucket_height"]
    assert rec["image"][:2] == b"\xff\xd8"  # the original bytes, not a re-encode


def test_a_corrupt_tar_fails_its_shard_and_the_rest_completes(tmp_path, ray_runtime):
    build(tmp_path / "src")
    strict = config().model_copy(update={"source": SourceConfig(unreadable="fail")})
    summary = run(tmp_path / "src", tmp_path / "out", strict)
    assert list(summary.failed) == [s for s in summary.failed if s.startswith("00002")] and len(summary.failed) == 1
    assert "tar unreadable" in next(iter(summary.failed.values()))
    assert summary.shards_done == 2 and len(Manifest(tmp_path / "out").done_ids()) == 2
    outputs = [p.name for p in (tmp_path / "out").glob("*/*.parquet")]
    assert outputs and not [n for n in outputs if n.startswith("00002")], "a failed shard publishes nothing"


def test_analyze_keeps_every_decodable_row(tmp_path, ray_runtime):
    expected = build(tmp_path / "src")
    run(tmp_path / "src", tmp_path / "out", config().model_copy(update={"rules": {}}), mode="analyze")
    rejects = read(tmp_path / "out", "rejects")
    reasons = {r["key"]: r["reason"] for r in rejects}
    assert "caption_huge" not in reasons  # no rule in analyze
    for key in UNDECODABLE:
        assert reasons[key] == expected[key]
    assert set(reasons.values()) <= {"undecodable", "decompression_bomb", "caption_not_utf8", "duplicate_key",
                                     "source_unreadable"}
