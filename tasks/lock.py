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

An output on an object store (``s3://``) has no flock: its lock is a lease, the object
``OUT/_lock`` written with a conditional put and renewed while the run lives (``tasks.lease``:
one holder at a time, a killed holder's lease expires after its ttl, 60 s by default, rather than
at once). A lease can be lost (a network partition longer than the ttl, someone deleting or
overwriting the object): ``output_lock`` yields a ``Held`` whose ``lost`` says so, and
``lock_lost(out)`` asks the same from code that only has the output's name; a run that finds it
lost must stop, since another run may now be writing the output. The Ray tag goes into the lease
body, and reaping stays what it is: only a dead holder's processes on this host.
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
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:  # not imported at run time: the reaper (python -m tasks.lock) stays light
    from schemas.config import StorageConfig
    from tasks.lease import Lease

log = logging.getLogger(__name__)

LOCK_NAME = "_lock"
TAG_VAR = "T2I_RAY_TAG"


class OutputLocked(RuntimeError):
    """Another live run holds this output."""


@dataclass
class Held:
    """What ``output_lock`` yields: the lock this process holds on one output (the flock's file
    descriptor, or the lease on an object store)."""

    fd: int | None = None
    lease: Lease | None = None
    depth: int = 1

    @property
    def lost(self) -> bool:
        """The lease was lost (another run may hold the output now): stop the run. A flock
        cannot be lost while its process lives."""
        return self.lease is not None and self.lease.lost

    def note(self, **fields: Any) -> None:
        """Add ``fields`` to what the lock says about its holder (for the next run to read)."""
        if self.lease is not None:
            self.lease.note(**fields)
        elif self.fd is not None:
            _write(self.fd, _read(self.fd) | fields)

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
        elif self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                os.close(self.fd)  # closing drops the flock


_held: dict[str, Held] = {}  # _key(out) -> the lock held: re-entrant within one process


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


def in_use(out: str | Path, holder: dict[str, Any]) -> str:
    """The refusal's text, one shape for a flock and a lease."""
    return f"{out} is in use by {describe(holder)}; wait for that run to end or stop it, or use another --out"


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def holder_info(command: str) -> dict[str, Any]:
    """Who holds the lock, as the lock records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now_text(), "command": command}


def _remote(out: str | Path) -> bool:
    return urllib.parse.urlsplit(str(out)).scheme in ("s3", "gs")  # tasks.storage.is_remote, without pyarrow


def _key(out: str | Path) -> str:
    """One name per output: its store URL (``s3://bucket/prefix``), or its resolved path."""
    if _remote(out):
        parts = urllib.parse.urlsplit(str(out))
        return f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    return str(Path(out).resolve())


@contextmanager
def output_lock(out: str | Path, command: str, storage: StorageConfig | None = None) -> Iterator[Held]:
    """Hold ``out``'s lock for the block: a flock for a local folder, a lease (``tasks.lease``)
    for an ``s3://`` output, reached with ``storage``. Re-entrant in one process (the Prefect
    flow holds it while its tasks call ``tasks.runner.run``). Raises ``OutputLocked`` naming the
    holder. Yields a ``Held``: check its ``lost`` (or ``lock_lost(out)``) on an object store."""
    key = _key(out)
    held = _held.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    held = _take_lease(key, command, storage) if _remote(out) else _take_flock(Path(out), command)
    _held[key] = held
    try:
        yield held
    finally:
        del _held[key]
        held.release()


def lock_lost(out: str | Path) -> bool:
    """Whether this process held ``out``'s lock and lost it (a lease on an object store that
    expired or was taken over): the run must stop writing. False when the lock is not held."""
    held = _held.get(_key(out))
    return held is not None and held.lost


def _take_flock(out: Path, command: str) -> Held:
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise OutputLocked(in_use(out, holder)) from None
    try:
        reap(_read(fd))  # a run killed while holding the lock may have left its Ray processes
        _write(fd, holder_info(command))
    except BaseException:
        os.close(fd)
        raise
    return Held(fd=fd)


def _take_lease(url: str, command: str, storage: StorageConfig | None) -> Held:
    from schemas.config import StorageConfig
    from tasks.lease import Lease  # boto3 only for outputs on an object store

    storage = storage or StorageConfig()
    lease = Lease(url, command, storage, ttl_s=storage.lease_ttl_s).acquire()
    try:
        reap(lease.previous or {})  # a dead holder on this host may have left its Ray processes
    except BaseException:
        lease.release()
        raise
    return Held(lease=lease)


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
    held = _held.get(_key(out))
    if held is None or TAG_VAR not in os.environ:
        return
    held.note(ray_tag=os.environ[TAG_VAR], ray=_ray_processes())


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
