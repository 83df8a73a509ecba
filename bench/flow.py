"""The ``curate`` flow without barriers against the sequential flow it replaced, on 16 source
shards one of which is a straggler.

The corpus: 15 tars of ``per_tar`` small web images (0.15-0.3 MP, bench/corpus.py) and one
tar of 8x as many rows, sorted first (``00000-slow.tar``). The straggler is slow because it
holds more data, nothing in our code waits. The config has cheap signals and ``faces``, whose
pool (one Ray actor loading MediaPipe) is the start-up a sequential flow paid per group.

- ``flow_streamed_s``: wall time of one call of the real flow (``pipelines.curate.curate``)
  with ``shards_per_task`` 4, i.e. 4 Prefect groups submitted at once to one Dispatcher (at
  most ``run.workers`` shards in flight, the faces pool started once), its finalize included.
- ``flow_sequential_s``: the flow as it was before (git 988348c): the same 4 groups, one after
  another, each a ``tasks.runner.run(..., shards=group, dedupe=False)`` that starts the pool,
  runs its shards and stops the pool, then the same finalize once (the duplicate-key pass and
  the stats). It is the sum of the groups' wall times plus that finalize; ``sequential_group_s``
  has each group's time.
- ``flow_speedup``: sequential / streamed.

Why it is fair: the same corpus, config, worker count and Ray runtime, a fresh output folder
for each. Ray is started once, before both, and timed apart (``ray_init_s``); a warm-up flow
run over 2 of the small tars goes first (untimed), so neither variant pays for starting Ray's
worker processes and first imports that the other then reuses. Prefect's server (a temporary
SQLite one, ``prefect_test_harness``) is started before and timed apart too. The sequential side
runs without Prefect, so it pays none of the API calls, task runs and artifacts that the
streamed side pays and the old flow paid too: the comparison leans towards the sequential one.
Both outputs must keep the same rows, or the section fails.

The straggler's own time (``slow_shard_s``, in the streamed run; each variant's is under its
name: inside ``process_shard``, from the manifest) bounds both: the sequential flow's first
group cannot end before it and no later group starts until it ends, while the streamed flow
runs the other groups' shards beside it (``others_done_beside_slow``). ``full``: 48 rows a
shard (~100 s for the section on 2 cores); ``--quick``: 8, where start-up costs dominate.

What it does not show: the straggler sorts first (as in the flow's own test of this); one
sorted last in its group starts late in both variants, and the streamed flow then gains
little beyond the pool start-ups. The target, 1.1, asks for a gain clear of noise. On 2 cores the
two shard tasks and the faces actor share the CPUs, so a shard running alone (the straggler
in its group's tail, sequential) runs faster than beside another: the gain is larger where
the actor has cores of its own.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.corpus import CorpusSpec, build_corpus, write_tar
from bench.memory import TreeSampler
from schemas.config import CurateConfig, load_config
from tasks.actors import pool_resources, pool_specs
from tasks.cluster import ensure_ray
from tasks.dedupe import dedupe_keys
from tasks.runner import run
from tasks.shards import Manifest
from tasks.signals import build_signals
from tasks.sources import SourceShard, discover
from tasks.stats import compute_stats

SHARDS = 16
SLOW_FACTOR = 8  # the straggler has this many times the rows of every other shard
SHARDS_PER_TASK = 4
WORKERS = 2
SIGNALS = ("resolution", "caption", "sharpness", "phash", "faces")
MIN_MP, MAX_MP = 0.15, 0.3  # short side >= ~290 px: the default short_side rule keeps most, faces sees them
TARGETS: dict[str, tuple[str, float]] = {"flow_speedup": (">=", 1.1)}


@dataclass(frozen=True)
class FlowPlan:
    per_tar: int  # rows of a normal shard; the slow one has SLOW_FACTOR times as many


PLANS = {"full": FlowPlan(per_tar=48), "quick": FlowPlan(per_tar=8)}  # full: ~100 s on 2 cores


def build_flow_corpus(root: Path, per_tar: int, seed: int) -> Path:
    """15 normal tars (cached by bench/corpus.py) plus the straggler, written beside them. Its
    keys start after every other shard's (tar index ``SHARDS`` at 8x ``per_tar``), so the
    duplicate-key pass has nothing to move."""
    normal = CorpusSpec(samples=(SHARDS - 1) * per_tar, per_tar=per_tar, seed=seed, min_mp=MIN_MP, max_mp=MAX_MP)
    corpus = build_corpus(root, normal)
    slow = corpus / "00000-slow.tar"  # "-" sorts before ".": the first shard of the first group
    if not slow.is_file():
        big = SLOW_FACTOR * per_tar
        write_tar(slow, SHARDS, CorpusSpec(samples=(SHARDS + 1) * big, per_tar=big, seed=seed, min_mp=MIN_MP,
                                           max_mp=MAX_MP))
    return corpus


def write_config(path: Path) -> Path:
    """Cheap signals plus faces (one actor), their default rules, ``WORKERS`` workers."""
    base = CurateConfig()
    data = {"signals": {name: base.signals.get(name, {}) for name in SIGNALS}, "run": {"workers": WORKERS}}
    path.write_text(yaml.safe_dump(data))
    return path


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _shard_times(out: Path) -> dict[str, dict[str, float]]:
    """shard_id -> its seconds inside process_shard and its start (Unix time), from the manifest."""
    return {e["shard_id"]: {"seconds": e["seconds"], "started_at": e["started_at"]} for e in Manifest(out).entries()}


def _finalize(out: Path) -> dict[str, Any]:
    """What the flow's finalize task does, without the artifact: the key pass, then the stats."""
    moved = dedupe_keys(out)
    return {**compute_stats(out), "duplicates_moved": moved}


def run_streamed(corpus: Path, out: Path, config: Path) -> dict[str, Any]:
    """One call of the real flow; its wall time and what it kept."""
    from pipelines.curate import curate

    started, wall = time.time(), time.perf_counter()
    state = curate(source=str(corpus), out=str(out), config=str(config), shards_per_task=SHARDS_PER_TASK,
                   return_state=True)
    seconds = time.perf_counter() - wall
    if not state.is_completed():
        raise RuntimeError(f"streamed flow ended {state.name}: {state.message}")
    stats = state.result()
    return {"seconds": seconds, "started_at": started, "kept": stats["kept"], "rejected": stats["rejected"]}


def run_sequential(corpus: Path, out: Path, cfg: CurateConfig, shards: list[SourceShard]) -> dict[str, Any]:
    """The flow before: one runner call per group (its own pools, started and stopped), in turn."""
    groups = [shards[i : i + SHARDS_PER_TASK] for i in range(0, len(shards), SHARDS_PER_TASK)]
    group_s: list[float] = []
    started = time.time()
    for group in groups:
        wall = time.perf_counter()
        summary = run(corpus, out, cfg, shards=group, dedupe=False)
        group_s.append(time.perf_counter() - wall)
        if summary.failed or summary.shards_done != len(group):
            raise RuntimeError(f"sequential group: {summary.shards_done}/{len(group)} done, failed {summary.failed}")
    wall = time.perf_counter()
    stats = _finalize(out)
    finalize_s = time.perf_counter() - wall
    return {"seconds": sum(group_s) + finalize_s, "group_s": group_s, "finalize_s": finalize_s,
            "started_at": started, "kept": stats["kept"], "rejected": stats["rejected"]}


def _describe(variant: dict[str, Any], times: dict[str, dict[str, float]], slow_id: str) -> dict[str, Any]:
    """Rounded figures of one variant, with when the straggler ran inside it."""
    slow = times[slow_id]
    others = [t for sid, t in times.items() if sid != slow_id]
    rounded = {k: round(v, 2) if isinstance(v, float) else v for k, v in variant.items() if k != "started_at"}
    if "group_s" in rounded:
        rounded["group_s"] = [round(s, 2) for s in variant["group_s"]]
    return {
        **rounded,
        "slow_shard_s": round(slow["seconds"], 2),
        "slow_shard_starts_at_s": round(slow["started_at"] - variant["started_at"], 2),
        "other_shard_mean_s": round(sum(t["seconds"] for t in others) / len(others), 2),
        "shard_busy_s": round(sum(t["seconds"] for t in times.values()), 2),  # all shards' time in process_shard
        "others_done_beside_slow": sum(slow["started_at"] <= t["started_at"] + t["seconds"]
                                       <= slow["started_at"] + slow["seconds"] for t in others),
    }


def measure(mode: str, root: Path, seed: int = 0) -> dict[str, Any]:
    """Warm-up, streamed, then sequential, on one Ray and one Prefect server."""
    import ray
    from prefect.testing.utilities import prefect_test_harness

    from pipelines.curate import curate

    plan = PLANS[mode]
    root.mkdir(parents=True, exist_ok=True)
    corpus = build_flow_corpus(root, plan.per_tar, seed)
    config = write_config(root / "flow.yaml")
    cfg = load_config(config)
    shards = discover(corpus, cfg.source)
    assert len(shards) == SHARDS and shards[0].path.endswith("-slow.tar"), [s.path for s in shards]
    warmup = _fresh(root / "warmup-src")
    warmup.mkdir()
    for shard in shards[1:3]:
        shutil.copy(shard.path, warmup)
    runs = root / "runs"
    if ray.is_initialized():
        ray.shutdown()
    with TreeSampler() as mem:
        wall = time.perf_counter()
        ensure_ray(cfg.run, extra_cpus=pool_resources(pool_specs(build_signals(cfg.signals)))[0])
        ray_init_s = time.perf_counter() - wall
        try:
            wall = time.perf_counter()
            with prefect_test_harness(server_startup_timeout=120):
                server_s = time.perf_counter() - wall
                wall = time.perf_counter()
                curate(source=str(warmup), out=str(_fresh(runs / "warmup")), config=str(config), shards_per_task=1)
                warmup_s = time.perf_counter() - wall
                streamed = run_streamed(corpus, _fresh(runs / "streamed"), config)
                sequential = run_sequential(corpus, _fresh(runs / "sequential"), cfg, shards)
        finally:
            ray.shutdown()
    times = {name: _shard_times(runs / name) for name in ("streamed", "sequential")}
    for name in ("warmup", "streamed", "sequential"):
        shutil.rmtree(runs / name, ignore_errors=True)  # kept rows carry the image bytes
    if (streamed["kept"], streamed["rejected"]) != (sequential["kept"], sequential["rejected"]):
        raise RuntimeError(f"the variants kept different rows: streamed {streamed}, sequential {sequential}")
    slow_id = shards[0].shard_id
    s, q = _describe(streamed, times["streamed"], slow_id), _describe(sequential, times["sequential"], slow_id)
    return {
        "flow_streamed_s": s["seconds"],
        "flow_sequential_s": q["seconds"],
        "flow_speedup": round(sequential["seconds"] / streamed["seconds"], 3),
        "flow": {
            "mode": mode,
            "shards": SHARDS,
            "rows_per_shard": plan.per_tar,
            "slow_shard_rows": SLOW_FACTOR * plan.per_tar,
            "shards_per_task": SHARDS_PER_TASK,
            "groups": -(-SHARDS // SHARDS_PER_TASK),
            "workers": WORKERS,
            "signals": list(SIGNALS),
            "megapixels": [MIN_MP, MAX_MP],
            "order": ["warmup", "streamed", "sequential"],
            "ray_init_s": round(ray_init_s, 2),
            "prefect_server_start_s": round(server_s, 2),
            "warmup_flow_s": round(warmup_s, 2),
            "streamed": s,
            "sequential": q,
            "sequential_group_s": q["group_s"],
            "slow_shard_s": s["slow_shard_s"],
            "other_cpu_s": round(mem.other_cpu_s, 2),
            "wall_s": round(mem.seconds, 1),
        },
    }


def print_section(f: dict[str, Any]) -> None:
    """The setup in one line, then each variant: its wall time and where the straggler ran."""
    setup = [f"{f['shards']} shards of {f['rows_per_shard']} rows, one of {f['slow_shard_rows']}",
             f"{f['groups']} groups of {f['shards_per_task']}", f"{f['workers']} workers",
             f"signals {', '.join(f['signals'])}",
             f"untimed: ray.init {f['ray_init_s']} s, Prefect server {f['prefect_server_start_s']} s, "
             f"warm-up flow {f['warmup_flow_s']} s", f"{f['wall_s']} s in all"]
    print(f"\nflow ({f['mode']}): " + "; ".join(setup))
    for name in ("streamed", "sequential"):
        v = f[name]
        print(f"  {name:<11}{v['seconds']:>7} s | slow shard {v['slow_shard_s']} s, starts at "
              f"{v['slow_shard_starts_at_s']} s, {v['others_done_beside_slow']} other shards done beside it | "
              f"other shards {v['other_shard_mean_s']} s mean, {v['shard_busy_s']} s in all")
    groups = " + ".join(map(str, f["sequential_group_s"]))
    print(f"  sequential groups: {groups} s, then finalize {f['sequential']['finalize_s']} s")
    if f["other_cpu_s"] > 5:
        print(f"  <- {f['other_cpu_s']} CPU s taken by other processes meanwhile: figures are pessimistic")
