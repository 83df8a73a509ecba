"""Peak memory of the whole process tree, and how much CPU others took meanwhile.

Ray's work happens in worker processes (children of the raylet, itself a child of this
driver), so this process's own RSS says little: a background thread sums the RSS of this
process and all its descendants every ``interval`` seconds and keeps the peak. A sum of RSS
counts shared pages (libraries, Ray's shared-memory store) once per process, so it overstates
the true footprint; it does so alike for every run, which is what a ratio between runs needs.

The same thread adds up the CPU seconds of the tree, so a section can report how much of
the machine's busy time went to processes outside the benchmark: on a shared 2-core machine
that is the first thing to rule out before blaming the code for a slow figure.
"""

from __future__ import annotations

import threading
import time

import psutil

MB = 2**20


def _tree(root: int | None = None) -> list[psutil.Process]:
    """``root`` (this process if None) and its descendants; none once ``root`` has exited."""
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)


class TreeSampler:
    """``with TreeSampler() as s: ...`` then ``s.peak_mb``, ``s.base_mb``, ``s.other_cpu_s``.

    ``root``: sample that process's tree instead of this one's (a run started as a subprocess,
    without the servers this process also started). ``timeline`` keeps every sample as (Unix
    time, MB, CPU seconds the tree has used so far), for peaks and work over parts of a long run."""

    def __init__(self, interval: float = 0.2, root: int | None = None):
        self.interval = interval
        self.root = root
        self.timeline: list[tuple[float, float, float]] = []
        self.base_mb = 0.0
        self.peak_mb = 0.0
        self.peak_by_process: dict[str, float] = {}  # process name -> MB, at the peak sample
        self.samples = 0
        self.seconds = 0.0
        self.tree_cpu_s = 0.0  # CPU seconds of this process tree during the section
        self.other_cpu_s = 0.0  # CPU seconds of everything else on the machine
        self._cpu_seen: dict[int, float] = {}  # pid -> CPU seconds at the last sample
        self._cpu_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _sample(self) -> float:
        by_name: dict[str, float] = {}
        for proc in _tree(self.root):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue  # a worker that exits between listing and reading
            self._cpu_seen[proc.pid] = cpu.user + cpu.system
            by_name[name] = by_name.get(name, 0.0) + rss / MB
        self.samples += 1
        mb = sum(by_name.values())
        self.timeline.append((time.time(), mb, sum(self._cpu_seen.values())))  # exited processes: as last seen
        if mb > self.peak_mb:
            self.peak_mb, self.peak_by_process = mb, by_name
        return mb

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeSampler:
        self._started = time.perf_counter()
        self._busy_start = _busy_seconds()
        self.base_mb = self._sample()
        self._cpu_start = dict(self._cpu_seen)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._started
        # A process that exited between two samples loses at most one interval of CPU here.
        self.tree_cpu_s = sum(cpu - self._cpu_start.get(pid, 0.0) for pid, cpu in self._cpu_seen.items())
        self.other_cpu_s = max(0.0, _busy_seconds() - self._busy_start - self.tree_cpu_s)

    def report(self) -> dict[str, object]:
        top = sorted(self.peak_by_process.items(), key=lambda kv: -kv[1])
        return {
            "peak_rss_mb": round(self.peak_mb, 1),
            "peak_rss_by_process_mb": {name: round(mb, 1) for name, mb in top},
            "start_rss_mb": round(self.base_mb, 1),
            "rss_samples": self.samples,
            "tree_cpu_s": round(self.tree_cpu_s, 2),
            "other_cpu_s": round(self.other_cpu_s, 2),
        }
