"""One run per output folder, and no Ray processes left behind by a run that was killed.

Two runs writing one ``--out`` race on each other's temporary files and print wrong totals,
so every run (CLI or Prefect flow) holds ``OUT/_lock`` for its whole length: an exclusive
``flock`` on the file, which also holds the holder's host, pid, start time and command. The
kernel drops the lock when its process dies, however it dies, so a lock left by a killed run
is free to take at once (no pid guessing, no stale file to delete). A second run refuses at
start with a message naming the holder. The file itself stays (emptied on release): deleting
a lock file while others may have it open lets two runs lock two different files.

A local Ray runtime is a tree of processes under the driver; when the driver is killed they
linger for a minute or more. ``watch_ray`` starts a small reaper in its own session (so a
kill of the driver's process group does not take it too) that kills the driver's Ray
processes within a second of the driver's death; the lock also records them, and the next
run that takes the lock kills any that are still there.
"""

from __future__ import annotations

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
    """(pid, create time) of this process's Ray descendants (a local runtime's GCS, raylet,
    agents and workers)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if _is_ray(proc):
                found.append((proc.pid, proc.create_time()))
        except psutil.Error:
            continue
    return found


def _is_ray(proc: psutil.Process) -> bool:
    cmd = " ".join(proc.cmdline())
    return cmd.startswith("ray::") or "/ray/" in cmd


def note_ray(out: str | Path) -> None:
    """Record the local Ray runtime's processes in the held lock, for the next run to reap."""
    held = _held.get(str(Path(out).resolve()))
    if held is None:
        return
    info = _read(held[0])
    info["ray"] = _ray_processes()
    _write(held[0], info)


def reap(info: dict[str, Any]) -> int:
    """Kill the Ray processes a dead run on this host recorded; returns how many were killed.
    A pid is only killed if its process is the one recorded (same create time)."""
    if not info.get("ray") or info.get("host") != socket.gethostname() or psutil.pid_exists(info.get("pid", -1)):
        return 0
    return _kill_matching([(int(pid), float(created)) for pid, created in info["ray"]])


def _kill_matching(processes: list[tuple[int, float]]) -> int:
    killed = 0
    for pid, created in processes:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01:
                proc.kill()
                killed += 1
        except psutil.Error:
            continue
    if killed:
        log.warning("stopped %d Ray processes left by a run that was killed", killed)
    return killed


def watch_ray() -> None:
    """Start the reaper for this driver's local Ray runtime (see the module docstring)."""
    subprocess.Popen([sys.executable, "-m", "tasks.lock", str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     close_fds=True)


def _reaper(driver_pid: int, interval_s: float = 0.5) -> None:
    """Snapshot the driver's Ray descendants until the driver is gone, then kill them."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return
    seen: dict[int, float] = {}
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                break
            for proc in driver.children(recursive=True):
                try:
                    if _is_ray(proc):
                        seen[proc.pid] = proc.create_time()
                except psutil.Error:
                    continue
        except psutil.Error:  # the driver is gone
            break
        time.sleep(interval_s)
    _kill_matching(list(seen.items()))


if __name__ == "__main__":
    _reaper(int(sys.argv[1]))
