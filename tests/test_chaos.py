"""Chaos: `t2i curate` with model signals on, killed at random points, resumed each time.

About 1,200 small images in 20 tars of 60 (``chaos_corpus``) are curated once without interruption
into ``ref/``. Then the same command runs into ``out/`` and is killed, at seeded random points,
ten times: the driver (SIGKILL), its whole process group (``killpg``), a shard-task worker
(``ray::_process_guarded``) and a model actor (``ray::ModelActor``), each at least twice, one
driver and one group kill while the run's Ray is starting. Worker and actor kills
leave the run going (Ray retries the task, restarts the actor); after a driver or process-group
kill the test checks, polling for at most ~10 s, that none of the killed run's processes is
still alive (those the lock recorded and every process that inherited the run's environment
tag, the reaper included) and that the lock is free, then starts the run again. A last run
finishes it, and the output must equal the reference: same kept keys (none twice), same reject
(key, reason) multiset, every input row exactly once, per-shard counts in the manifest equal,
no temporary files left, every source shard in the manifest; the kept rows' bytes and signals
equal too. ``T2I_CHAOS_SEED`` picks another seed.

The quality signal (BRISQUE, ~25 ms an image whatever its size, run inside the shard task, no
actor) is left out to keep the test within a few minutes on two cores; the model signals that
run in actor pools (faces, OCR) are on.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import duckdb
import psutil
import pytest
from chaos_corpus import build

from schemas.config import load_config
from tasks.sources import discover

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SEED = int(os.environ.get("T2I_CHAOS_SEED", "20261201"))
TAG = "T2I_CHAOS_TAG"  # in every run's environment, so every process it starts can be found later
TARS = 20
PER_TAR = 60  # samples a tar: every kill still lands mid-run (they are paced by shards done)
CLEANUP_S = 10.0  # a killed run's processes must be gone within this
RUN_TIMEOUT_S = 420.0

CONFIG = """\
signals:
  resolution: {}
  caption: {}
  sharpness: {short_side: 256}
  phash: {}
  faces: {side: 128, batch_size: 8}
  ocr: {det_side: 128, recognize: false, batch_size: 8}
rules:
  short_side: {min: 256}
  aspect_ratio: {min: 0.3333, max: 3.0}
  caption_chars: {max: 4096}
  sharpness: {min: 50}
  face_count: {max: 4}
  ocr_area_ratio: {max: 0.3}
run: {workers: 2, task_retries: 1}
"""

# Every kind at least twice (ten kills). The seed shuffles the order and picks the moments;
# one driver and one group kill land while the run's Ray is starting (``*-startup``).
KILLS = ["driver", "pgroup"] + ["worker"] * 3 + ["actor"] * 3
STARTUP_KILLS = ["driver-startup", "pgroup-startup"]
RUN_KILLS = ("driver", "pgroup", *STARTUP_KILLS)  # kills that end the run


def schedule(rng: random.Random) -> list[str]:
    """The kills in order. A start-up kill goes where a fresh run starts: first, or right
    after another kill that ended the run."""
    kinds = list(KILLS)
    rng.shuffle(kinds)
    for kind in rng.sample(STARTUP_KILLS, len(STARTUP_KILLS)):
        fresh = [i for i in range(len(kinds) + 1) if i == 0 or kinds[i - 1] in RUN_KILLS]
        kinds.insert(rng.choice(fresh), kind)
    return kinds


def _env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTEST_CURRENT_TEST")}
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "HF_HUB_OFFLINE": "1", TAG: tag}


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"


def tagged(match) -> list[psutil.Process]:
    """Live processes whose environment tag satisfies ``match`` (a run's tag, or any of ours)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or not match(proc.environ().get(TAG, "")):
                continue
        except psutil.Error:
            continue
        if _alive(proc):
            found.append(proc)
    return found


def recorded_alive(recorded: list) -> list[psutil.Process]:
    """The processes of a lock's ``ray`` list ([[pid, create_time], ...]) that are still the same and alive."""
    out = []
    for pid, created in recorded:
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(created)) < 0.01 and _alive(proc):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def lock_is_free(out: Path) -> bool:
    path = out / "_lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@dataclass
class Run:
    """One `t2i curate` in its own session; stdout and stderr to files."""

    number: int
    tag: str
    proc: subprocess.Popen
    stdout: Path
    stderr: Path
    started: float = field(default_factory=time.monotonic)

    def descendants(self, prefix: str) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c for c in children if _cmd(c).startswith(prefix) and _alive(c)]

    def tail(self, n: int = 3000) -> str:
        return f"--- run {self.number} stderr (tail) ---\n{self.stderr.read_text(errors='replace')[-n:]}"


class Chaos:
    def __init__(self, tmp: Path, src: Path, config: Path, rng: random.Random):
        self.tmp, self.src, self.config, self.rng = tmp, src, config, rng
        self.out = tmp / "out"
        self.session = uuid.uuid4().hex[:12]
        self.runs: list[Run] = []
        self.log: list[dict] = []  # one entry per kill, and per run that ended by itself
        self.problems: list[str] = []
        self.last_actor_kill: tuple[int, int, float] | None = None  # (run, pid, when)

    def command(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "t2i.cli", "curate", "--source", str(self.src), "--out", str(out),
                "--config", str(self.config)]

    def start(self) -> Run:
        n = len(self.runs)
        tag = f"{self.session}:{n}"
        logs = self.tmp / "logs"
        logs.mkdir(exist_ok=True)
        stdout, stderr = logs / f"run{n:02d}.out", logs / f"run{n:02d}.err"
        with open(stdout, "wb") as o, open(stderr, "wb") as e:
            proc = subprocess.Popen(self.command(self.out), stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                    env=_env(tag), start_new_session=True, cwd=Path(__file__).parent.parent)
        run = Run(n, tag, proc, stdout, stderr)
        self.runs.append(run)
        return run

    def done(self) -> int:
        folder = self.out / "_manifest"
        return len(list(folder.glob("*.json"))) if folder.is_dir() else 0

    def ended(self, run: Run) -> None:
        """A run that ended without being killed: it finished (0) or a shard failed after its
        retries (1, the shards a killed worker took twice); anything else is a failure."""
        rc = run.proc.returncode
        summary = {}
        with contextlib.suppress(ValueError):
            summary = json.loads(run.stdout.read_text() or "{}")
        self.log.append({"run": run.number, "ended": rc, "seconds": round(time.monotonic() - run.started, 1),
                         "done": self.done(), "failed": summary.get("failed")})
        if rc == 1 and summary.get("failed") and any(e.get("run") == run.number and e.get("kill") == "worker"
                                                     for e in self.log):
            return  # a shard whose worker was killed twice (run.task_retries: 1): the next run redoes it
        assert rc == 0, f"run {run.number} ended with {rc}\n{run.tail()}"

    def wait_until(self, run: Run, ready, timeout: float) -> bool:
        """Poll ``ready()`` until true (True) or the run ends / the time is up (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if run.proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(0.05)
        return False

    def kill_run(self, run: Run, kind: str) -> dict:
        """SIGKILL the driver or its process group, then wait for every process of the run to go."""
        lock_before = self._lock_info()
        if kind == "driver":
            os.kill(run.proc.pid, signal.SIGKILL)
        else:
            os.killpg(os.getpgid(run.proc.pid), signal.SIGKILL)
        killed_at = time.monotonic()
        run.proc.wait(timeout=30)
        info = self._lock_info()
        recorded = info.get("ray", []) if info.get("pid") == run.proc.pid else []
        entry = {"kill": kind, "run": run.number, "at_s": round(killed_at - run.started, 1), "done": self.done(),
                 "ray_recorded": len(recorded), "lock_holder_was_run": info.get("pid") == run.proc.pid or
                 lock_before.get("pid") == run.proc.pid}
        left: list[psutil.Process] = []
        while time.monotonic() - killed_at < CLEANUP_S:
            left = list({p.pid: p for p in recorded_alive(recorded) + tagged(lambda t: t == run.tag)}.values())
            if not left and lock_is_free(self.out):
                break
            time.sleep(0.1)
        entry["cleanup_s"] = round(time.monotonic() - killed_at, 2)
        if left or not lock_is_free(self.out):
            desc = [f"{p.pid} {_cmd(p)[:120]}" for p in left]
            self.problems.append(f"{kind} kill of run {run.number} at {entry['at_s']} s: after {CLEANUP_S:g} s "
                                 f"still alive: {desc}; lock free: {lock_is_free(self.out)}; lock said {info}")
            entry["left"] = desc
            for p in left:  # ours (they carry our tag): stop them so the next run starts clean
                with contextlib.suppress(psutil.Error):
                    p.kill()
        return entry

    def kill_one(self, run: Run, kind: str) -> dict | None:
        """SIGKILL one shard-task worker or one serving model actor of the run (a descendant of its driver)."""
        targets = self.targets(run, kind)
        if not targets:
            return None
        target = self.rng.choice(sorted(targets, key=lambda p: p.pid))
        cmd = _cmd(target)
        try:
            target.kill()
        except psutil.Error:
            return None
        return {"kill": kind, "run": run.number, "at_s": round(time.monotonic() - run.started, 1),
                "done": self.done(), "target": f"{target.pid} {cmd[:60]}"}

    def _lock_info(self) -> dict:
        try:
            raw = (self.out / "_lock").read_text()
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {}

    def actors_back(self, run: Run, killed: int) -> bool:
        """Both pools' actors serving again (not loading), the killed one replaced."""
        serving = [p for p in run.descendants("ray::ModelActor") if "__init__" not in _cmd(p)]
        return len(serving) >= 2 and killed not in {p.pid for p in serving}

    def play(self, kinds: list[str]) -> None:
        total = len(kinds)
        run = self.start()
        j = 0
        while j < total:
            kind = kinds[j]
            # Progress-paced: kill j waits until about j * 14/total shards are done, so work
            # remains for every kill; then a random extra moment. A start-up kill waits for the
            # run's raylet, then up to 2 s: Ray is coming up, the lock may not list it yet.
            threshold = j * 14 // total
            early = kind.endswith("-startup")
            at = self.rng.uniform(0.0, 2.0) if early else self.rng.uniform(0.0, 3.0)
            found = self.wait_until(run, partial(self.moment, run, kind, threshold, early), RUN_TIMEOUT_S)
            if found:
                self.wait_until(run, lambda: False, at)  # the extra moment (or until the run ends)
            if run.proc.poll() is not None:  # it ended by itself first: the same kill in the next run
                self.ended(run)
                assert self.done() < TARS, f"the run ended before kill {j} of {total} ({kind})\n{self.log}"
                run = self.start()
                continue
            assert found, f"kill {j} ({kind}) found no moment in {RUN_TIMEOUT_S:g} s\n{run.tail()}"
            if kind in RUN_KILLS:
                self.log.append(self.kill_run(run, kind.removesuffix("-startup")) | {"startup": early})
                run = self.start()
            else:
                entry = self.kill_one(run, kind)
                if entry is None:  # the target went in the extra moment: the same kill again
                    continue
                self.log.append(entry)
                if kind == "actor":
                    self.last_actor_kill = (run.number, int(entry["target"].split()[0]), time.monotonic())
            j += 1
        self.finish(run)

    def moment(self, run: Run, kind: str, threshold: int, early: bool) -> bool:
        if early:
            return any("/raylet/raylet" in _cmd(p) for p in run.descendants(""))
        if self.done() < threshold:
            return False
        last = self.last_actor_kill
        if kind == "actor" and last and last[0] == run.number and (
                not self.actors_back(run, last[1]) or time.monotonic() - last[2] < 2):
            # the killed actor back at work first: killing it again and again mid-batch is what
            # a poison input does (two lone deaths blame the input)
            return False
        return kind in RUN_KILLS or bool(self.targets(run, kind))

    def targets(self, run: Run, kind: str) -> list[psutil.Process]:
        """Shard-task workers running a shard, or model actors serving (not loading their model)."""
        prefix = "ray::_process_guarded" if kind == "worker" else "ray::ModelActor"
        return [p for p in run.descendants(prefix) if "__init__" not in _cmd(p)]

    def finish(self, run: Run) -> None:
        """Let the last run end, then run until every shard is done."""
        for _ in range(4):
            try:
                run.proc.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"run {run.number} did not end within {RUN_TIMEOUT_S:g} s\n{run.tail()}")
            self.ended(run)
            if run.proc.returncode == 0 and self.done() == TARS:
                return
            run = self.start()
        pytest.fail(f"not every shard done after 4 more runs: {self.log}")


def outcome(out: Path) -> dict:
    db = duckdb.connect()

    def q(sql: str) -> list[tuple]:
        return db.execute(sql).fetchall()

    shards = f"read_parquet('{out}/shards/*.parquet', union_by_name=true)"
    rejects = f"read_parquet('{out}/rejects/*.parquet', union_by_name=true)"
    return {
        "kept": q(f"SELECT key FROM {shards} ORDER BY key"),
        "kept_rows": q(f"SELECT key, source, md5(image), caption, width, height, sharpness, phash, face_count, "
                       f"face_area_ratio, ocr_area_ratio, ocr_boxes, bucket_width, bucket_height FROM {shards} "
                       "ORDER BY key"),
        "rejects": q(f"SELECT key, reason, count(*) FROM {rejects} GROUP BY ALL ORDER BY ALL"),
        "reject_rows": q(f"SELECT key, source, reason FROM {rejects} ORDER BY ALL"),
    }


def manifest_counts(out: Path) -> dict[str, tuple]:
    found = {}
    for path in sorted((out / "_manifest").glob("*.json")):
        entry = json.loads(path.read_text())
        found[entry["shard_id"]] = (entry["kept"], entry["rejected"], sorted(entry["reasons"].items()))
    return found


def test_killed_at_random_and_resumed_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    src = tmp_path / "src"
    corpus = build(src, SEED, tars=TARS, per_tar=PER_TAR)
    config = tmp_path / "chaos.yaml"
    config.write_text(CONFIG)
    shard_ids = {s.shard_id for s in discover(src, load_config(config).source)}
    assert len(shard_ids) == TARS
    built_s = time.monotonic() - began

    chaos = Chaos(tmp_path, src, config, rng)
    try:
        ref = subprocess.run(chaos.command(tmp_path / "ref"), capture_output=True, text=True,
                             env=_env(f"{chaos.session}:ref"), timeout=RUN_TIMEOUT_S, cwd=Path(__file__).parent.parent)
        assert ref.returncode == 0, ref.stderr[-3000:]
        ref_s = time.monotonic() - began - built_s

        chaos.play(schedule(rng))
        chaos_s = time.monotonic() - began - built_s - ref_s

        # Once more: nothing to do, nothing changes.
        again = subprocess.run(chaos.command(chaos.out), capture_output=True, text=True,
                               env=_env(f"{chaos.session}:again"), timeout=RUN_TIMEOUT_S,
                               cwd=Path(__file__).parent.parent)
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads(again.stdout)
        assert (summary["shards_skipped"], summary["shards_done"], summary["duplicates_moved"]) == (TARS, 0, 0)

        # Every process any run started is gone.
        deadline = time.monotonic() + CLEANUP_S
        while (left := tagged(lambda t: t.startswith(chaos.session))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still running after the runs ended: {[(p.pid, _cmd(p)[:100]) for p in left]}"
    finally:
        for proc in tagged(lambda t: t.startswith(chaos.session)):  # ours: a failed test leaves nothing behind
            with contextlib.suppress(psutil.Error):
                proc.kill()

    report = {"seed": SEED, "corpus_s": round(built_s, 1), "ref_s": round(ref_s, 1), "chaos_s": round(chaos_s, 1),
              "runs": len(chaos.runs), "kills": Counter(e["kill"] for e in chaos.log if "kill" in e),
              "log": chaos.log, "problems": chaos.problems}
    (tmp_path / "chaos-report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))
    kills = Counter(e["kill"] for e in chaos.log if "kill" in e)
    assert sum(kills.values()) >= 10 and all(kills[k] >= 2 for k in ("driver", "pgroup", "worker", "actor")), kills

    out, want = outcome(chaos.out), outcome(tmp_path / "ref")
    kept = [k for (k,) in out["kept"]]
    assert len(kept) == len(set(kept)), "a key twice in shards/"
    assert out["kept"] == want["kept"]
    assert out["rejects"] == want["rejects"]
    assert out["reject_rows"] == want["reject_rows"]
    assert out["kept_rows"] == want["kept_rows"]  # the same bytes, captions and signals
    every = Counter(kept) + Counter(k for k, _, n in out["rejects"] for _ in range(n))
    assert every == corpus["keys"], "every input row exactly once across shards/ and rejects/"
    reasons = {r for _, r, _ in want["rejects"]}
    assert {"undecodable", "sharpness_below_min", "short_side_below_min", "ocr_area_ratio_above_max",
            "duplicate_key"} <= reasons, reasons
    assert len(kept) > len(every) // 2

    assert manifest_counts(chaos.out) == manifest_counts(tmp_path / "ref")
    assert set(manifest_counts(chaos.out)) == shard_ids
    leftovers = [p for p in (chaos.out / "_tmp").rglob("*") if p.is_file()] if (chaos.out / "_tmp").exists() else []
    assert not leftovers, leftovers
    assert not [p for p in chaos.out.rglob("*.tmp*")], "temporary files left"
    assert not (chaos.out / "_dedupe").exists() or not any((chaos.out / "_dedupe").rglob("*"))

    # Last, so that a failure here says the output itself was right.
    assert not chaos.problems, "processes of killed runs not cleaned up:\n" + "\n".join(chaos.problems)
