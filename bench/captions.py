"""The caption pass's figures (``--only captions``): the tiny models' own rates, what a caption pass
adds per row over reading the shards, and public CogVLM figures to size a real GPU run.

All in one run, so every ratio compares figures measured minutes apart on the same machine:

- Models (one process, each warmed up once, each timed over repeated passes of the same inputs
  until it has run ``min_s`` seconds): captions/s of the tiny Qwen2-VL (``ChatVLMCaptioner``,
  float32 CPU, the prepared 64 px images the pass gives it) at model batch 1 vs 8 on the same
  images; translations/s of the tiny Marian with transformers vs the same weights through
  CTranslate2 int8 and float32 (same texts, ``max_new_tokens`` 32, batch 16), and the ratios
  ``ct2_int8_vs_transformers`` and ``ct2_float32_vs_transformers``. Outputs are random text, so
  the tokens each backend generated per item are printed beside the rates: int8 rounding may end a
  translation at another step. Torch and CTranslate2 each run on one thread (see ``CT2_THREADS``),
  in the pass too; every figure is measured ``rounds`` times, interleaved, and the best kept.
- The pass, on a curated output of ``rows`` rows (test photos, like tests/test_caption_pass.py,
  4 parts): (a) the floor, reading every part's key/image/caption columns row group by row group
  with pyarrow and decoding each image once with the pass's own decoder (``ImageSample`` at the
  captioner's input side), (b) ``caption_output(..., use_ray=False)``, (c) the same through a local
  Ray (4 CPUs; ``ray.init`` timed apart). Each pass writes a fresh caption set and includes loading
  the models (once in (b), once per actor in (c)); (c') is a second pass on the same Ray runtime,
  whose worker processes are then up (its pools' actors start again). ``overhead_ms_per_row`` is the pass minus the
  floor minus the model time the first part measured (captioner at batch 8 + CTranslate2 int8, the
  tiny config's backends and batch sizes) minus one model load (warm in-process, where this process
  has imported everything already; cold, imports included, on Ray, where each actor does): an estimate,
  since the pass's batches can be smaller than 8 (requests of 4 rows, merged when two arrive
  together). ``merged_fraction``: the share of model batches merged from several requests
  (``PassSummary.model_batches``, read from the pools' ``batch_counts()``).
- Public figures (below, with their sources): seconds per image for CogVLM / CogVLM2 on an A100,
  and the GPU-hours for 10M images each implies at one image at a time. No throughput figure for
  batched CogVLM captioning on an A100 was found; the sources are user reports at batch 1.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from bench.corpus import REPO
from bench.memory import TreeSampler

PHOTOS = sorted(p for p in (REPO / "tests" / "data").iterdir() if p.suffix in (".jpg", ".png"))
TINY_CONFIG = REPO / "configs" / "recaption-tiny.yaml"
# Curated like the caption tests, with bigger parts: 4 parts of 24 rows, row groups of 8.
CURATE = {"signals": {"resolution": {}}, "rules": {}, "source": {"folder_chunk": 24}, "output": {"row_group_rows": 8}}
CAPTION_BATCHES = (1, 8)
TRANSLATE_BATCH = 16
TRANSLATE_MAX_NEW_TOKENS = 32
RAY_CPUS = 4
# One thread for torch and for CTranslate2, here and in the pass's config: a CTranslate2 load sets
# the OpenMP thread count it shares with torch, so leaving either at its default lets one backend's
# load change the other's speed mid-run.
CT2_THREADS = 1

# Public figures for a real CogVLM run. Each: seconds per image on one GPU, as reported, and where.
# They are user reports of the reference code at one image at a time (bf16/fp16, no batching, no
# vLLM/TGI); a batched server should do better, by how much none of them says.
PUBLIC_FIGURES: tuple[dict[str, Any], ...] = (
    {"model": "CogVLM-17B (chat)", "gpu": "A100", "s_per_image": 2.5,
     "note": "Chat() at batch 1, one caption per image",
     "url": "https://github.com/zai-org/CogVLM/issues/75"},
    {"model": "CogVLM2-llama3-19B", "gpu": "A100", "s_per_image": 4.5,
     "note": "a user's average, '4-5 s per image'",
     "url": "https://github.com/zai-org/CogVLM2/issues/104"},
    {"model": "CogVLM2-llama3-19B", "gpu": "A100", "s_per_image": 10.0,
     "note": "the issue's opener, 'about 10 s per image', official example script",
     "url": "https://github.com/zai-org/CogVLM2/issues/104"},
    {"model": "CogVLM-17B", "gpu": "RTX 3090", "s_per_image": 8.5,
     "note": "'8-9 s per image' (a 4090 user: ~10 s), VLM-Captioning-Tools script; not an A100",
     "url": "https://github.com/ProGamerGov/VLM-Captioning-Tools/issues/6"},
)
PUBLIC_NOT_FOUND = ("No public tokens/s or batched images/s figure for CogVLM / CogVLM2 on an A100 was found. "
                    "Leonardo.Ai captioned 30M images with CogVLM-17B on GH200s, 'over 3x' the throughput of "
                    "their A100-40GB nodes, but gives no absolute rate: "
                    "https://leonardo.ai/news/leonardo-scales-image-captioning-with-the-nvidia-gh200/")
IMAGES_TO_SIZE = 10_000_000


def gpu_hours(s_per_image: float, images: int = IMAGES_TO_SIZE) -> float:
    return s_per_image * images / 3600


# --- the models' own rates --------------------------------------------------------------------


def timed_rate(call: Callable[[Sequence[Any]], list[Any]], items: Sequence[Any], batch: int,
               min_s: float) -> dict[str, Any]:
    """Warm up on one batch, then run batches of ``items`` (cycling) until ``min_s`` has passed."""
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]
    call(batches[0])  # warm-up: lazy init, first-call allocations
    done = tokens = calls = 0
    started = time.perf_counter()
    while True:
        for b in batches:
            out = call(b)
            done += len(b)
            calls += 1
            tokens += sum(g.tokens for g in out)
        seconds = time.perf_counter() - started
        if seconds >= min_s:
            break
    return {"items": done, "batches": calls, "seconds": round(seconds, 3), "per_s": round(done / seconds, 2),
            "ms_per_item": round(1000 * seconds / done, 2), "tokens_per_item": round(tokens / done, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def prepared_requests(cap_section: dict[str, Any], n: int) -> list[Any]:
    """What recaption hands the captioner: each photo through the stage's own ``prepare`` (decoded,
    shrunk to the captioner's side), then made a request as its ``infer`` does."""
    from PIL import Image

    from captioners.base import CaptionRequest
    from captioners.stages import RecaptionParams, RecaptionStage

    stage = RecaptionStage(RecaptionParams(captioner=cap_section))  # builds, does not load, a captioner
    out = []
    for i in range(n):
        pixels, caption, ocr = stage.prepare({"image": PHOTOS[i % len(PHOTOS)].read_bytes(),
                                              "caption": f"photo {i} of 故宫"})
        out.append(CaptionRequest(Image.fromarray(pixels), caption, ocr))
    return out


def english_texts(n: int) -> list[str]:
    from captioners.tiny_translators import ENGLISH, SAMPLE_TEXTS

    pool = [*SAMPLE_TEXTS, *(line for line in ENGLISH.splitlines() if line.strip())]
    return [pool[i % len(pool)] for i in range(n)]


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the best rate (outside load only ever slows a round down), with every round's rate."""
    best = max(rounds, key=lambda r: r["per_s"])
    return {**best, "rounds_per_s": [r["per_s"] for r in rounds]}


def measure_models(models: dict[str, Path], cfg: dict[str, Any], min_s: float, rounds: int) -> dict[str, Any]:
    """Every figure ``rounds`` times, interleaved (a burst of outside load hits them alike), best kept."""
    import torch

    from captioners import build_captioner, build_translator

    cap_section = {**cfg["captioner"], "device": "cpu", "dtype": "float32"}
    load_s: dict[str, float] = {}
    for when in ("captioner_cold", "captioner"):  # the first pays the imports too (as a Ray actor does)
        captioner = build_captioner(cap_section)
        t0 = time.perf_counter()
        captioner.load()
        load_s[when] = round(time.perf_counter() - t0, 3)
    requests = prepared_requests(cap_section, max(CAPTION_BATCHES) * 2)

    texts = english_texts(TRANSLATE_BATCH * 2)
    common = {"device": "cpu", "max_new_tokens": TRANSLATE_MAX_NEW_TOKENS}
    ct2 = {"intra_threads": CT2_THREADS}
    translators = {
        "transformers": {"backend": "marian", "path": str(models["marian"]), **common},
        "ct2_int8": {"backend": "ctranslate2", "path": str(models["marian-ct2"]), "compute_type": "int8",
                     **ct2, **common},
        "ct2_float32": {"backend": "ctranslate2", "path": str(models["marian-ct2-float32"]),
                        "compute_type": "float32", **ct2, **common},
    }
    built = {}
    for name, section in translators.items():
        built[name] = build_translator(section)
        t0 = time.perf_counter()
        built[name].load()
        load_s[name] = round(time.perf_counter() - t0, 3)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for b in CAPTION_BATCHES:
            runs.setdefault(f"caption_{b}", []).append(timed_rate(captioner.caption, requests, b, min_s))
        for name, t in built.items():
            runs.setdefault(name, []).append(timed_rate(t.translate, texts, TRANSLATE_BATCH, min_s))
    caption = {f"batch_{b}": best_of(runs[f"caption_{b}"]) for b in CAPTION_BATCHES}
    translate = {name: best_of(runs[name]) for name in translators}
    base = translate["transformers"]["per_s"]
    b1, b8 = (caption[f"batch_{b}"]["per_s"] for b in CAPTION_BATCHES)
    return {
        "caption": caption,
        "caption_batch8_vs_batch1": round(b8 / b1, 2),
        "translate": translate,
        "ct2_int8_vs_transformers": round(translate["ct2_int8"]["per_s"] / base, 2),
        "ct2_float32_vs_transformers": round(translate["ct2_float32"]["per_s"] / base, 2),
        "load_s": load_s,
        "torch_threads": torch.get_num_threads(),  # read last: a CTranslate2 load must not have changed it
        "ct2_intra_threads": CT2_THREADS,
        "images": len(requests), "image_side": captioner.params.image_side,
        "max_new_tokens": {"captioner": captioner.params.max_new_tokens, "translator": TRANSLATE_MAX_NEW_TOKENS},
        "min_s": min_s, "rounds": rounds,
    }


# --- the pass per row -------------------------------------------------------------------------


def curate_output(root: Path, rows: int) -> Path:
    from schemas.config import CurateConfig
    from tasks.runner import run

    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(rows):
        p = PHOTOS[i % len(PHOTOS)]
        (src / f"{i:04d}{p.suffix}").write_bytes(p.read_bytes())
        (src / f"{i:04d}.txt").write_text(f"photo {i} of 故宫")
    run(src, root / "out", CurateConfig.model_validate(CURATE), use_ray=False)
    return root / "out"


def time_floor(out: Path, side: int) -> dict[str, Any]:
    """Read key/image/caption part by part, row group by row group, and decode each image once."""
    from schemas.config import DecodeConfig
    from tasks.decode import DecodeError, ImageSample

    d = DecodeConfig()
    rows = undecodable = 0
    started = time.perf_counter()
    for part in sorted((out / "shards").glob("*.parquet")):
        f = pq.ParquetFile(part)
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=["key", "image", "caption"])
            for data in table.column("image").to_pylist():
                rows += 1
                try:
                    ImageSample(data, max_pixels=d.max_pixels, max_file_bytes=d.max_file_bytes,
                                decode_side=side).decode()
                except DecodeError:
                    undecodable += 1
    seconds = time.perf_counter() - started
    return {"rows": rows, "seconds": round(seconds, 3), "undecodable": undecodable}


def time_pass(out: Path, cfg: dict[str, Any], use_ray: bool) -> dict[str, Any]:
    from captioners.recaption import caption_output
    from schemas.recaption import RecaptionConfig

    shutil.rmtree(out / cfg.get("output", {}).get("name", "captions"), ignore_errors=True)
    rc = RecaptionConfig.model_validate(cfg)
    started = time.perf_counter()
    summary = caption_output(out, rc, use_ray=use_ray)
    seconds = time.perf_counter() - started
    if summary.failed or summary.errors or summary.rows == 0:
        raise RuntimeError(f"caption pass ({'ray' if use_ray else 'in-process'}): {summary.to_dict()}")
    batches = summary.model_batches or {}
    merged = {stage: round(c["merged"] / c["batches"], 3) if c.get("batches") else None
              for stage, c in batches.items()}
    return {"rows": summary.rows, "parts": summary.parts_done, "seconds": round(seconds, 3),
            "model_batches": batches, "merged_fraction": merged}


def per_row(seconds: float, rows: int) -> dict[str, float]:
    return {"ms_per_row": round(1000 * seconds / rows, 2), "rows_per_s": round(rows / seconds, 1)}


def measure_pass(root: Path, cfg: dict[str, Any], rows: int, models: dict[str, Any]) -> dict[str, Any]:
    import ray

    out = curate_output(root, rows)
    side = cfg["captioner"]["image_side"]
    # three reads, the best kept: the first one also warms the page cache
    floor = min((time_floor(out, side) for _ in range(3)), key=lambda f: f["seconds"])
    inproc = time_pass(out, cfg, use_ray=False)
    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    ray_init_s = time.perf_counter() - t0
    try:
        on_ray = time_pass(out, cfg, use_ray=True)
        ray_again = time_pass(out, cfg, use_ray=True)  # Ray's worker processes up; the pools start anew
    finally:
        ray.shutdown()
    n = floor["rows"]
    floor_ms = 1000 * floor["seconds"] / n
    # The model time per row measured in one process: captioner at the config's batch, then CT2 int8.
    model_ms = models["caption"]["batch_8"]["ms_per_item"] + models["translate"]["ct2_int8"]["ms_per_item"]
    warm_load_s = models["load_s"]["captioner"] + models["load_s"]["ct2_int8"]
    cold_load_s = models["load_s"]["captioner_cold"] + models["load_s"]["ct2_int8"]
    result: dict[str, Any] = {"rows": n, "parts": inproc["parts"], "floor": {**floor, **per_row(floor["seconds"], n)},
                              "model_ms_per_row": round(model_ms, 2),
                              "model_load_s": {"in_process": round(warm_load_s, 3), "ray": round(cold_load_s, 3)},
                              "ray_init_s": round(ray_init_s, 2), "ray_cpus": RAY_CPUS}
    for name, p, load_s in (("in_process", inproc, warm_load_s), ("ray", on_ray, cold_load_s),
                            ("ray_again", ray_again, cold_load_s)):
        ms = 1000 * p["seconds"] / n
        result[name] = {**p, **per_row(p["seconds"], n),
                        "over_floor_ms_per_row": round(ms - floor_ms, 2),
                        # minus the models' own time and one load of each (Ray: once per actor, imports too)
                        "overhead_ms_per_row": round(ms - floor_ms - model_ms - 1000 * load_s / n, 2)}
    shutil.rmtree(root, ignore_errors=True)
    return result


# --- the section ------------------------------------------------------------------------------


def tiny_config(models: dict[str, Path]) -> dict[str, Any]:
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg = json.loads(json.dumps(cfg))
    cfg["captioner"] = {**cfg["captioner"], "path": str(models["qwen2-vl"]), "device": "cpu", "dtype": "float32"}
    cfg["translator"] = {**cfg["translator"], "path": str(models["marian-ct2"]), "device": "cpu",
                         "intra_threads": CT2_THREADS}
    return cfg


def build_models(root: Path) -> dict[str, Path]:
    from captioners.tiny import build_tiny_models
    from captioners.tiny_translators import write_tiny_ct2

    models = dict(build_tiny_models(root))
    f32 = root / "marian-ct2-float32"
    models["marian-ct2-float32"] = f32 if (f32 / "model.bin").exists() else write_tiny_ct2(models["marian"], f32,
                                                                                          "float32")
    return models


def measure(mode: str, root: Path) -> dict[str, Any]:
    quick = mode == "quick"
    started = time.perf_counter()
    t0 = time.perf_counter()
    models = build_models(root / "tiny-models")
    build_s = time.perf_counter() - t0
    cfg = tiny_config(models)
    import torch

    threads = torch.get_num_threads()
    # One torch thread, as in a Ray actor of one CPU (Ray sets OMP_NUM_THREADS to the actor's CPUs),
    # so (1), (b) and (c) run the captioner alike; on a shared 2-core machine two spinning OpenMP
    # threads also make the rates swing by 10x whenever other jobs take a core.
    torch.set_num_threads(1)
    try:
        with TreeSampler() as mem:
            model_figures = measure_models(models, cfg, min_s=0.5 if quick else 2.0, rounds=1 if quick else 2)
            pass_figures = measure_pass(root / "pass", cfg, 24 if quick else 96, model_figures)
    finally:
        torch.set_num_threads(threads)
    public = [{**f, "gpu_hours_per_10M_images": round(gpu_hours(f["s_per_image"]))} for f in PUBLIC_FIGURES]
    m = model_figures
    return {
        "caption_per_s_batch1": m["caption"]["batch_1"]["per_s"],
        "caption_per_s_batch8": m["caption"]["batch_8"]["per_s"],
        "translate_per_s_transformers": m["translate"]["transformers"]["per_s"],
        "translate_per_s_ct2_int8": m["translate"]["ct2_int8"]["per_s"],
        "translate_per_s_ct2_float32": m["translate"]["ct2_float32"]["per_s"],
        "ct2_int8_vs_transformers": m["ct2_int8_vs_transformers"],
        "ct2_float32_vs_transformers": m["ct2_float32_vs_transformers"],
        "captions": {"mode": mode, "models": model_figures, "pass": pass_figures, "public": public,
                     "public_not_found": PUBLIC_NOT_FOUND, "tiny_models_build_s": round(build_s, 1),
                     "other_cpu_s": round(mem.other_cpu_s, 1),
                     "wall_s": round(time.perf_counter() - started, 1)},
    }


def merged(r: dict[str, Any]) -> str:
    if not r["model_batches"]:
        return "n/a (no pools in-process: each row group is its own model batch)"
    return ", ".join(f"{stage} {c['merged']}/{c['batches']}" for stage, c in r["model_batches"].items())


def print_section(c: dict[str, Any]) -> None:
    m, p = c["models"], c["pass"]
    print(f"\ncaption pass ({c['mode']}; tiny random models, CPU, torch {m['torch_threads']} thread(s); "
          f"each rate timed >= {m['min_s']} s after a warm-up, best of {m['rounds']}; {c['wall_s']} s)")
    print(f"{'model':<34}{'items/s':>10}{'ms/item':>10}{'tokens/item':>13}{'tokens/s':>10}")
    rows = [(f"qwen2-vl caption, batch {b}", m["caption"][f"batch_{b}"]) for b in CAPTION_BATCHES]
    rows += [(f"marian translate {name}, batch {TRANSLATE_BATCH}", r) for name, r in m["translate"].items()]
    for name, r in rows:
        print(f"{name:<34}{r['per_s']:>10}{r['ms_per_item']:>10}{r['tokens_per_item']:>13}{r['tokens_per_s']:>10}")
    print(f"caption batch 8 / batch 1: {m['caption_batch8_vs_batch1']}; ct2 int8 / transformers: "
          f"{m['ct2_int8_vs_transformers']}; ct2 float32 / transformers: {m['ct2_float32_vs_transformers']}")
    print(f"load s: {m['load_s']}; CPU s taken by other processes meanwhile: {c['other_cpu_s']}"
          + ("  <- the machine was shared: figures are pessimistic and noisy" if c["other_cpu_s"] > 5 else ""))
    print(f"\npass over {p['rows']} rows in {p['parts']} parts (model time per row from above: "
          f"{p['model_ms_per_row']} ms; model loads, s: {p['model_load_s']})")
    print(f"{'run':<34}{'ms/row':>10}{'rows/s':>10}{'over floor':>12}{'overhead':>10}  merged batches")
    print(f"{'(a) read + decode (floor)':<34}{p['floor']['ms_per_row']:>10}{p['floor']['rows_per_s']:>10}")
    for label, key in (("(b) pass in-process", "in_process"), (f"(c) pass on Ray ({p['ray_cpus']} CPUs)", "ray"),
                       ("(c') again, same Ray runtime", "ray_again")):
        r = p[key]
        print(f"{label:<34}{r['ms_per_row']:>10}{r['rows_per_s']:>10}{r['over_floor_ms_per_row']:>12}"
              f"{r['overhead_ms_per_row']:>10}  {merged(r)}")
    print(f"(ray.init {p['ray_init_s']} s, not in (c); overhead = pass - floor - model time - one load of each "
          "model, warm in-process, cold with imports on Ray)")
    print(f"\npublic figures, to size a real run ({IMAGES_TO_SIZE:,} images, one GPU, one image at a time):")
    print(f"{'model':<22}{'GPU':<10}{'s/image':>9}{'GPU-h/10M':>11}  source")
    for f in c["public"]:
        print(f"{f['model']:<22}{f['gpu']:<10}{f['s_per_image']:>9}{f['gpu_hours_per_10M_images']:>11}  "
              f"{f['url']} ({f['note']})")
    print(c["public_not_found"])
