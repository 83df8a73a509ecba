"""Deadlines and blame: a model call that hangs ends its actor (and, hanging every time alone, costs
its own row, with a reason naming the deadline); an actor's death is charged only to the lone input
it was running, never to lone inputs of other shards waiting behind it on the same actor."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray
from pydantic import ValidationError

from schemas.config import CurateConfig
from schemas.recaption import StageResources
from tasks.actors import (
    Deadline,
    ItemError,
    Pools,
    _infer_one,
    _ran,
    infer_on_pool,
    pool_specs,
    start_pools,
    stop_pools,
)
from tasks.signals import build_signals
from tasks.signals.base import ModelParams, ModelSignal, Sample


class FakeParams(ModelParams):
    runs: str = ""  # a file that gets one line each time the model starts on POISON
    crash_after_s: float = 1.0  # how long the model runs on POISON before it ends its process


class Fake(ModelSignal):
    """Counts characters; sleeps forever on ``HANG``; on ``POISON`` runs a while, then ends its
    process (no Python exception, as a crash in native code would)."""

    name = "fake"
    cost = 150
    Params = FakeParams
    fields = (pa.field("chars", pa.int32()),)

    def prepare(self, sample: Sample) -> str:
        return sample.caption or ""

    def infer(self, inputs: list[str]) -> list[dict[str, Any]]:
        if "HANG" in inputs:
            while True:
                time.sleep(1)
        if "POISON" in inputs:
            with open(self.params.runs, "a") as f:
                f.write("run\n")
            time.sleep(self.params.crash_after_s)
            os._exit(1)
        return [{"chars": len(x)} for x in inputs]


@pytest.fixture
def fake_pool(ray_runtime):
    """Start a one-actor pool of ``Fake`` with the given params; stopped after the test."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    started: list[Pools] = []

    def start(**params: Any) -> list[Any]:
        started.append(start_pools(pool_specs([Fake(FakeParams(**params))])))
        return started[-1]["fake"]

    yield start
    for pools in started:
        stop_pools(pools)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _wait_for_lines(path: Path, lines: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and len(path.read_text().splitlines()) >= lines):
        assert time.monotonic() < deadline, f"the model never started on POISON {lines} time(s)"
        time.sleep(0.05)


WATCHED = textwrap.dedent("""
    import re, sys, time
    from tasks.actors import deadline_watch

    def stuck_in_c():  # the regex engine holds the GIL for as long as it backtracks
        re.match(r"(a+)+$", "a" * 64 + "b")

    with deadline_watch(float(sys.argv[1])):
        stuck_in_c() if sys.argv[2] == "gil" else time.sleep(float(sys.argv[2]))
    print("finished")
""")


def _watched(limit_s: float, work: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WATCHED, str(limit_s), work], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent.parent)


def test_a_watch_ends_a_process_past_its_deadline_even_holding_the_gil_and_shows_where() -> None:
    hung = _watched(1.0, "gil")
    assert hung.returncode == 1 and "finished" not in hung.stdout
    assert "Timeout" in hung.stderr and "stuck_in_c" in hung.stderr  # the stack of the hung call, in the log
    in_time = _watched(30.0, "0.1")
    assert in_time.returncode == 0 and in_time.stdout.strip() == "finished" and in_time.stderr == ""


def test_deadline_settings_are_checked_and_reach_the_pool() -> None:
    spec = pool_specs(build_signals({"ocr": {"deadline_s": 5, "deadline_per_row_s": 0.5}}))[0]
    assert spec.resources.deadline == Deadline(5.0, 0.5) and spec.resources.deadline.limit(16) == 13.0
    default = pool_specs(build_signals({"faces": {}}))[0].resources.deadline
    assert default.limit(16) == 220.0  # 60 s + 10 s a row at the default batch
    with pytest.raises(ValidationError, match=r"signals\.ocr\.deadline_s"):
        CurateConfig(signals={"ocr": {"deadline_s": 0}}, rules={})
    with pytest.raises(ValidationError, match="deadline_per_row_s"):
        ModelParams(deadline_per_row_s=-1)
    with pytest.raises(ValidationError, match="deadline_s"):
        StageResources(deadline_s=float("inf"))
    assert StageResources().deadline_s > ModelParams().deadline_s  # a VLM on a CPU is slower than OCR


def test_a_model_that_hangs_on_one_input_costs_that_row_only(fake_pool) -> None:
    pool = fake_pool(deadline_s=1.0, deadline_per_row_s=0.5)
    results = infer_on_pool(pool, ["ab", "HANG", "abcd"], 3)
    assert results[0] == {"chars": 2} and results[2] == {"chars": 4}
    assert isinstance(results[1], ItemError)
    assert "past its deadline of 1.5 s" in results[1].error and "2 times" in results[1].error, results[1].error
    assert infer_on_pool(pool, ["abc"], 3) == [{"chars": 3}]  # the pool serves on


def test_a_lone_call_that_died_waiting_behind_another_is_not_charged(tmp_path: Path, fake_pool) -> None:
    runs = tmp_path / "runs"
    pool = fake_pool(runs=str(runs), crash_after_s=2.0)
    poison = pool[0].infer.remote(["POISON"], alone=True, token="poison")
    _wait_for_lines(runs, 1)  # the model is on POISON: a request sent now waits in the actor's queue
    waiting = pool[0].infer.remote(["fine"], alone=True, token="waiting")
    for ref in (poison, waiting):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(ref, timeout=60)
    assert _ran(pool, "waiting") is None  # never started: not charged
    seconds, limit = _ran(pool, "poison")  # type: ignore[misc]
    assert limit == Deadline().limit(1) and seconds < limit  # it crashed; the deadline did not end it
    assert _ran(pool, "poison") is None  # each answer is given once


def test_a_poison_row_of_one_shard_gets_no_lone_row_of_another_rejected(tmp_path: Path, fake_pool) -> None:
    """Shard A's poison kills the actor four times (its batch, the batch again, alone twice) while
    shard B's rows, sent one at a time, keep arriving behind it on the pool's one actor."""
    runs = tmp_path / "runs"
    pool = fake_pool(runs=str(runs), crash_after_s=1.5)
    out: dict[str, Any] = {}

    def shard_a() -> None:
        out["a"] = infer_on_pool(pool, ["POISON"], 1)

    def shard_b() -> None:
        _wait_for_lines(runs, 1)
        out["b"] = []
        while len(runs.read_text().splitlines()) < 4 or "a" not in out:  # lone rows while POISON runs
            out["b"].append(_infer_one(pool, "x" * (len(out["b"]) + 1)))

    threads = [threading.Thread(target=shard_a), threading.Thread(target=shard_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(runs.read_text().splitlines()) == 4
    assert isinstance(out["a"][0], ItemError) and "died 2 times on this input alone" in out["a"][0].error
    assert "deadline" not in out["a"][0].error  # it crashed well within its 70 s
    assert out["b"] == [{"chars": i + 1} for i in range(len(out["b"]))]
