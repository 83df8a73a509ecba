"""`t2i up` / `t2i down`: a local Prefect server (SQLite), a process work pool, a worker,
and the deployments of prefect.yaml, all on 127.0.0.1.

State lives in ``.t2i/`` (or ``T2I_STATE_DIR``): the SQLite database, logs, and
``stack.json`` with the pids this command started, so `t2i down` stops those and only
those. Setting ``PREFECT_API_URL`` to an existing server skips starting one here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
POOL = "t2i-local"


class StackError(RuntimeError):
    """The local stack cannot be brought up (or the server named by PREFECT_API_URL does not
    answer); the message says what to do."""


def state_dir() -> Path:
    return Path(os.environ.get("T2I_STATE_DIR", PROJECT / ".t2i")).resolve()


@dataclass
class Stack:
    api_url: str
    ui_url: str
    server_pid: int | None  # None: an existing server, not ours to stop
    worker_pid: int | None

    def save(self) -> None:
        (state_dir() / "stack.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls) -> Stack | None:
        path = state_dir() / "stack.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


# Seconds between the local worker's polls for scheduled runs. Prefect's default, 10, makes every
# `prefect deployment run` on this one-machine stack wait 5 s on average before it starts; a poll
# of the local SQLite server costs a few ms. A team's setting in the environment wins.
WORKER_QUERY_SECONDS = "1"


def prefect_env(api_url: str) -> dict[str, str]:
    env = {"PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_SECONDS}
    env.update(os.environ)
    env.update({
        "PREFECT_HOME": str(state_dir() / "prefect"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "T2I_PROJECT_DIR": str(PROJECT),
    })
    return env


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _spawn(args: list[str], log_name: str, env: dict[str, str]) -> int:
    log = open(state_dir() / log_name, "ab")  # noqa: SIM115 - the child keeps the handle
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=PROJECT, start_new_session=True)
    return proc.pid


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not come up within {timeout_s:.0f} s; see the logs in {state_dir()}")
        time.sleep(0.25)


def _run(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(args, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise StackError(f"{' '.join(args[1:])} failed:\n{result.stdout}\n{result.stderr}")


def up(port: int = 4200) -> Stack:
    """Start (or reuse) the server, create the pool, deploy prefect.yaml, start a worker."""
    state_dir().mkdir(parents=True, exist_ok=True)
    before = Stack.load()
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        api_url, server_pid = existing.rstrip("/"), None
        if not healthy(api_url):
            raise StackError(f"nothing answers at PREFECT_API_URL={existing} (no {api_url}/health); start that "
                             "server, or unset PREFECT_API_URL and run `t2i up` to start a local one")
    elif before and before.server_pid and alive(before.server_pid) and healthy(before.api_url):
        api_url, server_pid = before.api_url, before.server_pid
    else:
        api_url = f"http://127.0.0.1:{port}/api"
        env = prefect_env(api_url)
        server_pid = _spawn([_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            "server.log", env)
        _wait("the Prefect server", lambda: healthy(api_url) or not alive(server_pid), 90)
        if not alive(server_pid):
            raise StackError(f"the Prefect server exited; see {state_dir() / 'server.log'}")
    env = prefect_env(api_url)
    _run([_prefect(), "--no-prompt", "work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    _run([_prefect(), "--no-prompt", "deploy", "--all"], env)
    worker_pid = before.worker_pid if before and alive(before.worker_pid) else None
    if worker_pid is None:
        worker_pid = _spawn([_prefect(), "worker", "start", "--pool", POOL, "--type", "process"], "worker.log", env)
    stack = Stack(api_url, api_url.removesuffix("/api"), server_pid, worker_pid)
    stack.save()
    return stack


def _stop(pid: int | None, timeout_s: float = 20) -> None:
    """SIGINT twice (a Prefect worker wants two), then SIGTERM, then SIGKILL, to the
    process group this stack started, so a worker's flow-run children go too."""
    if not alive(pid):
        return
    for sig, wait in ((signal.SIGINT, 3), (signal.SIGINT, timeout_s / 2), (signal.SIGTERM, timeout_s / 2)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            return
    os.killpg(pid, signal.SIGKILL)


def down() -> None:
    stack = Stack.load()
    if stack is None:
        return
    _stop(stack.worker_pid)
    _stop(stack.server_pid)
    (state_dir() / "stack.json").unlink(missing_ok=True)
