"""A soak: ``t2i curate`` with the default config over many small rows from and to S3 while its
model actors are killed every ``kill_every_s`` seconds and the S3 server once.

A long run shows what a short one hides: memory that grows with rows done, throughput that sinks
as actors restart, outputs that drift when faults land. So the CLI, as a user runs it (a local Ray
runtime; faces and OCR in actor pools), curates one corpus twice: into ``s3://soak/reference``
uninterrupted, then into ``s3://soak/soak`` while this thread SIGKILLs a random ``ray::ModelActor``
of the run every ``kill_every_s`` (Ray restarts it, its batches are sent again) and, once
``outage_at`` of the shards are done, the SeaweedFS server, restarted ``outage_s`` later on the same
ports and data (storage calls wait it out: ``storage.retry_s``).

Corpus (bench-out/soak/, cached): random crops of the test photos in webdataset tars, 1 in 10 of
75-160 px (rejected by ``short_side`` before any model), the rest 0.09-0.16 MP (~230-400 px short
side), 1 in 4 with drawn lines of text. The server is the tests' (tests/s3_server.py), given 10 GB.

Figures, for each run: rows/s and the peak RSS of the run's process tree (driver, Ray, workers,
actors; not the S3 server) in each third of the shard phase (first shard started to last done, so
start-up and the final key pass are outside); a shard's rows count spread over its span in the
manifest. ``soak_rss_flat``: the largest third's peak over the smallest (target <= 1.10);
``soak_output_equal``: 1 when every kept row (all columns, image bytes by md5) and every reject row
equals the reference's. "Others' CPU" is everything outside the run's tree, the S3 server included.

``full``, 50,000 rows in 50 tars of 1,000, takes about 95 minutes on 2 cores, so ``--only all`` leaves
it out (``--only soak``); ``--quick`` is 5,000 rows in 50 tars of 100 (about 10 minutes).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import psutil
from PIL import ImageDraw, ImageFont

from bench.corpus import REPO, CorpusSpec, _add, _caption, _photos, make_image
from bench.cost_study import FONT, LINES
from bench.memory import TreeSampler
from schemas.config import StorageConfig
from tasks.shards import Manifest
from tasks.stats import _source
from tasks.storage import Store, duckdb_setup, open_store

BUCKET = "soak"
VOLUMES = 160  # SeaweedFS volumes of 64 MB: the tests' server has 8 (512 MB); a full soak writes ~3 GB
TARGETS: dict[str, tuple[str, float]] = {"soak_rss_flat": ("<=", 1.10), "soak_output_equal": (">=", 1.0)}
TINY = CorpusSpec(samples=1, min_mp=0.01, max_mp=0.025)
SMALL = CorpusSpec(samples=1, min_mp=0.09, max_mp=0.16)


@dataclass(frozen=True)
class SoakPlan:
    tars: int
    per_tar: int
    kill_every_s: float = 20.0
    outage_s: float = 10.0
    outage_at: float = 0.4  # share of the shards done when the S3 server is killed
    seed: int = 0


PLANS = {"full": SoakPlan(tars=50, per_tar=1_000), "quick": SoakPlan(tars=50, per_tar=100)}


def write_tar(path: Path, index: int, plan: SoakPlan) -> None:
    """Tar ``index`` of the soak corpus (bench/corpus.py's layout and captions, smaller images, text)."""
    rng = random.Random(f"soak:{plan.seed}:{plan.per_tar}:{index}")
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(plan.per_tar):
            key = f"{index * plan.per_tar + i:09d}"
            img = make_image(rng.choice(_photos()), rng, TINY if rng.random() < 0.1 else SMALL)
            if rng.random() < 0.25:
                draw, size = ImageDraw.Draw(img), rng.choice((14, 20, 28, 40))
                font = ImageFont.truetype(str(FONT), size)
                for line in range(rng.randint(1, 4)):
                    x, y = rng.randint(4, img.width // 4), 4 + line * (size + 8)
                    text = rng.choice(LINES)
                    box = draw.textbbox((x, y), text, font=font)
                    draw.rectangle((box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4), fill=(245, 245, 240))
                    draw.text((x, y), text, font=font, fill=(20, 20, 20))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            caption = _caption(rng)
            meta = {"key": key, "status": "success", "caption": caption, "width": img.width, "height": img.height}
            _add(tar, f"{key}.jpg", buf.getvalue())
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    os.replace(tmp, path)


def _write_job(args: tuple[str, int, SoakPlan]) -> None:
    write_tar(Path(args[0]), args[1], args[2])


def build(root: Path, plan: SoakPlan) -> Path:
    """The corpus under ``root``, reused while its stamp matches the plan."""
    out, spec = root / f"corpus-{plan.tars}x{plan.per_tar}", {"tars": plan.tars, "per_tar": plan.per_tar,
                                                               "seed": plan.seed, "version": 1}
    stamp = out / "_soak.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_job, [(str(out / f"{i:05d}.tar"), i, plan) for i in range(plan.tars)]))
    stamp.write_text(json.dumps(spec))
    return out


def start_server(root: Path) -> Any:
    """The tests' SeaweedFS under ``root``, restarted at once with room for ``VOLUMES`` volumes
    (``restart`` reuses the process's arguments, ports and data)."""
    if str(REPO / "tests") not in sys.path:
        sys.path.append(str(REPO / "tests"))  # no package: the tests import it by this path too
    from s3_server import SeaweedFS

    server = SeaweedFS.start(base_dir=root)
    server.kill()
    args = list(server.process.args)
    if "-volume.max=8" not in args:
        server.stop()
        raise RuntimeError(f"tests/s3_server.py no longer starts weed with -volume.max=8: {args}")
    server.process.args = [f"-volume.max={VOLUMES}" if a == "-volume.max=8" else a for a in args]
    server.restart()
    server.create_bucket(BUCKET)
    return server


def storage_of(server: Any) -> StorageConfig:
    return StorageConfig(endpoint_url=server.endpoint_url, region=server.region,
                         access_key_id=server.access_key, secret_access_key=server.secret_key)


def model_actors(root: int) -> list[psutil.Process]:
    """The run's model actors: processes under ``root`` whose title Ray set to ``ray::ModelActor...``."""
    found = []
    for proc in psutil.Process(root).children(recursive=True):
        try:
            if "ray::ModelActor" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def curate(name: str, corpus_url: str, server: Any, plan: SoakPlan, root: Path, chaos: bool) -> dict[str, Any]:
    """One ``t2i curate`` subprocess into ``s3://soak/<name>``, its tree's memory sampled; with
    ``chaos``, this (main) thread kills actors and the server meanwhile: a restarted server dies with
    the thread that started it (tests/s3_server.py), so no helper thread may do it."""
    out = f"s3://{BUCKET}/{name}"
    store = open_store(out, storage_of(server))
    env = os.environ | server.env() | {"RAY_USAGE_STATS_ENABLED": "0"}
    rng = random.Random(plan.seed)
    kills: list[float] = []
    outage: list[float] = []  # [killed at, back at] (Unix time)
    with open(root / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", "curate", "--source", corpus_url, "--out", out],
                                env=env, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
        with TreeSampler(interval=0.5, root=proc.pid) as mem:
            try:
                next_kill, next_poll = time.monotonic() + plan.kill_every_s, 0.0
                while chaos and proc.poll() is None:
                    time.sleep(0.5)
                    if time.monotonic() >= next_kill and (actors := model_actors(proc.pid)):
                        rng.choice(actors).kill()  # SIGKILL, by pid, a process of this run
                        kills.append(time.time())
                        next_kill = time.monotonic() + plan.kill_every_s
                    if not outage and time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + 2
                        if len(Manifest(store).done_ids()) >= plan.outage_at * plan.tars:
                            outage.append(time.time())
                            server.kill()
                            time.sleep(plan.outage_s)
                            server.restart()
                            outage.append(time.time())
                stdout, _ = proc.communicate()
            finally:
                if proc.poll() is None:  # this loop failed: the run's lock reaps its Ray (tasks/lock.py)
                    proc.kill()
                    proc.wait()
    result: dict[str, Any] = {"returncode": proc.returncode, "actor_kills": len(kills),
                              "s3_outage_s": round(outage[1] - outage[0], 1) if outage else 0.0}
    if proc.returncode != 0:
        lines = (root / f"{name}.log").read_text(errors="replace").strip().splitlines()
        result["error"] = lines[-1] if lines else f"exit {proc.returncode}"
        return result | {"peak_rss_mb": round(mem.peak_mb, 1), "other_cpu_s": round(mem.other_cpu_s, 1)}
    summary, entries = json.loads(stdout), Manifest(store).entries()
    result |= {k: summary.get(k, 0) for k in ("kept", "rejected", "storage_retries", "units_retried", "seconds")}
    if outage:  # did the outage meet work in flight (shard spans as the manifest records them)?
        result["shards_across_outage"] = sum(e["started_at"] < outage[1] and e["started_at"] + e["seconds"] > outage[0]
                                             for e in entries)
    return result | thirds(entries, mem.timeline) | {"other_cpu_s": round(mem.other_cpu_s, 1)}


def thirds(entries: list[dict[str, Any]], timeline: list[tuple[float, float, float]]) -> dict[str, Any]:
    """Rows/s, peak tree RSS and rows per CPU-second of the run's tree in each third of the shard
    phase, and rows/s in tenths (over time). Rows per CPU-second falls only if the run does more
    work per row; rows/s falls too when other processes take the cores."""
    spans = [(e["started_at"], e["started_at"] + e["seconds"], e["kept"] + e["rejected"]) for e in entries]
    t0, t1 = min(s for s, _, _ in spans), max(e for _, e, _ in spans)

    def rows(lo: float, hi: float) -> float:  # each shard's rows spread evenly over its own span
        return sum(n * max(0.0, min(e, hi) - max(s, lo)) / max(e - s, 1e-9) for s, e, n in spans)

    def cpu_by(t: float) -> float:
        return max((cpu for at, _, cpu in timeline if at <= t), default=0.0)

    cuts = [t0 + (t1 - t0) * i / 3 for i in range(4)]
    tenth = (t1 - t0) / 10
    out: dict[str, Any] = {"shard_phase_s": round(t1 - t0, 1),
                           "rows_per_s_tenths": [round(rows(t0 + tenth * i, t0 + tenth * (i + 1)) / tenth, 2)
                                                 for i in range(10)]}
    for i, part in enumerate(("start", "middle", "end")):
        lo, hi = cuts[i], cuts[i + 1]
        out[f"rows_per_s_{part}"] = round(rows(lo, hi) / (hi - lo), 2)
        cpu = cpu_by(hi) - cpu_by(lo)
        out[f"rows_per_cpu_s_{part}"] = round(rows(lo, hi) / cpu, 2) if cpu > 0 else None
        out[f"rss_mb_{part}"] = round(max((mb for t, mb, _ in timeline if lo <= t <= hi), default=0.0), 1)
    rss = [out[f"rss_mb_{p}"] for p in ("start", "middle", "end")]
    out["rss_flat"] = round(max(rss) / min(rss), 3) if min(rss) > 0 else None
    return out


def differences(server: Any, a: str, b: str) -> dict[str, int]:
    """Rows in one output and not the other (both ways, as multisets), for kept and reject rows."""
    stores: list[Store] = [open_store(f"s3://{BUCKET}/{name}", storage_of(server)) for name in (a, b)]
    con = duckdb.connect()
    for statement in duckdb_setup(stores[0], storage_of(server)):
        con.execute(statement)
    found = {}
    for kind, columns in (("shards", "* EXCLUDE (image), md5(image) AS image_md5"), ("rejects", "*")):
        x, y = (f"(SELECT {columns} FROM {_source(s, kind)})" for s in stores)
        found[kind] = con.execute(f"SELECT (SELECT count(*) FROM ({x} EXCEPT ALL {y})) + "
                                  f"(SELECT count(*) FROM ({y} EXCEPT ALL {x}))").fetchone()[0]
    return found


def measure(mode: str, root: Path, kill_every_s: float | None = None) -> dict[str, Any]:
    """Corpus, server, upload, the reference run, the soak run, the comparison; the server is
    stopped (by pid) whatever happens."""
    plan = PLANS[mode]
    if kill_every_s:
        plan = SoakPlan(**{**asdict(plan), "kill_every_s": kill_every_s})
    root.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    corpus = build(root, plan)
    server = start_server(root)
    try:
        fs = server.filesystem()
        for tar in sorted(corpus.glob("*.tar")):
            with fs.open_output_stream(f"{BUCKET}/src/{tar.name}") as fh:
                fh.write(tar.read_bytes())
        setup_s = time.perf_counter() - wall
        src = f"s3://{BUCKET}/src"
        ref = curate("reference", src, server, plan, root, chaos=False)
        soak = curate("soak", src, server, plan, root, chaos=True)
        diff = differences(server, "reference", "soak") if soak["returncode"] == ref["returncode"] == 0 else {}
    finally:
        server.stop()
    rows = plan.tars * plan.per_tar
    equal = bool(diff) and not any(diff.values()) and soak.get("kept", 0) + soak.get("rejected", 0) == rows
    figures = {f"soak_{k}": soak.get(k) for k in ("rows_per_s_start", "rows_per_s_middle", "rows_per_s_end",
                                                  "rss_mb_start", "rss_mb_middle", "rss_mb_end", "rss_flat",
                                                  "actor_kills", "s3_outage_s")}
    return {**{k: v for k, v in figures.items() if v is not None}, "soak_output_equal": int(equal),
            "soak_rows": rows, "soak_wall_s": soak.get("seconds"),
            "soak_vs_reference_rows_per_s": round(ref["seconds"] / soak["seconds"], 3) if diff else None,
            "soak": {"mode": mode, "plan": asdict(plan), "setup_s": round(setup_s, 1), "reference": ref,
                     "soak": soak, "rows_differing": diff, "wall_s": round(time.perf_counter() - wall, 1)}}


def print_section(s: dict[str, Any]) -> None:
    p = s["plan"]
    print(f"\nsoak ({s['mode']}): {p['tars'] * p['per_tar']} rows in {p['tars']} tars, default config, S3 in and "
          f"out; an actor killed every {p['kill_every_s']} s, S3 down {p['outage_s']} s at {p['outage_at']:.0%} "
          f"of the shards; {s['wall_s']} s in all (corpus, server and upload {s['setup_s']} s)")
    for name in ("reference", "soak"):
        r = s[name]
        if r["returncode"] != 0:
            print(f"  {name:<10} FAILED (exit {r['returncode']}): {r.get('error')}")
            continue
        print(f"  {name:<10}{r['seconds']:>8} s | rows/s {r['rows_per_s_start']} / {r['rows_per_s_middle']} / "
              f"{r['rows_per_s_end']} | peak RSS MB {r['rss_mb_start']} / {r['rss_mb_middle']} / {r['rss_mb_end']} "
              f"(flat {r['rss_flat']}) | kept {r['kept']}, rejected {r['rejected']}, actor kills {r['actor_kills']}, "
              f"S3 outage {r['s3_outage_s']} s across {r.get('shards_across_outage', 0)} shards, storage retries "
              f"{r['storage_retries']}, shard tries retried {r['units_retried']}, others' CPU {r['other_cpu_s']} s")
        print(f"  {'':<10}rows/s by tenth of the shard phase: {r['rows_per_s_tenths']}; rows per CPU-second of "
              f"the run: {r['rows_per_cpu_s_start']} / {r['rows_per_cpu_s_middle']} / {r['rows_per_cpu_s_end']}")
    print(f"  rows differing from the reference: {s['rows_differing'] or 'not compared (a run failed)'}")
