"""Every source kind read from an object store (a real S3: SeaweedFS on 127.0.0.1, tests/s3_server.py)
gives what the same files give on a local disk: shard ids, keys, captions, image bytes, meta and errors;
tars stream, fingerprints follow overwrites, and a source that cannot be read fails before any work."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import photo, photo_samples, write_webdataset
from corpus import build
from test_source_edge_cases import corrupt_parquet

from schemas.config import SourceConfig, StorageConfig
from tasks.sources import SourceError, detect_kind, discover, fingerprint, read_shard
from tasks.sources import base as sources_base
from tasks.sources.base import UnreadableSource
from tasks.storage import ObjectStore

if TYPE_CHECKING:
    from s3_server import S3Bucket

pytest_plugins = ["s3_server"]  # the fixtures s3_server and s3

SALVAGE = SourceConfig(batch_rows=3, unreadable="salvage", folder_chunk=2)


def settings(s3: S3Bucket, **override) -> StorageConfig:
    return StorageConfig(**({"endpoint_url": s3.endpoint_url, "region": s3.region, "access_key_id": s3.access_key,
                             "secret_access_key": s3.secret_key} | override))


def upload(s3: S3Bucket, local: Path, prefix: str) -> str:
    """Every file below ``local`` to ``prefix/`` in the bucket; returns the prefix's URL."""
    pafs.copy_files(str(local), s3.path(prefix), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3.filesystem())
    return s3.uri(prefix)


def curate(source: str | Path, cfg: SourceConfig, storage: StorageConfig | None = None,
           limit: int = 10_000_000) -> tuple[list[tuple], list[dict]]:
    """(shards as (id, kind, members), rows), each row's ``source`` made relative to the source's folder."""
    root = str(source) if isinstance(source, str) else str(Path(source).resolve())
    if root.endswith((".tar", ".parquet")):
        root = root.rpartition("/")[0]
    shards = discover(source, cfg, storage)
    rows = []
    for shard in shards:
        for batch in read_shard(shard, cfg, limit, storage):
            for row in batch.to_pylist():
                assert row["source"].startswith(root + "/"), row["source"]
                rows.append(row | {"source": row["source"][len(root):]})
    return [(s.shard_id, s.kind, s.members) for s in shards], rows


def assert_same(local: Path, url: str, storage: StorageConfig, cfg: SourceConfig = SALVAGE, **kw) -> list[dict]:
    local_shards, local_rows = curate(local, cfg, **kw)
    remote_shards, remote_rows = curate(url, cfg, storage, **kw)
    assert remote_shards == local_shards
    assert remote_rows == local_rows
    return remote_rows


# ------------------------------------------------------------------------------------- the three kinds


def test_webdataset_on_s3_reads_as_it_does_locally(s3, tmp_path):
    src = tmp_path / "wds"
    build(src)  # two tars of odd and broken samples, and a third cut short
    write_webdataset(src / "nested" / "x y" / "00003.tar", photo_samples("n"))
    (src / "00000.parquet").write_bytes(b"img2dataset writes sidecars; they are not the source")
    url = upload(s3, src, "corpus/wds")
    assert detect_kind(url, settings(s3)) == "webdataset"
    rows = assert_same(src, url, settings(s3))
    assert next(r for r in rows if r["key"] == "good_photo_0")["image"] == photo("cat.jpg")
    broken = [r for r in rows if r["key"].endswith("/__unreadable_rest__")]
    assert len(broken) == 1 and broken[0]["source_error"].startswith("source_unreadable: tar unreadable after")
    assert any(r["meta"] and '"status"' in r["meta"] for r in rows)
    # the default, unreadable: fail, fails the cut tar on S3 as it does locally
    shard = next(s for s in discover(url, SourceConfig(), settings(s3)) if s.path.endswith("00002.tar"))
    assert shard.path == s3.uri("corpus/wds/00002.tar")
    with pytest.raises(UnreadableSource, match="tar unreadable after"):
        list(read_shard(shard, SourceConfig(), storage=settings(s3)))


def test_parquet_on_s3_reads_as_it_does_locally(s3, tmp_path):
    src = tmp_path / "pq"
    for year in ("year=2023", "year=2024"):  # same file names, no key column: keys from the relative path
        (src / year).mkdir(parents=True)
        table = pa.table({"jpg": [photo("lena-face.jpg"), None, photo("cat.jpg"), b"x", photo("lena.jpg")],
                          "caption": [f"{year} {i}" for i in range(5)]})
        pq.write_table(table, src / year / "part-0.parquet", row_group_size=2)
    keyed = pa.table({"key": ["a", "b", "c"], "jpg": [photo("img3.jpg")] * 3,
                      "caption": pa.array([b"ok", b"caf\xe9", b"fine"], pa.binary())})
    pq.write_table(keyed, src / "keyed.parquet", row_group_size=1)
    corrupt_parquet(src / "broken.parquet")  # its second row group is rejected, the others are read
    url = upload(s3, src, "corpus/pq")
    rows = assert_same(src, url, settings(s3), limit=150_000)
    keys = [r["key"] for r in rows]
    assert keys[:6] == [f"broken/{i}" for i in range(6)] and "year=2024/part-0/4" in keys
    errors = {r["key"]: (r["source_error"] or "").split(":")[0] for r in rows}
    assert errors["broken/2"] == "source_unreadable" and errors["b"] == "caption_not_utf8"
    assert errors["year=2023/part-0/1"] == "missing_image" and errors["year=2023/part-0/2"] == "file_too_large"
    single = s3.uri("corpus/pq/keyed.parquet")
    assert curate(single, SALVAGE, settings(s3)) == curate(src / "keyed.parquet", SALVAGE)


def test_parquet_row_groups_are_fetched_as_read_and_discovery_reads_footers(s3, tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    pq.write_table(pa.table({"jpg": [photo("blip.jpg")] * 12, "caption": ["c"] * 12}), src / "p.parquet",
                   row_group_size=2)
    url = upload(s3, src, "big")
    size = (src / "p.parquet").stat().st_size
    reads = count_reads(url, "open_input_file", lambda: discover(url, SALVAGE, settings(s3)))
    assert 0 < reads < size / 20  # the footer only
    shard = discover(url, SALVAGE, settings(s3))[0]
    batches = read_shard(shard, SourceConfig(batch_rows=2), storage=settings(s3))
    reads = count_reads(url, "open_input_file", lambda: next(batches))
    assert reads < size / 3  # one row group of six (and the footer)


def test_folder_on_s3_reads_as_it_does_locally(s3, tmp_path):
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "deep" / "a" / "b").mkdir(parents=True)
    (src / "sub" / "cat.jpg").write_bytes(photo("cat.jpg"))
    (src / "sub" / "cat.txt").write_text("一只猫", encoding="utf-8")
    (src / "lena.jpg").write_bytes(photo("lena.jpg"))  # no caption: kept for recaptioning
    (src / "deep" / "a" / "b" / "img1.png").write_bytes(photo("img1.png"))
    (src / "deep" / "a" / "b" / "img1.txt").write_text("deep down")
    (src / "deep" / "bad.jpg").write_bytes(photo("img3.jpg"))
    (src / "deep" / "bad.txt").write_bytes(b"\xff\xfe broken")
    (src / "deep" / "big.jpg").write_bytes(photo("blip.jpg"))  # over the limit below: never read
    (src / "notes.md").write_text("not an image")
    url = upload(s3, src, "corpus/folder")
    rows = assert_same(src, url, settings(s3), limit=200_000)
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == ["deep/a/b/img1", "deep/bad", "deep/big", "lena", "sub/cat"]
    assert by_key["sub/cat"]["caption"] == "一只猫" and by_key["sub/cat"]["image"] == photo("cat.jpg")
    assert by_key["lena"]["caption"] is None and by_key["lena"]["source_error"] is None
    assert by_key["deep/big"]["source_error"].startswith("file_too_large: 496395 bytes")
    assert by_key["deep/bad"]["source_error"].startswith("caption_not_utf8")
    assert by_key["sub/cat"]["source"] == "/sub/cat.jpg"


def test_oversized_folder_images_on_s3_are_never_fetched(s3, tmp_path):
    src = tmp_path / "folder"
    src.mkdir()
    (src / "big.jpg").write_bytes(photo("blip.jpg"))
    (src / "small.jpg").write_bytes(photo("lena-face.jpg"))
    url = upload(s3, src, "f")
    shard = discover(url, SALVAGE, settings(s3))[0]
    got = []
    reads = count_reads(url, "open_input_stream", lambda: got.extend(read_shard(shard, SALVAGE, 100_000,
                                                                              settings(s3))))
    assert reads == len(photo("lena-face.jpg"))
    assert got[0].column("source_error").to_pylist()[0].startswith("file_too_large")


# ------------------------------------------------------------------------------------- streaming


def count_reads(url: str, method: str, action) -> int:
    """Bytes ``action`` fetched through ``ObjectStore.<method>`` of stores below ``url``."""
    counted = [0]
    original = getattr(ObjectStore, method)

    class Counting:
        def __init__(self, raw):
            self.raw = raw

        def read(self, n=-1):
            data = self.raw.read(n)
            counted[0] += len(data)
            return data

        def read_buffer(self, n=-1):  # what pyarrow calls where it can
            data = self.raw.read_buffer(n)
            counted[0] += data.size
            return data

        def __getattr__(self, name):
            return getattr(self.raw, name)

    def spy(store, rel):
        return pa.PythonFile(Counting(original(store, rel)), mode="r") if store.url().startswith(url) else \
            original(store, rel)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ObjectStore, method, spy)
        action()
    return counted[0]


def test_a_tar_on_s3_is_streamed_not_fetched_whole(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(sources_base, "STREAM_BUFFER", 256 << 10)
    samples = [(f"{i:05d}", photo("blip.jpg"), f"caption {i}", "jpg") for i in range(12)]
    tar = write_webdataset(tmp_path / "src" / "00000.tar", samples)
    url = upload(s3, tmp_path / "src", "stream")
    shard = discover(url, SourceConfig(batch_rows=1), settings(s3))[0]
    batches = read_shard(shard, SourceConfig(batch_rows=1), storage=settings(s3))
    first = count_reads(url, "open_input_stream", lambda: next(batches))
    assert first < tar.stat().st_size / 4  # one sample and a buffer, not the tar
    assert len(list(batches)) == 11


# ------------------------------------------------------------------------------------- fingerprints


def put(s3: S3Bucket, key: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(s3.path(key)) as fh:
        fh.write(data)


def test_fingerprint_follows_overwrites_and_missing_objects(s3, tmp_path):
    write_webdataset(tmp_path / "w" / "00000.tar", photo_samples())
    tar = discover(upload(s3, tmp_path / "w", "w"), SALVAGE, settings(s3))[0]
    before = fingerprint(tar, settings(s3))
    assert before == fingerprint(tar, settings(s3)) and before["size"] == (tmp_path / "w" / "00000.tar").stat().st_size
    put(s3, "w/00000.tar", b"\0" * 1024)  # overwritten (S3 times are whole seconds: the size tells)
    assert fingerprint(tar, settings(s3)) != before
    s3.filesystem().delete_file(s3.path("w/00000.tar"))
    with pytest.raises(OSError, match="no such object"):
        fingerprint(tar, settings(s3))
    gone = [r for b in read_shard(tar, SALVAGE, storage=settings(s3)) for r in b.to_pylist()]
    assert len(gone) == 1 and gone[0]["source_error"].startswith("source_unreadable")

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.jpg").write_bytes(photo("cat.jpg"))
    chunk = discover(upload(s3, tmp_path / "f", "f"), SALVAGE, settings(s3))[0]
    before = fingerprint(chunk, settings(s3))
    put(s3, "f/a.txt", b"a caption, added")
    assert fingerprint(chunk, settings(s3)) != before


# ------------------------------------------------------------------------------------- unreadable sources


def test_credentials_from_the_environment(s3, tmp_path, monkeypatch):
    write_webdataset(tmp_path / "w" / "00000.tar", photo_samples())
    url = upload(s3, tmp_path / "w", "env")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    shards = discover(url, SALVAGE)
    assert [s.path for s in shards] == [s3.uri("env/00000.tar")]
    assert sum(b.num_rows for b in read_shard(shards[0], SALVAGE)) == len(list(photo_samples()))
    assert fingerprint(shards[0])["size"] > 0


@pytest.mark.parametrize("case", ["missing prefix", "missing bucket", "wrong secret", "unknown key", "one file"])
def test_unreadable_sources_fail_at_once_with_a_clear_message(s3, case):
    put(s3, "there/x.jpg", photo("lena-face.jpg"))
    url, storage, expected = {
        "missing prefix": (s3.uri("nothing/here"), settings(s3), r"source not found: s3://.*/nothing/here"),
        "missing bucket": (f"s3://{s3.bucket}-gone/there", settings(s3), rf"bucket {s3.bucket}-gone does not exist"),
        "wrong secret": (s3.uri("there"), settings(s3, secret_access_key="not-the-secret"), "wrong secret key"),
        "unknown key": (s3.uri("there"), settings(s3, access_key_id="AKNOSUCHKEY"), "unknown access key"),
        "one file": (s3.uri("there/x.jpg"), settings(s3), "a source file must be .tar or .parquet"),
    }[case]
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=expected) as raised:
        discover(url, SALVAGE, storage)
    assert time.monotonic() - t0 < 5
    assert url.rstrip("/") in str(raised.value) and s3.secret_key not in str(raised.value)
