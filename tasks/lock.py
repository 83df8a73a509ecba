"""One run per output folder, and no Ray processes left behind by a run that was killed.

Two runs writing one ``--out`` race on each other's temporary files and print wrong totals,
so every run (CLI or Prefect flow) holds ``OUT/_lock`` for its whole length: an exclusive
``flock`` on the file, which also holds the holder's host, pid, start time and command. The
kernel drops the lock when its process dies, however it dies, so a lock left by a killed run
is free to take at once (no pid guessing, no stale file to delete). A second run refuses at
start with a message naming the holder. The file itself stays (emptied on release): deleting
a lock file while others may have it open lets two runs lock two different files.

A local Ray runtime is a tree of processes under the driver; when the driver is killed they
linger for a minute or more. Before it starts one, the driver puts a tag unique to it in its
environment (``T2I_RAY_TAG``), which every Ray process it starts inherits, even those spawned
later (a restarted actor) or reparented; ``watch_ray`` starts a small reaper in its own session
(so a kill of the driver's process group does not take it too) that, within a second of the
driver's death, kills every process carrying the tag. The lock records the tag too, and the
next run that takes the lock kills any such process still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

LOCK_NAME = "_lock"
TAG_VAR = "T2I_RAY_TAG"

_held: dict[str, list[int]] = {}  # resolved out -> [fd, depth]: re-entrant within one process


class OutputLocked(RuntimeError):
    """Another live run holds this output."""


def _read(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 1 << 16, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


def _write(fd: int, info: dict[str, Any]) -> None:
    data = json.dumps(info, indent=1).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another run (it has not written its details yet)"
    return (f"pid {info.get('pid')} on {info.get('host')}, running since {info.get('started')} "
            f"({info.get('command')})")


@contextmanager
def output_lock(out: str | Path, command: str) -> Iterator[None]:
    """Hold ``out``'s lock for the block; re-entrant in one process (the Prefect flow holds it
    while its tasks call ``tasks.runner.run``). Raises ``OutputLocked`` naming the holder."""
    out = Path(out)
    key = str(out.resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise OutputLocked(f"{out} is in use by {describe(holder)}; wait for that run to end or stop it, "
                           "or use another --out") from None
    try:
        reap(_read(fd))  # a run killed while holding the lock may have left its Ray processes
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command})
    except BaseException:
        os.close(fd)
        raise
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock


def _ray_processes() -> list[tuple[int, float]]:
    """(pid, create time) of this process's Ray descendants, for operators reading the lock."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if _is_ray(proc):
                found.append((proc.pid, proc.create_time()))
    return found


def note_ray(out: str | Path) -> None:
    """Record the local Ray runtime (its tag and processes) in the held lock, for the next run to reap."""
    held = _held.get(str(Path(out).resolve()))
    if held is None or TAG_VAR not in os.environ:
        return
    info = _read(held[0])
    info["ray_tag"], info["ray"] = os.environ[TAG_VAR], _ray_processes()
    _write(held[0], info)


def reap(info: dict[str, Any]) -> int:
    """Kill the Ray processes a dead run on this host left (those it recorded, those carrying
    its tag); returns how many were killed."""
    tag = info.get("ray_tag")
    if not tag or info.get("host") != socket.gethostname() or psutil.pid_exists(info.get("pid", -1)):
        return 0
    recorded = [(int(pid), float(created)) for pid, created in info.get("ray", [])]
    killed = sum(1 for pid, _ in recorded if psutil.pid_exists(pid))
    _kill_matching(recorded)
    killed += kill_tagged(tag)
    if killed:
        log.warning("stopped %d Ray processes left by a run that was killed", killed)
    return killed


def kill_tagged(tag: str) -> int:
    """SIGKILL every process (but this one) whose environment carries ``tag``; two sweeps, for a
    worker a dying raylet spawned during the first."""
    killed = 0
    for _ in range(2):
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.uids().real == os.getuid() and proc.environ().get(TAG_VAR) == tag:
                    proc.kill()
                    killed += 1
            except psutil.Error:
                continue
    return killed


def watch_ray() -> None:
    """Tag this driver's environment (before Ray starts, so its processes inherit the tag) and
    start the reaper that kills them when the driver dies (see the module docstring)."""
    tag = os.environ[TAG_VAR] = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"  # ours, not a parent's
    # -P: the user's working directory may hold a package of its own named `tasks`
    subprocess.Popen([sys.executable, "-P", "-m", "tasks.lock", str(os.getpid()), tag], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True, env={k: v for k, v in os.environ.items() if k != TAG_VAR})


def _reaper(driver_pid: int, tag: str, interval_s: float = 0.5) -> None:
    """Until the driver is gone (or a zombie), note its descendants (Ray's agents do not inherit
    the tag: raylet starts them with an environment of its own); then kill those and every
    process carrying the tag."""
    seen: dict[int, float] = {}
    try:
        driver = psutil.Process(driver_pid)
        while driver.status() != psutil.STATUS_ZOMBIE:
            for proc in driver.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if _is_ray(proc):  # not the driver's other children (a notebook's, say)
                        seen.setdefault(proc.pid, proc.create_time())
            time.sleep(interval_s)
    except psutil.Error:  # the driver is gone
        pass
    seen.pop(os.getpid(), None)
    _kill_matching(list(seen.items()))
    kill_tagged(tag)


def _is_ray(proc: psutil.Process) -> bool:
    """A Ray process of ours: Ray's binaries and Python entry points, or a renamed worker."""
    cmd = " ".join(proc.cmdline())
    return proc.uids().real == os.getuid() and (cmd.startswith("ray::") or "/ray/" in cmd)


def _kill_matching(processes: list[tuple[int, float]]) -> None:
    """Kill each (pid, create time) still naming the same Ray process (not a reused pid, and
    never another kind of process, whatever a lock file says)."""
    for pid, created in processes:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01 and _is_ray(proc):
                proc.kill()


if __name__ == "__main__":
    _reaper(int(sys.argv[1]), sys.argv[2])
