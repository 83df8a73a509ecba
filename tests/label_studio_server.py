"""A real Label Studio for tests, from .venv-tools (`make setup` builds it; its Django pins clash with ours).

Fixtures (register with `pytest_plugins = ["label_studio_server"]` in a conftest or test module):

* ``label_studio`` (session): one server, started the first time a test asks for it, with an admin user whose
  legacy API token the tests use (``server.client()`` is a :class:`tasks.grading.labelstudio.LabelStudio`).

Outside pytest, ``with LabelStudioServer.start() as server: ...`` does the same.

The server (Django's development server, what ``label-studio start`` runs) binds 127.0.0.1 only, keeps its
SQLite database, media and log under its own temporary directory, sends nothing anywhere (Sentry DSNs empty,
analytics and the PyPI version check off, no browser), gets SIGTERM when the process that started it dies
(Linux), and is stopped by its process group: SIGTERM, then SIGKILL after a short wait.

Label Studio migrates a fresh database on first start (a minute or more on a busy two-core machine). The
migrated, still empty database is kept once per Label Studio version beside its venv
(.venv-tools/.t2i-cache/) and copied into each new server's data dir, so later starts take seconds.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from s3_server import _die_with_parent, _free_ports

from tasks.grading.labelstudio import LabelStudio

TOOLS_VENV = Path(os.environ.get("T2I_TOOLS_VENV", Path(__file__).resolve().parent.parent / ".venv-tools"))
START_TIMEOUT_S = 240.0
STOP_GRACE_S = 10.0
DB_NAME = "label_studio.sqlite3"
_STARTED = re.compile(r"Starting development server at http://127\.0\.0\.1:(\d+)/")


class LabelStudioNotFound(RuntimeError):
    pass


def label_studio_binary() -> Path:
    exe = TOOLS_VENV / "bin" / "label-studio"
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise LabelStudioNotFound(f"no {exe}: `make .venv-tools/.setup-stamp` installs Label Studio there "
                                  "(requirements-tools.txt)")
    return exe


def label_studio_version() -> str:
    found = sorted(TOOLS_VENV.glob("lib/python*/site-packages/label_studio-*.dist-info"))
    return found[-1].name.removeprefix("label_studio-").removesuffix(".dist-info") if found else "unknown"


def quiet_env(data_dir: Path) -> dict[str, str]:
    """Label Studio's settings for a private, silent test server (see label_studio/core/settings/)."""
    own = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DATABASE_NAME", "DEBUG", "SECRET_KEY"}
    env = {k: v for k, v in os.environ.items()  # Label Studio reads bare names too (core/utils/params.get_env)
           if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "HEARTEX_", "POSTGRE_", "MYSQL_")) and k not in own}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir), "DJANGO_DB": "sqlite",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",  # default to Heartex's Sentry projects otherwise
        "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "SSRF_PROTECTION_ENABLED": "true",
        "LOG_LEVEL": "WARNING", "DEBUG": "false", "PYTHONUNBUFFERED": "1",
        "HOME": str(data_dir),  # nothing of the tester's home is read or written
    })  # fmt: skip
    return env


def _kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group the server leads (start_new_session), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


def migrated_database(data_dir: Path, timeout: float) -> float:
    """Put a migrated, empty database in data_dir: the cached one, else migrate (``label-studio version``
    applies the migrations and exits) and cache the result. Seconds spent migrating (0 from the cache)."""
    cache = TOOLS_VENV / ".t2i-cache" / f"label-studio-{label_studio_version()}-{DB_NAME}"
    if cache.is_file():
        shutil.copyfile(cache, data_dir / DB_NAME)
        return 0.0
    t0 = time.monotonic()
    log = data_dir.parent / "migrate.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(label_studio_binary()), "version", "--data-dir", str(data_dir)],
                                env=quiet_env(data_dir), cwd=data_dir.parent, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent())
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc, STOP_GRACE_S)
        raise RuntimeError(f"Label Studio's migrations took over {timeout:.0f} s; {log}:\n"
                           + log.read_text(errors="replace")[-3000:]) from None
    if rc != 0 or not (data_dir / DB_NAME).is_file():
        raise RuntimeError(f"Label Studio's migrations failed (rc {rc}); {log}:\n"
                           + log.read_text(errors="replace")[-3000:])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
    shutil.copyfile(data_dir / DB_NAME, tmp)
    os.replace(tmp, cache)
    return time.monotonic() - t0


@dataclass
class LabelStudioServer:
    root: Path
    url: str
    email: str
    password: str
    token: str
    process: subprocess.Popen
    start_s: float  # from spawn to a healthy server answering the token (migrations included)
    migrate_s: float

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.root / "label-studio.log"

    def client(self) -> LabelStudio:
        return LabelStudio(self.url, self.token)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    @classmethod
    def start(cls, *, timeout: float = START_TIMEOUT_S, base_dir: str | Path | None = None,
              cache: bool = True) -> LabelStudioServer:
        """Starts a server with a fresh data dir and waits until its API takes the admin's token; raises
        RuntimeError with the log tail."""
        exe = label_studio_binary()
        t0 = time.monotonic()
        root = Path(tempfile.mkdtemp(prefix="t2i-label-studio-", dir=base_dir))
        data = root / "data"
        data.mkdir()
        migrate_s = migrated_database(data, timeout) if cache else 0.0
        email, password, token = "grader@example.com", secrets.token_urlsafe(12), secrets.token_hex(20)
        # --password=: the password may start with "-" (token_urlsafe), which argparse would take for an option
        cmd = [
            str(exe), "start", "--no-browser", "--data-dir", str(data), "--internal-host", "127.0.0.1",
            "--port", str(_free_ports(1)[0]), "--log-level", "WARNING",
            "--username", email, f"--password={password}", "--user-token", token, "--enable-legacy-api-token",
        ]  # fmt: skip
        with open(root / "label-studio.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=quiet_env(data), cwd=root, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent())
        server = cls(root, "", email, password, token, proc, 0.0, migrate_s)
        try:
            server._wait_ready(t0, timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, t0: float, timeout: float) -> None:
        last = "no answer yet"
        while time.monotonic() - t0 < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}; "
                                   f"{self.log_path}:\n{self.log_tail()}")
            if not self.url and (m := _STARTED.search(self.log_path.read_text(errors="replace"))):
                self.url = f"http://127.0.0.1:{m.group(1)}"  # it takes the next port itself if ours was taken
            if self.url:
                try:
                    health = requests.get(self.url + "/health", timeout=5)
                    if health.ok:
                        self.client().whoami()  # the token works: the user and organization exist
                        self.start_s = time.monotonic() - t0
                        return
                    last = f"/health: HTTP {health.status_code}"
                except (requests.RequestException, RuntimeError) as exc:
                    last = str(exc)
            time.sleep(0.5)
        raise RuntimeError(f"Label Studio not ready after {timeout:.0f} s ({last}); {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """The whole process group, even when its leader is gone (a child may still hold the port)."""
        _kill_group(self.process, grace)

    def __enter__(self) -> LabelStudioServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


_running: list[LabelStudioServer] = []


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Iterator[LabelStudioServer]:
    try:
        server = LabelStudioServer.start(base_dir=tmp_path_factory.mktemp("label-studio"))
    except LabelStudioNotFound as e:
        pytest.fail(str(e), pytrace=False)
    _running.append(server)
    try:
        yield server
    finally:
        _running.remove(server)
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the server gets the server's log tail as a report section."""
    report = (yield).get_result()
    if report.failed and _running and "label_studio" in item.fixturenames:
        server = _running[-1]
        report.sections.append((f"Label Studio log ({server.log_path})", server.log_tail()))
