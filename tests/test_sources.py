"""The three source kinds, keys, auto-detection and unreadable input."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS, photo, photo_samples, write_webdataset

from schemas.config import SourceConfig
from tasks.sources import SourceError, detect_kind, discover, read_shard
from tasks.sources.base import UnreadableSource


def rows(source, cfg: SourceConfig | None = None) -> list[dict]:
    cfg = cfg or SourceConfig(batch_rows=5)
    return [r for shard in discover(source, cfg) for b in read_shard(shard, cfg) for r in b.to_pylist()]


def test_webdataset_streams_keys_captions_and_meta(tmp_path):
    write_webdataset(tmp_path / "a" / "00000.tar", photo_samples())
    write_webdataset(tmp_path / "a" / "00001.tar", photo_samples("x"))
    (tmp_path / "a" / "00000.parquet").write_bytes(b"img2dataset writes sidecars; they are not the source")
    assert detect_kind(tmp_path / "a") == "webdataset"
    got = rows(tmp_path / "a")
    assert len(got) == 2 * len(PHOTOS)
    assert got[0]["key"] == "000000000" and got[0]["caption"].startswith("a photo called")
    assert got[0]["image"] == PHOTOS[0].read_bytes() and '"status"' in got[0]["meta"]
    assert all(r["source_error"] is None for r in got)


def test_webdataset_bad_members(tmp_path):
    tar = write_webdataset(tmp_path / "b.tar", [
        ("k1", photo("cat.jpg"), b"caf\xe9 latte", "jpg"),   # latin-1 bytes: not UTF-8
        ("k2", None, "caption without an image", "jpg"),
        ("k3", photo("cat.jpg"), None, "jpg"),              # no caption: kept for recaptioning
    ])
    got = {r["key"]: r for r in rows(tar)}
    assert got["k1"]["source_error"].startswith("caption_not_utf8")
    assert got["k2"]["source_error"].startswith("missing_image")
    assert got["k3"]["source_error"] is None and got["k3"]["caption"] is None


def broken_tar(tmp_path):
    tar = write_webdataset(tmp_path / "c.tar", photo_samples())
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2] + b"\x00garbage" * 100)
    return tar


SALVAGE = SourceConfig(batch_rows=5, unreadable="salvage")


def test_corrupt_tar_fails_the_shard_by_default(tmp_path):
    with pytest.raises(UnreadableSource, match="tar unreadable after"):
        rows(broken_tar(tmp_path))


def test_corrupt_tar_salvage_yields_rows_before_the_break_and_records_it(tmp_path):
    got = rows(broken_tar(tmp_path), SALVAGE)
    assert 1 <= len(got) < len(PHOTOS) + 1
    assert got[-1]["key"].endswith("/__unreadable_rest__")
    assert got[-1]["source_error"].startswith("source_unreadable")
    assert all(r["source_error"] is None for r in got[:-1])


def test_not_a_tar_at_all(tmp_path):
    bad = tmp_path / "d.tar"
    bad.write_bytes(b"definitely not a tar file" * 10)
    got = rows(bad, SALVAGE)
    assert len(got) == 1 and got[0]["source_error"].startswith("source_unreadable")


def test_parquet_with_configured_columns_and_generated_keys(tmp_path):
    table = pa.table({"img": [photo("cat.jpg"), None, photo("lena.jpg")], "text": ["a cat", "x", "lena"]})
    pq.write_table(table, tmp_path / "p.parquet")
    cfg = SourceConfig(image_column="img", caption_column="text", batch_rows=2)
    got = rows(tmp_path, cfg)
    assert [r["key"] for r in got] == ["p/0", "p/1", "p/2"]
    assert got[1]["source_error"].startswith("missing_image")
    assert got[2]["caption"] == "lena"


def test_parquet_key_column_and_image_struct(tmp_path):
    structs = [{"bytes": photo("cat.jpg"), "path": "cat.jpg"}]
    pq.write_table(pa.table({"key": ["abc"], "image": structs, "caption": ["c"]}), tmp_path / "q.parquet")
    got = rows(tmp_path / "q.parquet", SourceConfig(image_column="image"))
    assert got[0]["key"] == "abc" and got[0]["image"] == photo("cat.jpg")


def test_parquet_missing_column_is_a_clear_error_before_work(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "caption": ["c"]}), tmp_path / "r.parquet")
    with pytest.raises(SourceError, match=r"source\.image_column"):
        discover(tmp_path, SourceConfig())


def test_folder_with_captions_chunks_and_relative_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "cat.jpg").write_bytes(photo("cat.jpg"))
    (tmp_path / "sub" / "cat.txt").write_text("一只猫", encoding="utf-8")
    (tmp_path / "lena.jpg").write_bytes(photo("lena.jpg"))
    (tmp_path / "notes.md").write_text("ignored")
    cfg = SourceConfig(folder_chunk=1)
    shards = discover(tmp_path, cfg)
    assert len(shards) == 2 and len({s.shard_id for s in shards}) == 2
    got = {r["key"]: r for r in rows(tmp_path, cfg)}
    assert got["sub/cat"]["caption"] == "一只猫" and got["lena"]["caption"] is None


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        discover(tmp_path / "nope", SourceConfig())
    with pytest.raises(SourceError, match=r"no \.tar"):
        discover(tmp_path, SourceConfig())


def test_shard_ids_are_unique_and_filename_safe(tmp_path):
    write_webdataset(tmp_path / "a b" / "0.tar", photo_samples())
    write_webdataset(tmp_path / "a_b" / "0.tar", photo_samples())
    ids = [s.shard_id for s in discover(tmp_path, SourceConfig())]
    assert len(set(ids)) == 2 and all("." not in i and "/" not in i and " " not in i for i in ids)


def test_a_directory_named_like_a_tar_does_not_hide_a_folder_of_images(tmp_path):
    (tmp_path / "old.tar").mkdir()
    (tmp_path / "a.jpg").write_bytes(photo("cat.jpg"))
    assert detect_kind(tmp_path) == "folder"


def test_shard_ids_of_non_utf8_file_names():
    """A Latin-1 name from an old archive decodes to surrogates; the shard id must still form."""
    import os
    from pathlib import Path

    from tasks.sources.base import shard_id_for

    root = Path("/data")
    a = shard_id_for(root, Path(os.fsdecode(b"/data/caf\xe9.tar")))
    b = shard_id_for(root, Path("/data/cafe.tar"))
    assert a.startswith("caf") and a != b
