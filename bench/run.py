"""``python -m bench.run [--quick] [--only all|curate|flow|models|train|captions|synth|soak]``: speed,
scaling, memory, the flow without barriers, model signals, trainer, the caption pass, synthetic text
images, a soak under faults.

``--only curate`` is issue 2's four figures below; ``--only models`` is issue 3's, per model signal
and the whole chain against a naive unfused loop (see bench/models.py); ``--only train`` is issue
5's, the training loop's step time against a minimal diffusers loop and the data loader's
samples/s per core (see bench/train.py); ``--only flow`` is the curate flow on 16 shards with
one straggler against the sequential flow it replaced (see bench/flow.py, its own corpus);
``--only captions`` is the caption pass's: the tiny captioner at batch 1 vs 8, the tiny Marian with
transformers vs CTranslate2 int8 and float32, the pass's ms/row over reading the shards, in-process
and on Ray, and public CogVLM figures sized to 10M images (see bench/captions.py, its own data);
``--only synth`` is ``t2i synth``'s: render + encode images/s at 512 and 1024, the OCR check's rows/s and
pass rate, TextRecognitionDataGenerator beside it in its own venv (see bench/synth.py, its own data);
``--only soak`` is ``t2i curate`` with the default config over 50,000 small rows from and to S3 while
model actors and the S3 server are killed, against an uninterrupted run: rows/s and peak RSS over the
run, equal outputs (see bench/soak.py, its own data and server). It takes about 95 minutes on 2 cores,
so ``--only all`` leaves it out; ``--quick --only soak`` is 5,000 rows (about 10 minutes). The
others use the same synthetic corpus (see bench/corpus.py):

- ``decode_images_per_s``: a bare full-size decode (open, load, RGB) of every image, one process.
  It is the floor any pipeline that looks at pixels pays, so the chain is judged against it.
- ``chain_images_per_s``: ``Chain.score_batch`` over the same rows, one process. The chain
  decodes at a reduced size, so it may even beat the bare decode; ``chain_cost_vs_decode`` is
  decode rate / chain rate.
- ``workers_speedup``: the whole runner on Ray with 1 worker vs 2, a fresh Ray and a fresh
  output folder each time; ``ray.init`` is timed apart from the run.
- ``rss_growth``: the peak summed RSS of this process and its children (Ray workers) over a
  corpus 10x larger vs the small one; a streaming pipeline should stay flat.
- ``rss_growth_default``: the same with the default config (faces, BRISQUE and OCR in actor
  pools) on 5x the tars: shard tasks waiting on a pool must not let more shards start.

The table printed at the end says what passed; ``bench-results.json`` at the repo root gets
these figures merged in (other keys, from other benchmarks, are kept).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
from PIL import Image

from bench import accuracy, captions, flow, models, soak, synth
from bench.corpus import REPO, CorpusSpec, build_corpus
from bench.memory import TreeSampler
from bench.previous import previous_chain
from schemas.config import CurateConfig
from tasks.actors import pool_resources, pool_specs
from tasks.chain import Chain
from tasks.cluster import ensure_ray
from tasks.runner import run
from tasks.signals import build_signals, registry
from tasks.sources import SourceShard, discover, read_shard

BENCH_OUT = REPO / "bench-out"
RESULTS = REPO / "bench-results.json"
# This signal chain. Model signals added later (faces, OCR, ...) are left out on
# purpose, so the figures stay comparable from one commit to the next.
SIGNALS = ("resolution", "caption", "sharpness", "phash")
TARGETS: dict[str, tuple[str, float]] = {
    "chain_cost_vs_decode": ("<=", 1.0),  # issue 15 (was 1.5)
    "workers_speedup": (">=", 1.7),
    "rss_growth": ("<=", 1.2),
    "rss_growth_default": ("<=", 1.2),
    **flow.TARGETS,
    **models.TARGETS,
    **accuracy.TARGETS,
    **synth.TARGETS,
    **soak.TARGETS,
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run. The large corpus is 10x the small one; the small one is
    its first tars, so both runs read the same kind of images."""

    mode: str
    small_samples: int
    per_tar: int
    speedup_tars: int  # >= 8, so two workers both stay busy to the end
    compare_images: int  # images for the decode vs chain comparison
    model_images: int  # images for the model signals vs the naive loop (~2 s each naive)
    train_steps: int  # measured steps per loop and round, trainer vs minimal loop (~0.05 s each)
    train_rounds: int  # rounds alternating the two loops
    loader_batches: int  # batches of 4 per loader side (512 px: ~0.04 s each)
    decision_rows: int = 300  # rows through the default config, previous and now (~0.2 s each)
    default_rss_per_tar: int = 25  # the default-config memory runs: small images, small tars,
    default_rss_tars: int = 4  # this many tars vs 5x as many, so many shards pass through
    repeats: int = 2  # decode and chain passes, interleaved; the best of each is reported

    @property
    def large_samples(self) -> int:
        return 10 * self.small_samples


PLANS = {
    "full": Plan("full", small_samples=2_000, per_tar=500, speedup_tars=8, compare_images=1_000, model_images=40,
                 train_steps=30, train_rounds=3, loader_batches=40),
    # Fits in a minute on 2 cores from a cold cache: small tars keep 4 of them in the small corpus.
    # model_images went 6 -> 4 to make room for the train section (~8 s, half of it importing torch).
    "quick": Plan("quick", small_samples=200, per_tar=50, speedup_tars=8, compare_images=200, model_images=4,
                  train_steps=6, train_rounds=2, loader_batches=4, default_rss_per_tar=4, default_rss_tars=2,
                  decision_rows=20),
}


def bench_config(workers: int) -> CurateConfig:
    """The default config cut down to this issue's signals (and the rules on their columns)."""
    base = CurateConfig()
    columns = {c for name in SIGNALS for c in registry()[name].columns()}
    data = base.model_dump(mode="json")
    data["signals"] = {name: base.signals.get(name, {}) for name in SIGNALS}
    data["rules"] = {c: b for c, b in data["rules"].items() if c in columns}
    data["run"]["workers"] = workers
    return CurateConfig.model_validate(data)


# --- decode vs chain, in this process -------------------------------------------------------


def load_batches(shards: list[SourceShard], cfg: CurateConfig, images: int) -> list[pa.RecordBatch]:
    """The first ``images`` rows as the source reader gives them, read before any timing."""
    batches: list[pa.RecordBatch] = []
    have = 0
    for shard in shards:
        for batch in read_shard(shard, cfg.source, cfg.decode.max_file_bytes):
            batches.append(batch.slice(0, images - have))
            have += batches[-1].num_rows
            if have >= images:
                return batches
    return batches


def time_full_decode(images: list[bytes]) -> float:
    """Seconds for a plain full-size decode of each image: what any pixel reader must pay."""
    started = time.perf_counter()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img.convert("RGB")
    return time.perf_counter() - started


def time_chain(batches: list[pa.RecordBatch], cfg: CurateConfig,
               previous: bool = False) -> tuple[float, dict[str, int]]:
    """Seconds for ``Chain.score_batch`` over the batches (header, decode, signals, rules,
    output rows), and how many rows were kept and rejected (``previous``: the signals and view
    resizes as they were before issue 15, bench/previous.py)."""
    # built once per worker in the runner too: not part of the per-image cost
    chain = previous_chain(cfg) if previous else Chain(cfg)
    seen: set[str] = set()
    kept = rejected = decodes = 0
    started = time.perf_counter()
    for batch in batches:
        result = chain.score_batch(batch, seen)
        kept += result.kept.num_rows
        rejected += result.rejects.num_rows
        decodes += result.decodes
    seconds = time.perf_counter() - started
    return seconds, {"kept": kept, "rejected": rejected, "decodes": decodes}


def measure_decode_vs_chain(shards: list[SourceShard], plan: Plan) -> dict[str, Any]:
    """Both passes over the same rows, interleaved so a burst of outside load hits both alike;
    the previous chain (bench/previous.py) runs beside them, so the change is read off one run."""
    cfg = bench_config(workers=1)
    batches = load_batches(shards, cfg, plan.compare_images)
    images = [data for b in batches for data in b.column("image").to_pylist()]
    decode_s, chain_s, previous_s = [], [], []
    with TreeSampler() as mem:
        for _ in range(plan.repeats):
            decode_s.append(time_full_decode(images))
            seconds, counts = time_chain(batches, cfg)
            chain_s.append(seconds)
            seconds, previous_counts = time_chain(batches, cfg, previous=True)
            previous_s.append(seconds)
    n = len(images)
    decode_ips, chain_ips, previous_ips = n / min(decode_s), n / min(chain_s), n / min(previous_s)
    return {
        "images": n,
        "mean_image_kb": round(sum(map(len, images)) / n / 1024, 1),
        "mean_megapixels": round(_mean_megapixels(images), 3),
        "decode_seconds": [round(s, 3) for s in decode_s],
        "chain_seconds": [round(s, 3) for s in chain_s],
        "previous_chain_seconds": [round(s, 3) for s in previous_s],
        "decode_images_per_s": round(decode_ips, 1),
        "chain_images_per_s": round(chain_ips, 1),
        "chain_cost_vs_decode": round(decode_ips / chain_ips, 3),
        "previous_chain_cost_vs_decode": round(decode_ips / previous_ips, 3),
        "same_decisions_as_previous": previous_counts == counts,
        "other_cpu_s": round(mem.other_cpu_s, 2),
        **counts,
    }


def _mean_megapixels(images: list[bytes]) -> float:
    total = 0
    for data in images:
        with Image.open(io.BytesIO(data)) as img:  # header only
            total += img.width * img.height
    return total / len(images) / 1e6


# --- the runner on Ray ----------------------------------------------------------------------


def timed_run(name: str, corpus: Path, shards: list[SourceShard], workers: int,
              cfg: CurateConfig | None = None) -> dict[str, Any]:
    """One runner call on a fresh local Ray into a fresh folder, with memory sampled throughout.

    ``ray.init`` is timed apart: it is paid once per job, not per image. The run time does
    include starting the Ray worker processes and their imports, which every job also pays.
    Shard finish times split the run into start-up, the shard phase and the tail after the
    last shard (the cross-shard key pass), which is what a missed speedup needs explained."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cfg = cfg or bench_config(workers)
    out = BENCH_OUT / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    finished: list[tuple[float, float]] = []  # (finish time, seconds inside process_shard)
    with TreeSampler() as mem:
        started = time.perf_counter()
        ensure_ray(cfg.run, extra_cpus=pool_resources(pool_specs(build_signals(cfg.signals)))[0])
        ray_up = time.perf_counter()
        def done(result, _summary) -> None:
            if result is not None:  # None: the work has started
                finished.append((time.perf_counter(), result.seconds))

        summary = run(corpus, out, cfg, mode="curate", use_ray=True, shards=shards, progress=done)
        run_end = time.perf_counter()
        ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)  # kept rows carry the image bytes: as big as the corpus
    if summary.failed or summary.shards_done != len(shards):
        raise RuntimeError(f"{name}: {summary.shards_done}/{len(shards)} shards done, failed: {summary.failed}")
    images = summary.kept + summary.rejected
    run_s = run_end - ray_up
    busy = sum(seconds for _, seconds in finished)
    first_start = min(done - seconds for done, seconds in finished)
    last_done = max(done for done, _ in finished)
    return {
        "workers": workers,
        "tars": len(shards),
        "images": images,
        "kept": summary.kept,
        "rejected": summary.rejected,
        "ray_init_s": round(ray_up - started, 2),
        "run_s": round(run_s, 2),
        "images_per_s": round(images / run_s, 1),
        "shard_busy_s": round(busy, 2),  # time inside process_shard, all shards
        "shard_mean_s": round(busy / len(finished), 3),
        "startup_s": round(first_start - ray_up, 2),  # run() called -> first shard starts work
        "shard_phase_s": round(last_done - first_start, 2),
        "tail_s": round(run_end - last_done, 2),  # last shard done -> run() returns
        # Share of the shard phase the workers spent inside process_shard (1.0: never idle).
        "shard_phase_efficiency": round(busy / (workers * (last_done - first_start)), 3),
        **mem.report(),
    }


def measure_workers(corpus: Path, shards: list[SourceShard], plan: Plan) -> dict[str, Any]:
    """The same tars with 1 worker, then 2: speedup of the run time (and with ray.init added)."""
    subset = shards[: plan.speedup_tars]
    one = timed_run("workers-1", corpus, subset, workers=1)
    two = timed_run("workers-2", corpus, subset, workers=2)
    return {
        "one": one,
        "two": two,
        "workers_speedup": round(one["run_s"] / two["run_s"], 3),
        "speedup_incl_ray_init": round((one["run_s"] + one["ray_init_s"]) / (two["run_s"] + two["ray_init_s"]), 3),
        # What one worker needs per shard when alone vs beside another: > 1 means the two
        # workers slow each other down (shared cores, memory bandwidth, outside load).
        "shard_slowdown_with_two": round(two["shard_mean_s"] / one["shard_mean_s"], 3),
    }


def measure_rss(corpus: Path, shards: list[SourceShard], plan: Plan) -> dict[str, Any]:
    """Peak tree RSS over the small corpus vs the 10x one, both with 2 workers."""
    small_tars = -(-plan.small_samples // plan.per_tar)
    small = timed_run("rss-small", corpus, shards[:small_tars], workers=2)
    large = timed_run("rss-large", corpus, shards, workers=2)
    return {"small": small, "large": large, "rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}


def measure_rss_default(plan: Plan, seed: int) -> dict[str, Any]:
    """Peak tree RSS with the default config (faces, BRISQUE, OCR in actor pools), N tars vs 5N.
    Shard tasks that wait on a pool give their CPU back to Ray; unless the runner bounds them,
    more shards start and memory grows with the input. Small web images (0.1-0.3 MP) keep the
    model signals' cost to a few minutes."""
    spec = CorpusSpec(samples=5 * plan.default_rss_tars * plan.default_rss_per_tar, per_tar=plan.default_rss_per_tar,
                      seed=seed + 1, min_mp=0.1, max_mp=0.3)
    corpus = build_corpus(BENCH_OUT / "default-rss", spec)
    shards = discover(corpus, CurateConfig().source)
    cfg = CurateConfig.model_validate({"run": {"workers": 2}})
    small = timed_run("rss-default-small", corpus, shards[: plan.default_rss_tars], workers=2, cfg=cfg)
    large = timed_run("rss-default-large", corpus, shards, workers=2, cfg=cfg)
    return {"small": small, "large": large,
            "rss_growth_default": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}


# --- report ---------------------------------------------------------------------------------


def passed(name: str, value: float) -> bool:
    op, target = TARGETS[name]
    return value <= target if op == "<=" else value >= target


def print_table(results: dict[str, Any], header: str) -> None:
    figures = ("decode_images_per_s", "chain_images_per_s", "previous_chain_cost_vs_decode", "flow_streamed_s",
               "flow_sequential_s", "full_chain_images_per_s", "naive_images_per_s", "full_chain_vs_naive_flushed",
               "train_step_s", "minimal_step_s", "train_step_ema_s", "loader_samples_per_s_per_core",
               "soak_rows_per_s_start", "soak_rows_per_s_end", "soak_rss_mb_start", "soak_rss_mb_end")
    rows = [(name, results[name], "", "") for name in figures if results.get(name) is not None]
    for name, (op, target) in TARGETS.items():
        if name in results:
            rows.append((name, results[name], f"{op} {target}", "PASS" if results["passed"][name] else "FAIL"))
    print(f"\nbench ({header})")
    print(f"{'figure':<30}{'value':>12}  {'target':<10}{'result'}")
    for name, value, target, verdict in rows:
        print(f"{name:<30}{value:>12}  {target:<10}{verdict}")
    if "quick" in header and "workers_speedup" in results:
        print("(quick: the 1 vs 2 workers runs take 1-3 s, so start-up weighs on workers_speedup; "
              "its target is judged by the full `make bench`)")
    if "flow" in results:
        flow.print_section(results["flow"])
    if "models" in results:
        models.print_section(results["models"])
    if "accuracy" in results:
        accuracy.print_section(results["accuracy"])
    if "captions" in results:
        captions.print_section(results["captions"])
    if "synth" in results:
        synth.print_section(results["synth"])
    if "soak" in results:
        soak.print_section(results["soak"])
    if "train" in results:
        from bench import train  # already imported by the run that measured it

        train.print_section(results["train"])
    if "workers_runs" not in results:
        return
    w, r = results["workers_runs"], results["rss_runs"]
    print(f"\nworkers: 1 -> {w['one']['run_s']} s, 2 -> {w['two']['run_s']} s over {w['one']['images']} images "
          f"in {w['one']['tars']} tars (ray.init {w['one']['ray_init_s']} / {w['two']['ray_init_s']} s; "
          f"speedup incl. init {w['speedup_incl_ray_init']}; per-shard slowdown with two "
          f"{w['shard_slowdown_with_two']})")
    for label, x in (("1 worker", w["one"]), ("2 workers", w["two"])):
        print(f"  {label}: start-up {x['startup_s']} s, shard phase {x['shard_phase_s']} s "
              f"(efficiency {x['shard_phase_efficiency']}), tail {x['tail_s']} s")
    print(f"rss: {r['small']['images']} images -> peak {r['small']['peak_rss_mb']} MB, "
          f"{r['large']['images']} images -> peak {r['large']['peak_rss_mb']} MB")
    d = results["rss_default_runs"]
    print(f"rss, default config (faces, quality, OCR): {d['small']['images']} images in {d['small']['tars']} tars "
          f"-> peak {d['small']['peak_rss_mb']} MB, {d['large']['images']} in {d['large']['tars']} -> peak "
          f"{d['large']['peak_rss_mb']} MB ({d['large']['images_per_s']} images/s on 2 workers)")
    print(f"wall seconds per step: {results['phase_s']}")
    sections = [w["one"], w["two"], r["small"], r["large"], d["small"], d["large"], results["decode_vs_chain"]]
    others = sum(x["other_cpu_s"] for x in sections)
    print(f"CPU seconds taken by processes outside the benchmark while it measured: {others:.1f}"
          + ("  <- the machine was shared: figures are pessimistic" if others > 5 else ""))


def merge_results(update: dict[str, Any], path: Path = RESULTS) -> None:
    """Merge into the existing file: other benchmarks' keys (and their targets) stay."""
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} was not valid JSON; starting it afresh", file=sys.stderr)
    for key in ("targets", "passed"):
        update[key] = {**current.get(key, {}), **update[key]}
    current.update(update)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def machine() -> dict[str, Any]:
    return {
        "cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@contextmanager
def phase(phases: dict[str, float], name: str, what: str) -> Iterator[None]:
    """Announce a step and keep its wall time: a run over its time budget shows which step ate it."""
    print(f"{name}: {what}", flush=True)
    started = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--per-tar", type=int, help="samples per tar (default 500, quick 50)")
    parser.add_argument("--speedup-tars", type=int, help="tars for the 1 vs 2 workers runs (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--kill-every", type=float, help="soak: seconds between model actor kills (default 20)")
    parser.add_argument("--only", choices=("all", "curate", "flow", "models", "train", "captions", "synth", "soak"),
                        default="all",
                        help="curate: issue 2's figures; flow: the flow vs the sequential one; models: issue 3's; "
                        "train: issue 5's; captions: the caption pass's; synth: t2i synth's; soak: the soak under "
                        "faults, not in all (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read by ray.init; make sets it too
    plan = PLANS["quick" if args.quick else "full"]
    overrides = {"per_tar": args.per_tar, "speedup_tars": args.speedup_tars}
    plan = Plan(**{**asdict(plan), **{k: v for k, v in overrides.items() if v}})
    started = time.perf_counter()
    info = machine()

    spec = CorpusSpec(samples=plan.large_samples, per_tar=plan.per_tar, seed=args.seed)
    phases: dict[str, float] = {}  # wall seconds per step, to see where a slow run went
    results: dict[str, Any] = {}
    if args.only not in ("flow", "captions", "synth", "soak"):  # those sections make their own data
        with phase(phases, "corpus", f"{spec.samples} samples in {spec.tars} tars under {BENCH_OUT}"):
            corpus = build_corpus(BENCH_OUT, spec)
        shards = discover(corpus, bench_config(1).source)
    if args.only in ("all", "curate"):
        results |= measure_curate(corpus, shards, plan, spec, phases)
    if args.only in ("all", "flow"):
        with phase(phases, "flow", f"curate flow vs sequential groups, {flow.SHARDS} shards, one straggler"):
            results |= flow.measure(plan.mode, BENCH_OUT / "flow", args.seed)
        results["flow"]["machine"] = info
    if args.only in ("all", "models"):
        with phase(phases, "models", f"{plan.model_images} images: each signal, full chain, naive loop"):
            batches = load_batches(shards, bench_config(1), plan.model_images)
            results |= models.measure(batches, plan.mode)
        with phase(phases, "accuracy", f"previous vs now: signals, {plan.decision_rows} rows' decisions"):
            results |= accuracy.measure(batches, load_batches(shards, bench_config(1), plan.decision_rows),
                                        frozenset(results["models"]["skipped"]))
        results["models"]["machine"] = info
    if args.only in ("all", "train"):
        with phase(phases, "train", f"{plan.train_rounds} x {plan.train_steps} steps per loop, loader "
                                    f"{plan.loader_batches} batches per side"):
            # Imported here, last: torch and diffusers take ~4 s and ~750 MB, which the curate
            # figures' driver RSS must not carry.
            from bench import train

            TARGETS.update(train.TARGETS)
            results |= train.measure(corpus, shards[:1], plan.mode, plan.train_steps, plan.train_rounds,
                                     plan.loader_batches)
        results["train"]["machine"] = info
    if args.only in ("all", "captions"):
        with phase(phases, "captions", "tiny captioner and translators, then the caption pass in-process and on Ray"):
            results |= captions.measure(plan.mode, BENCH_OUT / "captions")
        results["captions"]["machine"] = info
    if args.only in ("all", "synth"):
        with phase(phases, "synth", "render + encode at 512 and 1024, the synth cascade with OCR, trdg beside"):
            results |= synth.measure(plan.mode, BENCH_OUT / "synth")
        results["synth"]["machine"] = info
    if args.only == "soak":  # ~95 minutes in full on 2 cores: not part of all
        with phase(phases, "soak", "default config from and to S3, model actors and the S3 server killed"):
            results |= soak.measure(plan.mode, BENCH_OUT / "soak", args.kill_every)
        results["soak"]["machine"] = info
    info["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = {name: {"op": op, "value": value} for name, (op, value) in TARGETS.items() if name in results}
    results["passed"] = {name: passed(name, results[name]) for name in results["targets"]}
    wall_s = round(time.perf_counter() - started, 1)
    if args.only in ("all", "curate"):  # these describe a curate run; the other sections keep their own
        results |= {"mode": plan.mode, "machine": info, "phase_s": phases, "wall_s": wall_s}
    print_table(results, f"{plan.mode}, --only {args.only}, {info['cores']} cores, {wall_s} s")
    merge_results(results)
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


def measure_curate(corpus: Path, shards: list[SourceShard], plan: Plan, spec: CorpusSpec,
                   phases: dict[str, float]) -> dict[str, Any]:
    """Issue 2's figures: memory and worker scaling on Ray, then decode vs chain in-process."""
    # Ray runs first, while this process is small, so its own RSS is the same in both memory runs.
    with phase(phases, "rss", "small and 10x corpus, 2 workers"):
        rss = measure_rss(corpus, shards, plan)
    with phase(phases, "rss_default", f"default config, {plan.default_rss_tars} vs {5 * plan.default_rss_tars} tars"):
        rss_default = measure_rss_default(plan, spec.seed)
    with phase(phases, "workers", f"1 vs 2 workers on {plan.speedup_tars} tars"):
        workers = measure_workers(corpus, shards, plan)
    with phase(phases, "decode_vs_chain", f"{plan.compare_images} images, one process"):
        compare = measure_decode_vs_chain(shards, plan)
    return {
        "decode_images_per_s": compare["decode_images_per_s"],
        "chain_images_per_s": compare["chain_images_per_s"],
        "chain_cost_vs_decode": compare["chain_cost_vs_decode"],
        "previous_chain_cost_vs_decode": compare["previous_chain_cost_vs_decode"],
        "workers_speedup": workers["workers_speedup"],
        "rss_growth": rss["rss_growth"],
        "rss_peak_small_mb": rss["small"]["peak_rss_mb"],
        "rss_peak_large_mb": rss["large"]["peak_rss_mb"],
        "rss_growth_default": rss_default["rss_growth_default"],
        "rss_default_peak_small_mb": rss_default["small"]["peak_rss_mb"],
        "rss_default_peak_large_mb": rss_default["large"]["peak_rss_mb"],
        "decode_vs_chain": compare,
        "workers_runs": workers,
        "rss_runs": rss,
        "rss_default_runs": rss_default,
        "corpus": {**asdict(spec), "path": str(corpus.relative_to(REPO)), "signals": list(SIGNALS)},
    }


if __name__ == "__main__":
    sys.exit(main())
