"""Source edge cases: odd names, odd tar layouts, odd Parquet files, oversized members.

Each run is checked for accounting: every input row ends in exactly one of shards/ or
rejects/, with a reason.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import add_member, photo
from PIL import Image

from schemas.config import CurateConfig, SourceConfig
from tasks.runner import run
from tasks.sources import SourceError, discover
from tasks.sources import folder as folder_source
from tasks.sources import parquet as parquet_source
from tasks.sources import webdataset as webdataset_source
from tasks.sources.base import UnreadableSource

IMG = photo("lena-face.jpg")  # 52 KB, a real photo
SALVAGE = SourceConfig(batch_rows=2, unreadable="salvage")
LATIN1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not UTF-8, a surrogate in Python


def cheap(source: SourceConfig = SALVAGE) -> CurateConfig:
    """Only what judges accounting; no model, no rule that depends on taste."""
    return CurateConfig(signals={"resolution": {}, "caption": {}}, rules={}, source=source)


def outcome(out: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(kept keys, rejects as (key, reason, error))."""
    def query(kind: str, columns: str) -> list[tuple]:
        if not list((out / kind).glob("*.parquet")):
            return []
        return duckdb.sql(f"SELECT {columns} FROM read_parquet('{out}/{kind}/*.parquet') ORDER BY key").fetchall()

    return [k for (k,) in query("shards", "key")], query("rejects", "key, reason, error")


def run_all(src: Path, out: Path, source: SourceConfig = SALVAGE) -> tuple[list[str], list[tuple[str, str, str]]]:
    summary = run(src, out, cheap(source), use_ray=False)
    assert summary.failed == {}, summary.failed
    return outcome(out)


def rows(source: Path, cfg: SourceConfig = SALVAGE, **kw) -> list[dict]:
    readers = {"webdataset": webdataset_source.read, "parquet": parquet_source.read, "folder": folder_source.read}
    return [r for s in discover(source, cfg) for b in readers[s.kind](s, cfg, **kw) for r in b.to_pylist()]


def write_tar(path: Path, members: list[tuple[str, bytes]], **kw) -> Path:
    with tarfile.open(path, "w", **kw) as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


# B4: names that are not UTF-8


def test_tar_member_with_latin1_name_keeps_its_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / f"{LATIN1}.tar", [(f"{LATIN1}.jpg", IMG), (f"{LATIN1}.txt", b"a cafe"), ("good.jpg", IMG),
                              ("good.txt", b"good")], format=tarfile.GNU_FORMAT, encoding="latin-1")
    kept, rejects = run_all(src, tmp_path / "out")
    assert sorted(kept + [k for k, _, _ in rejects]) == ["caf\\xe9", "good"]
    got = {r["key"]: r for r in rows(src)}
    assert got["caf\\xe9"]["caption"] == "a cafe" and got["caf\\xe9"]["image"] == IMG
    assert got["caf\\xe9"]["source"].endswith("/caf\\xe9.tar")


def test_folder_image_with_latin1_name_keeps_its_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{LATIN1}.jpg").write_bytes(IMG)
    (src / f"{LATIN1}.txt").write_bytes(b"a cafe")
    (src / "good.jpg").write_bytes(IMG)
    kept, rejects = run_all(src, tmp_path / "out")
    assert sorted(kept + [k for k, _, _ in rejects]) == ["caf\\xe9", "good"]
    row = next(r for r in rows(src) if r["key"] == "caf\\xe9")
    assert row["caption"] == "a cafe" and row["source"].endswith("caf\\xe9.jpg")


# B5: a tar whose members are not grouped by key


def test_noncontiguous_key_fragments_are_rejected_clearly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()  # as `tar cf x.tar *.jpg *.txt` writes it
    write_tar(src / "x.tar", [("split.jpg", IMG), ("other.jpg", IMG), ("split.txt", b"s"), ("other.txt", b"o")])
    got = rows(src)
    assert [(r["key"], (r["source_error"] or "").split(":")[0]) for r in got] == [
        ("split", ""), ("other", ""), ("split", "noncontiguous_key"), ("other", "noncontiguous_key")]
    assert "not adjacent" in got[2]["source_error"] and got[2]["caption"] == "s"
    kept, rejects = run_all(src, tmp_path / "out")
    assert kept == ["other", "split"]
    assert [(k, reason) for k, reason, _ in rejects] == [("other", "noncontiguous_key"), ("split", "noncontiguous_key")]


def test_a_whole_sample_repeated_in_one_tar_is_left_to_the_key_dedupe(tmp_path):
    tar = write_tar(tmp_path / "x.tar", [("a.jpg", b"bad"), ("a.txt", b"1"), ("b.jpg", IMG),
                                         ("a.jpg", IMG), ("a.txt", b"2")])
    got = rows(tar)
    assert [r["key"] for r in got] == ["a", "b", "a"] and all(r["source_error"] is None for r in got)


# B6: caption columns that are not strings


def test_parquet_binary_captions_are_decoded_as_utf8(tmp_path):
    table = pa.table({"jpg": [IMG, IMG], "caption": pa.array([b"hello", b"caf\xe9"], pa.binary())})
    pq.write_table(table, tmp_path / "p.parquet")
    got = rows(tmp_path)
    assert got[0]["caption"] == "hello" and got[0]["source_error"] is None
    assert got[1]["caption"] is None and got[1]["source_error"].startswith("caption_not_utf8")


def test_parquet_list_caption_column_is_a_clear_error_before_work(tmp_path):
    pq.write_table(pa.table({"jpg": [IMG], "caption": [["a", "b"]]}), tmp_path / "p.parquet")
    with pytest.raises(SourceError, match=r"caption column 'caption' has type list"):
        discover(tmp_path, SALVAGE)


# B7: Parquet files of the same name in different folders


def test_parquet_generated_keys_keep_same_named_files_apart(tmp_path):
    src = tmp_path / "src"
    for year in ("year=2023", "year=2024"):
        (src / year).mkdir(parents=True)
        pq.write_table(pa.table({"jpg": [IMG, IMG], "caption": ["a", "b"]}), src / year / "part-0.parquet")
    pq.write_table(pa.table({"jpg": [IMG], "caption": ["top"]}), src / "part-1.parquet")
    assert sorted(r["key"] for r in rows(src)) == [
        "part-1/0", "year=2023/part-0/0", "year=2023/part-0/1", "year=2024/part-0/0", "year=2024/part-0/1"]
    kept, rejects = run_all(src, tmp_path / "out")
    assert len(kept) + len(rejects) == 5 and len(set(kept) | {k for k, _, _ in rejects}) == 5
    assert "duplicate_key" not in {reason for _, reason, _ in rejects}


# B9: a Parquet file with one corrupt row group


def corrupt_parquet(path: Path) -> Path:
    """Three row groups of two rows; the second group's image data page is overwritten."""
    table = pa.table({"jpg": [IMG] * 6, "caption": [f"c{i}" for i in range(6)]})
    pq.write_table(table, path, row_group_size=2, use_dictionary=False)
    offset = pq.read_metadata(path).row_group(1).column(0).data_page_offset
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 64)
    return path


def test_corrupt_row_group_salvage_rejects_only_its_rows(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    corrupt_parquet(src / "p.parquet")
    got = rows(src)
    assert [r["key"] for r in got] == [f"p/{i}" for i in range(6)]
    assert [bool(r["source_error"]) for r in got] == [False, False, True, True, False, False]
    assert got[2]["source_error"].startswith("source_unreadable: row group 1")
    kept, rejects = run_all(src, tmp_path / "out")
    assert sorted(kept + [k for k, _, _ in rejects]) == [f"p/{i}" for i in range(6)]
    assert [(k, reason) for k, reason, _ in rejects] == [("p/2", "source_unreadable"), ("p/3", "source_unreadable")]


def test_corrupt_row_group_fails_the_shard_by_default(tmp_path):
    corrupt_parquet(tmp_path / "p.parquet")
    with pytest.raises(UnreadableSource, match="row group 1"):
        rows(tmp_path, SourceConfig())


# B10: members are size-checked before they are read


def test_tar_oversized_and_unknown_members_are_never_read(tmp_path, monkeypatch):
    small = tiny_jpeg()
    tar = write_tar(tmp_path / "x.tar", [("big.jpg", IMG), ("big.txt", b"big"), ("clip.mp4", b"\0" * 2_000_000),
                                         ("small.jpg", small), ("small.txt", b"small")])
    opened: list[str] = []
    extract = tarfile.TarFile.extractfile

    def spy(self, member):
        opened.append(member.name)
        return extract(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    got = {r["key"]: r for r in rows(tar, max_member_bytes=10_000)}
    assert opened == ["big.txt", "small.jpg", "small.txt"]
    assert got["big"]["image"] is None and got["big"]["caption"] == "big"
    assert got["big"]["source_error"] == f"file_too_large: {len(IMG)} bytes > max_file_bytes 10000 (big.jpg)"
    assert got["clip"]["source_error"].startswith("missing_image")
    assert got["small"]["image"] == small and got["small"]["source_error"] is None


def test_folder_oversized_image_is_not_read(tmp_path, monkeypatch):
    (tmp_path / "big.jpg").write_bytes(IMG)
    (tmp_path / "small.jpg").write_bytes(tiny_jpeg())
    read_bytes = Path.read_bytes
    opened: list[str] = []

    def spy(self):
        opened.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", spy)
    got = {r["key"]: r for r in rows(tmp_path, max_member_bytes=10_000)}
    assert opened == ["small.jpg"]
    assert got["big"]["image"] is None and got["big"]["source_error"].startswith("file_too_large: ")


# Links


def test_folder_broken_symlink_with_caption_leaves_a_reject(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (src / "gone.txt").write_text("a caption")
    (src / "good.jpg").write_bytes(IMG)
    kept, rejects = run_all(src, tmp_path / "out")
    assert kept == ["good"] and [(k, reason) for k, reason, _ in rejects] == [("gone", "missing_image")]
    assert "symlink" in rejects[0][2]


def test_tar_link_members_are_unreadable_not_missing(tmp_path):
    tar = tmp_path / "x.tar"
    with tarfile.open(tar, "w") as t:
        add_member(t, "a.jpg", IMG)
        link = tarfile.TarInfo("b.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        t.addfile(link)
        add_member(t, "b.txt", b"linked")
    got = {r["key"]: r for r in rows(tar)}
    assert got["a"]["source_error"] is None
    assert got["b"]["source_error"].startswith("source_unreadable: b.jpg is a link member")
    assert got["b"]["caption"] == "linked"


def test_directories_named_like_source_files_are_not_shards(tmp_path):
    write_tar(tmp_path / "0.tar", [("a.jpg", IMG)])
    (tmp_path / "old.tar").mkdir()
    (tmp_path / "old.tar" / "b.parquet").mkdir()
    assert [r["key"] for r in rows(tmp_path)] == ["a"]
    pq.write_table(pa.table({"jpg": [IMG], "caption": ["c"]}), tmp_path / "old.tar" / "p.parquet")
    assert [r["key"] for r in rows(tmp_path / "old.tar")] == ["p/0"]
