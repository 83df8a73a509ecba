"""Parquet sources keep their other columns as ``meta``: img2dataset's parquet output (url, sizes,
status, error_message, exif, sha256, --save_additional_columns) and any other table; a row
img2dataset failed to download is a ``missing_image`` reject in img2dataset's own words."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import photo

from schemas.config import CurateConfig, SourceConfig
from tasks.runner import run
from tasks.sources import discover, read_shard

IMG = photo("lena-face.jpg")

# img2dataset's parquet writer: the image column first, then its download schema; laion_similarity
# is a --save_additional_columns column.
I2D_SCHEMA = pa.schema([
    ("jpg", pa.binary()), ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("laion_similarity", pa.float64()), ("status", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("exif", pa.string()), ("sha256", pa.string()),
])
META_KEYS = ["url", "laion_similarity", "status", "error_message", "width", "height", "original_width",
             "original_height", "exif", "sha256"]
EXIF = json.dumps({"Image Make": "Canon", "Image Model": "EOS 5D"})


def ok(i: int) -> dict:
    return {"jpg": IMG, "key": f"{i:09d}", "url": f"https://example.com/{i}.jpg", "caption": f"photo {i}",
            "laion_similarity": 0.25 + i / 100, "status": "success", "error_message": None,
            "width": 256, "height": 256, "original_width": 1000 + i, "original_height": 800 + i,
            "exif": EXIF, "sha256": f"{i:064x}"}


def failed(i: int, status: str, message: str) -> dict:
    return {"jpg": None, "key": f"{i:09d}", "url": f"https://example.com/{i}.jpg", "caption": f"photo {i}",
            "laion_similarity": 0.3, "status": status, "error_message": message, "width": None,
            "height": None, "original_width": None, "original_height": None, "exif": None, "sha256": None}


def i2d_rows() -> list[dict]:
    return [ok(0), failed(1, "failed_to_download", "HTTP Error 404: Not Found"), ok(2),
            failed(3, "failed_to_download", "<urlopen error timed out>"), ok(4),
            failed(5, "failed_to_resize", "image too small"), ok(6)]


def write_i2d(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(i2d_rows(), schema=I2D_SCHEMA), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 4
    return path


def rows(source: Path, cfg: SourceConfig | None = None) -> list[dict]:
    cfg = cfg or SourceConfig(batch_rows=3)
    return [r for shard in discover(source, cfg) for b in read_shard(shard, cfg) for r in b.to_pylist()]


def test_img2dataset_columns_reach_meta_in_column_order_across_row_groups(tmp_path):
    got = {r["key"]: r for r in rows(write_i2d(tmp_path / "00000.parquet"))}
    assert list(got) == [f"{i:09d}" for i in range(7)]
    for i in (0, 2, 4, 6):
        row = got[f"{i:09d}"]
        assert row["source_error"] is None and row["image"] == IMG and row["caption"] == f"photo {i}"
        meta = json.loads(row["meta"])
        assert list(meta) == META_KEYS  # the file's column order; no image, caption or key
        expected = {k: v for k, v in ok(i).items() if k in META_KEYS}
        assert meta == expected
        assert meta["original_width"] == 1000 + i and meta["laion_similarity"] == 0.25 + i / 100
        assert json.loads(meta["exif"]) == {"Image Make": "Canon", "Image Model": "EOS 5D"}  # its JSON text


def test_failed_downloads_are_missing_image_rejects_with_img2datasets_message(tmp_path):
    got = {r["key"]: r for r in rows(write_i2d(tmp_path / "00000.parquet"))}
    assert got["000000001"]["source_error"] == (
        "missing_image: img2dataset status failed_to_download: HTTP Error 404: Not Found")
    assert got["000000003"]["source_error"] == (
        "missing_image: img2dataset status failed_to_download: <urlopen error timed out>")
    assert got["000000005"]["source_error"] == "missing_image: img2dataset status failed_to_resize: image too small"
    meta = json.loads(got["000000001"]["meta"])  # the reject keeps what is known: the url above all
    assert meta["url"] == "https://example.com/1.jpg" and meta["status"] == "failed_to_download"
    assert meta["original_width"] is None and meta["error_message"] == "HTTP Error 404: Not Found"


def test_status_without_message_and_null_image_with_success_status(tmp_path):
    table = pa.table({"jpg": [None, None, None], "caption": ["a", "b", "c"],
                      "status": ["failed_to_download", "success", None], "error_message": [None, None, None]})
    pq.write_table(table, tmp_path / "p.parquet")
    errors = [r["source_error"] for r in rows(tmp_path / "p.parquet")]
    assert errors == ["missing_image: img2dataset status failed_to_download",
                      "missing_image: no bytes in column 'jpg'", "missing_image: no bytes in column 'jpg'"]


def test_a_run_writes_meta_to_shards_and_the_message_to_rejects(tmp_path):
    src = tmp_path / "src"
    write_i2d(src / "00000.parquet")
    cfg = CurateConfig(signals={"caption": {}}, rules={}, source=SourceConfig(batch_rows=3))
    summary = run(src, tmp_path / "out", cfg, use_ray=False)
    assert summary.failed == {}, summary.failed
    out = tmp_path / "out"
    kept = duckdb.sql(f"SELECT key, meta->>'url', CAST(meta->>'original_height' AS INT), "
                      f"CAST(meta->>'laion_similarity' AS DOUBLE) FROM read_parquet('{out}/shards/*.parquet') "
                      "ORDER BY key").fetchall()
    assert kept == [(f"{i:09d}", f"https://example.com/{i}.jpg", 800 + i, 0.25 + i / 100) for i in (0, 2, 4, 6)]
    rejects = duckdb.sql(f"SELECT key, reason, error, meta->>'url' FROM read_parquet('{out}/rejects/*.parquet') "
                         "ORDER BY key").fetchall()
    assert rejects == [
        ("000000001", "missing_image", "img2dataset status failed_to_download: HTTP Error 404: Not Found",
         "https://example.com/1.jpg"),
        ("000000003", "missing_image", "img2dataset status failed_to_download: <urlopen error timed out>",
         "https://example.com/3.jpg"),
        ("000000005", "missing_image", "img2dataset status failed_to_resize: image too small",
         "https://example.com/5.jpg"),
    ]


def test_any_parquet_keeps_its_other_columns_and_leaves_binary_out(tmp_path):
    table = pa.table({
        "id": pa.array([7, 8], pa.int64()),
        "image": [{"bytes": IMG, "path": "a.jpg"}, {"bytes": IMG, "path": "b.jpg"}],
        "text": ["a", "b"],
        "mask": [{"bytes": b"\x89PNG", "path": "m.png"}, None],   # a second image: not meta
        "thumb": pa.array([b"\xff\xd8", b"\xff\xd8"], pa.binary()),  # bytes: not meta
        "score": [0.5, float("nan")],
        "taken": pa.array([dt.datetime(2023, 5, 1, 12, 30), None], pa.timestamp("us")),
        "day": pa.array([dt.date(2024, 2, 29), dt.date(2024, 3, 1)], pa.date32()),
        "price": pa.array([Decimal("1.50"), Decimal("2.00")], pa.decimal128(5, 2)),
        "tags": [["cat", "猫"], []],
        "source": pa.array(["laion", "coyo"]).dictionary_encode(),
        "box": [{"x": 1, "y": 2}, {"x": 3, "y": 4}],
        "license": pa.array([None, None], pa.string()),
    })
    pq.write_table(table, tmp_path / "t.parquet")
    got = rows(tmp_path / "t.parquet", SourceConfig(image_column="image", caption_column="text"))
    metas = [r["meta"] for r in got]
    assert [json.loads(m) for m in metas] == [
        {"id": 7, "score": 0.5, "taken": "2023-05-01T12:30:00", "day": "2024-02-29", "price": "1.50",
         "tags": ["cat", "猫"], "source": "laion", "box": {"x": 1, "y": 2}, "license": None},
        {"id": 8, "score": "NaN", "taken": None, "day": "2024-03-01", "price": "2.00", "tags": [],
         "source": "coyo", "box": {"x": 3, "y": 4}, "license": None},
    ]
    assert "猫" in metas[0]  # UTF-8 text, not \\u escapes
    assert all(r["source_error"] is None for r in got)
    assert rows(tmp_path / "t.parquet", SourceConfig(image_column="image", caption_column="text")) == got


def test_image_and_caption_only_or_with_key_has_no_meta(tmp_path):
    pq.write_table(pa.table({"jpg": [IMG, None], "caption": ["a", "b"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"key": ["k"], "jpg": [IMG], "caption": ["c"],
                             "thumb": pa.array([b"x"], pa.binary())}), tmp_path / "b.parquet")
    got = {r["key"]: r for r in rows(tmp_path)}
    assert {k: r["meta"] for k, r in got.items()} == {"a/0": None, "a/1": None, "k": None}
    assert got["a/1"]["source_error"] == "missing_image: no bytes in column 'jpg'"


def test_oversized_image_reject_keeps_meta(tmp_path):
    write_i2d(tmp_path / "00000.parquet")
    cfg = SourceConfig(batch_rows=3)
    got = [r for s in discover(tmp_path, cfg) for b in read_shard(s, cfg, max_member_bytes=100)
           for r in b.to_pylist()]
    big = next(r for r in got if r["key"] == "000000000")
    assert big["source_error"].startswith("file_too_large") and json.loads(big["meta"])["sha256"] == f"{0:064x}"
