"""Object-store outages ridden out (tasks/storage_retry.py): which errors are retried, the backoff
(a fake clock), every Store call through a flaky filesystem, and end to end against the real
SeaweedFS (tests/s3_server.py) killed mid-run and restarted: a curation and a caption pass that
finish as if nothing happened, and a run whose store stays down past the budget that stops with one
line and is finished by a rerun."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.exceptions as boto_errors
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from test_s3_curate import CONFIG, cli, make_source, outcome, store_of, upload

import tasks.storage_retry as sr
from schemas.config import StorageConfig
from tasks.shards import Manifest
from tasks.storage import ObjectStore, StorageError
from tasks.storage_retry import StoreUnavailable, retry_tally, retrying, transient

if TYPE_CHECKING:  # importing it at run time would load it before pytest registers it as a plugin
    from s3_server import S3Bucket, SeaweedFS

pytest_plugins = ["s3_server"]

REFUSED = "Failed to connect to 127.0.0.1 port 40001 after 0 ms: Could not connect to server"
DOWN = ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect to server; "
        f"Details: {REFUSED}")


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no earlier give-up in this process, and short waits for the fake store."""
    monkeypatch.setattr(sr, "_gave_up_at", None)


# ------------------------------------------------------------------------------------------ what is transient


def _raised(exc: BaseException, wrap: type[Exception] | None = None) -> BaseException:
    """``exc`` as raised (``wrap``: re-raised as tasks.lease.create_once does, ``from None``)."""
    try:
        try:
            raise exc
        except BaseException as inner:
            if wrap is None:
                raise
            raise wrap(f"cannot write s3://b/k: {type(inner).__name__}") from None
    except BaseException as outer:
        return outer


@pytest.mark.parametrize("exc", [
    OSError(f"When getting information for key 'x' in bucket 'b': {DOWN}"),
    OSError("When uploading part for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during UploadPart "
            "operation: curlCode: 56, Failure when receiving data from the peer"),
    OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
    OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Service Unavailable"),
    OSError("AWS Error INTERNAL_FAILURE during ListObjectsV2 operation: We encountered an internal error"),
    OSError("AWS Error THROTTLING during HeadObject operation: Rate exceeded"),
    OSError("google::cloud::Status(UNAVAILABLE: Retry policy exhausted in GetObjectMetadata)"),
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError("timed out"),
    boto_errors.EndpointConnectionError(endpoint_url="http://127.0.0.1:40001/b/k"),
    boto_errors.ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce"}}, "PutObject"),
    boto_errors.ClientError({"Error": {"Code": "503", "Message": ""}}, "PutObject"),
    _raised(boto_errors.ConnectionClosedError(endpoint_url="http://127.0.0.1:40001/b/k"), StorageError),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:40])
def test_what_may_answer_otherwise_later_is_transient(exc: BaseException) -> None:
    assert transient(exc)


@pytest.mark.parametrize("exc", [
    OSError("When getting information for key 'x' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject "
            "operation: No response body."),
    OSError("When listing objects under key '' in bucket 'b': AWS Error NO_SUCH_BUCKET during ListObjectsV2"),
    OSError("AWS Error INVALID_ACCESS_KEY_ID during HeadObject operation: timeout of the key"),  # a refusal wins
    OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during PutObject operation"),
    boto_errors.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject"),
    FileNotFoundError(2, "Path does not exist 'b/shards/x.part00503.parquet'"),
    OSError("When reading key 'shards/x.part00503.parquet' in bucket 'b': Parquet magic bytes not found"),
    ValueError("Parquet file size is 0 bytes"),
    StoreUnavailable(f"the object store did not answer for 90 s (storage.retry_s), reading s3://b/k: {DOWN}"),
], ids=lambda e: type(e).__name__ + ":" + str(e)[:40])
def test_what_no_retry_can_help_is_not(exc: BaseException) -> None:
    assert not transient(exc)


# ------------------------------------------------------------------------------------------ the backoff


class FakeClock:
    """time.monotonic and time.sleep without sleeping: sleep moves the clock."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def failing(times: int, error: BaseException | None = None, then: Any = "done", clock: FakeClock | None = None,
            call_s: float = 0.0) -> Any:
    """An op that raises ``error`` (a refused connection) ``times`` times, each after ``call_s`` of
    the clock, then returns ``then``."""
    calls = []

    def op() -> Any:
        calls.append(1)
        if clock is not None:
            clock.now += call_s
        if len(calls) <= times:
            raise error or OSError(DOWN)
        return then

    op.calls = calls  # type: ignore[attr-defined]
    return op


def test_transient_errors_are_retried_with_doubling_jittered_waits() -> None:
    clock = FakeClock()
    op = failing(6)
    with retry_tally() as tally:
        assert retrying(op, "reading s3://b/k", 90, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0) == "done"
    assert clock.slept == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]  # doubling, capped at MAX_DELAY_S
    assert tally.retries == 6 and len(op.calls) == 7

    low = FakeClock()
    retrying(failing(3), "x", 90, clock=low, sleep=low.sleep, jitter=lambda: 0.0)
    assert low.slept == [0.25, 0.5, 1.0]  # each wait drawn from the upper half of its span

    drawn = FakeClock()
    draws = iter([0.3, 0.9, 0.1])
    retrying(failing(3), "x", 90, clock=drawn, sleep=drawn.sleep, jitter=lambda: next(draws))
    assert drawn.slept == pytest.approx([0.5 * 0.65, 1.0 * 0.95, 2.0 * 0.55])


def test_past_the_budget_the_store_is_unavailable_and_no_wait_runs_over_it() -> None:
    clock = FakeClock()
    op = failing(10**6, clock=clock, call_s=0.1)
    started = clock.now
    with pytest.raises(StoreUnavailable) as raised:
        retrying(op, "reading s3://b/k", 30, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    assert str(raised.value).startswith("the object store did not answer for 30 s (storage.retry_s), "
                                        "reading s3://b/k: AWS Error NETWORK_CONNECTION during GetObject")
    assert "Details" not in str(raised.value)  # curl's detail, said already
    assert isinstance(raised.value, OSError) and isinstance(raised.value.__cause__, OSError)
    assert clock.now - started == pytest.approx(30, abs=0.11)  # the last wait cut to the deadline, one try after
    assert max(clock.slept) <= sr.MAX_DELAY_S


def test_an_error_no_retry_helps_is_raised_at_once() -> None:
    clock = FakeClock()
    denied = OSError("When reading key 'k' in bucket 'b': AWS Error ACCESS_DENIED during GetObject operation")
    op = failing(1, error=denied)
    with retry_tally() as tally, pytest.raises(OSError, match="ACCESS_DENIED"):
        retrying(op, "x", 90, clock=clock, sleep=clock.sleep)
    assert clock.slept == [] and tally.retries == 0 and len(op.calls) == 1
    with pytest.raises(FileNotFoundError):
        retrying(failing(1, error=FileNotFoundError("no such key")), "x", 90, clock=clock, sleep=clock.sleep)
    assert clock.slept == []


def test_a_budget_of_zero_tries_once() -> None:
    clock = FakeClock()
    op = failing(1)
    with pytest.raises(StoreUnavailable, match="did not answer for 0 s"):
        retrying(op, "x", 0, clock=clock, sleep=clock.sleep)
    assert len(op.calls) == 1 and clock.slept == []


def test_after_a_give_up_calls_try_once_until_one_succeeds() -> None:
    """A unit's clean-up after its store failed (deleting its parts, one call each) must not wait
    out the budget once per call; once the store answers again, calls wait as before."""
    clock = FakeClock()
    with pytest.raises(StoreUnavailable):
        retrying(failing(10**6, clock=clock, call_s=1), "first", 30, clock=clock, sleep=clock.sleep)
    for _ in range(3):
        op = failing(10**6)
        with pytest.raises(StoreUnavailable):
            retrying(op, "clean-up", 30, clock=clock, sleep=clock.sleep)
        assert len(op.calls) == 1
    assert retrying(lambda: "back", "x", 30, clock=clock, sleep=clock.sleep) == "back"
    op = failing(2)
    assert retrying(op, "x", 30, clock=clock, sleep=clock.sleep) == "done" and len(op.calls) == 3

    with pytest.raises(StoreUnavailable):  # a give-up long ago says nothing about the store now
        retrying(failing(10**6, clock=clock, call_s=1), "again", 30, clock=clock, sleep=clock.sleep)
    clock.now += 31
    op = failing(2)
    assert retrying(op, "x", 30, clock=clock, sleep=clock.sleep) == "done" and len(op.calls) == 3


def test_a_call_waiting_gives_up_when_another_call_gave_up() -> None:
    clock = FakeClock()
    given_up = []

    def op() -> None:
        if len(given_up) == 0 and clock.now > 1002:  # meanwhile, another thread's call gave up
            given_up.append(1)
            sr._gave_up_at = clock.now
        raise OSError(DOWN)

    with pytest.raises(StoreUnavailable):
        retrying(op, "x", 90, clock=clock, sleep=clock.sleep, jitter=lambda: 1.0)
    assert clock.now < 1010  # not the whole 90 s


def test_retries_are_counted_in_the_innermost_tally_only() -> None:
    clock = FakeClock()
    with retry_tally() as driver:
        retrying(failing(1), "driver", 90, clock=clock, sleep=clock.sleep)
        with retry_tally() as unit:  # a unit run in the driver's process (--no-ray)
            retrying(failing(2), "unit", 90, clock=clock, sleep=clock.sleep)
            assert sr.retries_counted() == 2
        retrying(failing(1), "driver", 90, clock=clock, sleep=clock.sleep)
    assert (driver.retries, unit.retries) == (2, 2)
    assert sr.retries_counted() == 0  # outside any tally
    retrying(failing(1), "nobody counts", 90, clock=clock, sleep=clock.sleep)


# ------------------------------------------------------------------------------------------ every Store call


class _Flaky(pafs.FileSystemHandler):
    """A local folder behind a filesystem that refuses the next ``fail`` calls (and reads) the way
    pyarrow's S3 client does when the server is down."""

    def __init__(self, root: Path):
        self.fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
        self.fail = 0
        self.refused = 0

    def refuse(self) -> None:
        if self.fail > 0:
            self.fail -= 1
            self.refused += 1
            raise OSError(DOWN)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def get_type_name(self) -> str:
        return "flaky"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: Any) -> bool:
        return self is other

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        self.refuse()
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self.refuse()
        return self.fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        self.fs.delete_dir_contents("/")

    def delete_file(self, path: str) -> None:
        self.refuse()
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.refuse()
        self.fs.create_dir(dest.rsplit("/", 1)[0])
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        self.refuse()
        with self.fs.open_input_stream(path) as fh:
            return pa.PythonFile(_FlakyFile(fh.read(), self), mode="r")

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        self.refuse()
        self.fs.create_dir(path.rsplit("/", 1)[0])
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        raise NotImplementedError


class _FlakyFile(io.BytesIO):
    """Reads refused like the filesystem's calls; a refused read leaves the position (as S3's)."""

    def __init__(self, data: bytes, owner: _Flaky):
        super().__init__(data)
        self.owner = owner

    def read(self, n: int | None = -1) -> bytes:
        self.owner.refuse()
        return super().read(n)


def test_every_store_call_on_an_object_store_rides_out_refused_connections(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sr, "FIRST_DELAY_S", 0.001)
    flaky = _Flaky(tmp_path)
    store = ObjectStore(pafs.PyFileSystem(flaky), "b/out", "s3://b/out")
    store.storage = StorageConfig(retry_s=60)
    table = pa.table({"key": [f"k{i}" for i in range(50)], "n": list(range(50))})

    def after_two_refusals(call: Any) -> Any:
        flaky.fail, flaky.refused = 2, 0
        with retry_tally() as tally:
            got = call()
        assert flaky.refused == 2 and tally.retries == 2
        return got

    after_two_refusals(lambda: store.write_bytes("a/x.json", b'{"a": 1}'))
    assert after_two_refusals(lambda: store.read_bytes("a/x.json")) == b'{"a": 1}'
    assert after_two_refusals(lambda: store.info("a/x.json")).size == 8
    after_two_refusals(lambda: store.write_parquet("a/t.parquet", table, 10))
    assert [e.rel for e in after_two_refusals(lambda: store.list("a"))] == ["a/t.parquet", "a/x.json"]
    pf = after_two_refusals(lambda: pq.ParquetFile(store.open_input_file("a/t.parquet")))
    assert after_two_refusals(lambda: pf.read_row_group(3)).equals(table.slice(30, 10))
    stream = after_two_refusals(lambda: store.open_input_stream("a/x.json"))
    assert stream.read(2) == b'{"' and after_two_refusals(lambda: stream.read()) == b'a": 1}'
    with after_two_refusals(lambda: store.open_writer("a/w.bin")) as fh:
        fh.write(b"w")
    after_two_refusals(lambda: store.replace("a/w.bin", "b/w.bin"))
    assert store.read_bytes("b/w.bin") == b"w" and not store.exists("a/w.bin")
    after_two_refusals(lambda: store.delete("b/w.bin"))
    assert not store.exists("b/w.bin")

    flaky.fail = 10**6  # down for good: the budget, then StoreUnavailable naming the call
    store.storage = StorageConfig(retry_s=0.05)
    with pytest.raises(StoreUnavailable, match=r"did not answer for 0.05 s \(storage.retry_s\), reading s3://b/out/a/x"):
        store.read_bytes("a/x.json")


# ------------------------------------------------------------------------------------------ end to end


def _server_bucket(s3_server_factory) -> tuple[SeaweedFS, S3Bucket]:
    """A server of this test's own (it is killed), and a bucket on it."""
    server = s3_server_factory()
    return server, server.new_bucket()


def _wait_for(ready, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def _clean(stderr: str) -> None:
    """No traceback, and none of Ray's cut-short worker tracebacks ("(raylet) Task ... failed")."""
    assert "Traceback" not in stderr and "(raylet)" not in stderr and "File \"" not in stderr, stderr


def _curation(tmp_path: Path, s3: S3Bucket, storage: str = "") -> tuple[list[str], str]:
    """16 tars uploaded, their local curation in tmp_path/ref; returns the CLI's arguments (on Ray)."""
    src = make_source(tmp_path / "src", 16)
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG + storage)
    ref = cli("curate", "--source", str(src), "--out", str(tmp_path / "ref"), "--config", str(config), "--no-ray",
              env={})
    assert ref.returncode == 0, ref.stderr
    return ["curate", "--source", upload(src, s3, "laion"), "--out", s3.uri("curated"), "--config", str(config)], \
        str(tmp_path / "ref")


@pytest.mark.slow
def test_a_ten_second_outage_mid_curation_is_ridden_out(tmp_path: Path, s3_server_factory) -> None:
    server, s3 = _server_bucket(s3_server_factory)
    args, ref = _curation(tmp_path, s3)
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **s3.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = Manifest(store_of(s3, "curated"))
    _wait_for(lambda: len(manifest.done_ids()) >= 2, proc)
    server.kill()
    time.sleep(10)
    server.restart()
    done_at_restart = len(manifest.done_ids())
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert done_at_restart < 16, "the outage must land mid-run"
    summary = json.loads(stdout)
    assert summary["failed"] == {} and summary["shards_done"] == 16
    # the outage was met and ridden out: calls that met the closed port tried again, or shards whose
    # upload broke tried again whole (their calls' retries counted too)
    assert summary["storage_retries"] + summary["units_retried"] >= 1
    _clean(stderr)
    assert outcome(s3.uri("curated"), s3) == outcome(ref)


@pytest.mark.slow
def test_a_store_down_past_the_budget_stops_the_run_and_a_rerun_completes(tmp_path: Path,
                                                                          s3_server_factory) -> None:
    server, s3 = _server_bucket(s3_server_factory)
    # a lease that outlives the budget (else the run stops for the lost lease first) and expires soon after
    args, ref = _curation(tmp_path, s3, "storage: {retry_s: 2, lease_ttl_s: 30}\n")
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **s3.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = Manifest(store_of(s3, "curated"))
    _wait_for(lambda: len(manifest.done_ids()) >= 2, proc)
    server.kill()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, stderr
    _clean(stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert "the object store did not answer for 2 s (storage.retry_s)" in errors[0]
    failed = errors[0].split("failed shards: ", 1)[1].split(";", 1)[0].split(", ")
    # it stopped handing out shards: only those in flight (run.workers: 2) failed, not the 14 others
    assert 1 <= len(failed) <= 2 and errors[0].endswith("run again to resume"), errors[0]
    assert stdout == ""

    server.restart()
    done = manifest.done_ids()
    assert 2 <= len(done) < 16 and not set(failed) & done
    for _ in range(90):  # the stopped run could not release its lease: it expires after its ttl
        resumed = cli(*args, env=s3.env)
        if resumed.returncode != 2 or "is in use" not in resumed.stderr:
            break
        time.sleep(1)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["shards_skipped"] == len(done)
    assert outcome(s3.uri("curated"), s3) == outcome(ref)


def _caption_setup(tmp_path: Path, s3: S3Bucket, storage: dict[str, float] | None = None) -> tuple[list[str], Path]:
    """A curated output of 48 photos (8 parts) on S3 and its local copy captioned without Ray (the
    reference: greedy decoding gives the same captions on Ray); returns the pass's CLI arguments."""
    from test_caption_pass import curate, tiny_config

    from captioners.tiny import build_tiny_models

    out = curate(tmp_path, 48)
    (out / "_lock").unlink()  # the local run's lock file: on S3 it would read as another run's lease
    url = upload(out, s3, "curated")
    cfg = tiny_config(build_tiny_models(tmp_path / "tiny"))
    if storage:
        cfg["storage"] = storage
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    here = subprocess.run([sys.executable, "-m", "t2i.cli", "caption", "--shards", str(out), "--config",
                           str(config), "--no-ray"], capture_output=True, text=True)
    assert here.returncode == 0, here.stderr
    return ["caption", "--shards", url, "--config", str(config)], out


def _remote_captions(s3: S3Bucket) -> dict[str, dict]:
    fs = s3.filesystem()
    rows = {}
    for info in fs.get_file_info(pafs.FileSelector(s3.path("curated/captions"), recursive=False)):
        if info.path.endswith(".parquet"):
            rows |= {r["key"]: r for r in pq.read_table(info.path, filesystem=fs).to_pylist()}
    return rows


@pytest.mark.slow
def test_a_ten_second_outage_mid_caption_pass_is_ridden_out(tmp_path: Path, s3_server_factory) -> None:
    from test_caption_pass import sidecar_rows

    server, s3 = _server_bucket(s3_server_factory)
    args, out = _caption_setup(tmp_path, s3)
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **s3.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = store_of(s3, "curated")
    _wait_for(lambda: store.list("captions/_manifest", ".json"), proc)
    server.kill()
    time.sleep(10)
    server.restart()
    done_at_restart = len(store.list("captions/_manifest", ".json"))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert 1 <= done_at_restart < 8, "the outage must land mid-pass"
    summary = json.loads(stdout)
    assert (summary["parts_done"], summary["set_rows"], summary["failed"]) == (8, 48, {})
    assert summary["storage_retries"] + summary["units_retried"] >= 1  # the outage met and ridden out
    _clean(stderr)
    assert _remote_captions(s3) == sidecar_rows(out)
    assert not store.list("captions/_partial", recursive=True)


@pytest.mark.slow
def test_a_store_down_past_the_budget_stops_the_caption_pass_and_a_rerun_completes(tmp_path: Path,
                                                                                   s3_server_factory) -> None:
    from test_caption_pass import sidecar_rows

    server, s3 = _server_bucket(s3_server_factory)
    args, out = _caption_setup(tmp_path, s3, {"retry_s": 2, "lease_ttl_s": 30})
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", *args], env={**os.environ, **s3.env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = store_of(s3, "curated")
    _wait_for(lambda: store.list("captions/_manifest", ".json"), proc)
    server.kill()
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and stdout == "", stderr
    _clean(stderr)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the object store did not answer for 2 s (storage.retry_s)" in errors[0], stderr
    failed = errors[0].split("failed parts: ", 1)[1].split(";", 1)[0].split(", ")
    assert 1 <= len(failed) <= 2, errors[0]  # the parts in flight (run.workers: 2), not the others

    server.restart()
    done = len(store.list("captions/_manifest", ".json"))
    assert 1 <= done < 8
    for _ in range(90):  # the stopped pass could not release its lease: it expires after its ttl
        resumed = cli(*args, env=s3.env)
        if resumed.returncode != 2 or "is in use" not in resumed.stderr:
            break
        time.sleep(1)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["parts_skipped"], summary["parts_done"], summary["set_rows"]) == (done, 8 - done, 48)
    assert _remote_captions(s3) == sidecar_rows(out)
