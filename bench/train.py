"""Issue 5's figures: the trainer's step time against a minimal diffusers-only loop, and how fast
the data loader feeds it, per core.

Both loops train the tiny preset (stage concept, ``RESOLUTION`` px, not bucketed, batch 4, one
torch thread) on the same shards: the first bench-corpus tar (real photo crops of 0.3-1.5 MP)
scored by the cheap signals with no rule, what ``t2i analyze`` writes minus its model signals.
Both read them through the same RowIndex, sampler and ``make_loader``, so data costs the same.
Rounds alternate the two loops (minimal first), each from the same freshly built tiny weights.

- ``train_step_s``: median wall time of one optimizer step of ``trainer.loop.train``, read from
  its train-log.jsonl (log_every=1, so ``seconds`` is one step, loading its batch included). The
  first ``WARMUP`` steps (lazy inits, first file opens, allocator growth) are dropped, and the
  final step too (the loop checkpoints and exports after it); checkpoint_every lies past the run.
  No EMA; full mode also times ours with EMA (``train_step_ema_s``) in the same rounds.
- ``minimal_step_s``: the same for a loop written the way diffusers' examples/text_to_image/
  train_text_to_image_sdxl.py writes its step, and nothing more: VAE encode (x scaling_factor),
  the prompts through ChatGLM (``encode_prompts``, where the example runs its CLIP encoders),
  noise and uniform timesteps from the global RNG, ``add_noise`` on the stage's DDPMScheduler, the
  UNet with ``added_cond_kwargs`` {text_embeds, time_ids}, plain MSE, backward, AdamW step,
  zero_grad, ``loss.item()``. Its weights are loaded from the ``base/`` folder our runs start from.
  Unlike the example it encodes on the fly rather than in a ``dataset.map`` beforehand, as our
  loop does, and it does not clip gradients (the example's ``--max_grad_norm`` does).
- ``train_step_ratio``: ours / minimal. The difference is our loop's extra work per step: min-SNR
  weights, gradient clipping, a seeded generator per batch, the sampler's bookkeeping, a log line.
- ``loader_samples_per_s_per_core``: ``loader_throughput`` at 512 px buckets, batch 4, no worker
  processes and one torch thread, so one core decodes, resizes and crops. Also at the step
  comparison's 64 px, the tiny preset's default 128 px and 1024 px; 512 and 1024 px give a rough
  count of the loader cores one GPU needs (the GPU rates are assumptions, not measured here).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
import transformers

from bench.corpus import REPO
from bench.memory import TreeSampler
from schemas.config import CurateConfig
from tasks.runner import run
from tasks.sources import SourceShard
from trainer.config import TINY_DATA_DEFAULTS, TrainConfig, load_train_config
from trainer.data import DataConfig, RowIndex, loader_throughput, make_loader, make_sampler
from trainer.export import load_pipeline
from trainer.loop import LOSS_LOG, train
from trainer.models import BASE_DIR, load_components
from trainer.schedules import scheduler_for_stage
from trainer.text_encoder import encode_prompts

TARGETS: dict[str, tuple[str, float]] = {"train_step_ratio": ("<=", 1.1)}
WORK = REPO / "bench-out" / "train"
WARMUP = 3  # steps dropped at the start of each loop
RESOLUTION = 64  # the tiny UNet's native side (8x8 latents); bucketed False
BATCH = 4
LOADER_SIDES = (512, 1024)  # plus ours and the tiny preset's default; bucketed, batch 4
# Not measured here: a rough figure for full SDXL training on one A100 (bf16, batch 4), per bucket
# side, used only to size the loader; 512 px is taken as ~4x the 1024 px rate (a quarter the pixels).
GPU_ASSUMPTION: dict[str, Any] = {"what": "SDXL UNet training, one A100, bf16, batch 4: samples/s by bucket side",
                                  "samples_per_s": {1024: (2.0, 3.0), 512: (8.0, 12.0)}, "measured": False}


def analyzed_shards(corpus: Path, shards: list[SourceShard], out: Path) -> Path:
    """The tars scored like ``t2i analyze`` but with the cheap signals only, no rule: every image
    kept, with the columns the trainer reads. (mode="analyze" would add every registered signal,
    OCR and BRISQUE included, ~0.3 s an image, which the loader never reads.)"""
    cfg = CurateConfig(signals={"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}}, rules={})
    summary = run(corpus, out, cfg, mode="curate", use_ray=False, shards=shards)
    if summary.failed or not summary.kept:
        raise RuntimeError(f"analyze of {len(shards)} tar(s) failed: {summary.failed}")
    return out


def step_config(shards: Path, steps: int, ema: bool) -> TrainConfig:
    """The tiny preset at ``RESOLUTION`` px; the checkpoint (and its one 1-step sample) only at the end."""
    return load_train_config(
        None, stage="concept", model={"preset": "tiny"}, steps=steps, log_every=1, checkpoint_every=10 * steps,
        data={"shards": [str(shards)], "resolution": RESOLUTION, "bucketed": False, "batch_size": BATCH},
        ema_decay=0.999 if ema else None, sample_steps=1, sample_prompts=["一只猫"])


def time_our_loop(cfg: TrainConfig, out: Path) -> list[float]:
    """Seconds of each measured step of ``trainer.loop.train``: warm-up and the final step left out."""
    train(cfg, out)
    lines = [json.loads(line) for line in (out / LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, cfg.steps + 1)), "log_every=1 logs every step"
    return [r["seconds"] for r in lines[WARMUP:-1]]


def time_minimal_loop(cfg: TrainConfig, base: Path, steps: int) -> list[float]:
    """Seconds of each measured step of the minimal loop (see the module docstring), timed like
    ours: from the end of one step to the end of the next, so loading the batch is included."""
    pipe = load_pipeline(base)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    noise_scheduler = scheduler_for_stage(cfg.stage)
    o = cfg.optim
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    index = RowIndex.build(cfg.data)
    sampler = make_sampler(index, cfg.data)
    torch.manual_seed(cfg.seed)
    ends = [time.perf_counter()]
    epoch = 0
    while len(ends) <= WARMUP + steps:
        sampler.set_epoch(epoch)
        for batch in make_loader(index, sampler, cfg.data):
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                prompt_embeds, pooled = encode_prompts(text_encoder, tokenizer, batch["prompts"])
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            added = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
            pred = unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss.item()  # the example sums it for its progress bar
            ends.append(time.perf_counter())
            if len(ends) > WARMUP + steps:
                break
        epoch += 1
    return [b - a for a, b in zip(ends[WARMUP:], ends[WARMUP + 1:], strict=False)]


def _summary(seconds: list[float], rounds: list[list[float]]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(seconds), 4), "min_s": round(min(seconds), 4),
            "max_s": round(max(seconds), 4), "steps": len(seconds),
            "round_medians_s": [round(statistics.median(r), 4) for r in rounds],
            "seconds": [round(s, 4) for s in seconds]}


def _cpu_per_wall(work: Callable[[], list[float]]) -> tuple[list[float], float]:
    """The work's result, and the CPU seconds of this process per wall second meanwhile (1.0: one thread)."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = work()
    return out, round((time.process_time() - cpu) / (time.perf_counter() - wall), 2)


def measure_steps(shards: Path, steps: int, rounds: int, with_ema: bool) -> dict[str, Any]:
    """``rounds`` x (minimal loop, ours, ours with EMA if asked), each from the same freshly built
    tiny weights; alternating spreads a drift in the machine's load over every side. Step times
    are pooled per side."""
    cfg = step_config(shards, WARMUP + steps + 1, ema=False)
    start = WORK / "start"
    load_components(cfg.model, cfg.stage, start, cfg.seed)  # builds start/base, what every run starts from

    def ours(run_cfg: TrainConfig) -> list[float]:
        out = WORK / "ours"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(start / BASE_DIR, out / BASE_DIR)
        try:
            return time_our_loop(run_cfg, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    sides: dict[str, Callable[[], list[float]]] = {
        "minimal": lambda: time_minimal_loop(cfg, start / BASE_DIR, steps),
        "ours": lambda: ours(cfg),
    }
    if with_ema:
        ema_cfg = step_config(shards, WARMUP + steps + 1, ema=True)
        sides["ours_ema"] = lambda: ours(ema_cfg)
    times: dict[str, list[list[float]]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, work in sides.items():
            seconds, ratio = _cpu_per_wall(work)
            times[name].append(seconds)
            cpu[name].append(ratio)
    return {name: {**_summary([s for r in runs for s in r], runs), "cpu_per_wall": cpu[name]}
            for name, runs in times.items()}


def measure_loader(shards: Path, batches: int) -> dict[int, float]:
    """Samples/s of ``loader_throughput`` on one core, per bucket base side."""
    rates = {}
    for side in sorted({RESOLUTION, TINY_DATA_DEFAULTS["resolution"], *LOADER_SIDES}):
        cfg = DataConfig(shards=[str(shards)], resolution=side, bucketed=True, batch_size=BATCH, num_workers=0)
        rates[side] = round(loader_throughput(RowIndex.build(cfg), cfg, batches), 1)
    return rates


def measure(corpus: Path, shards: list[SourceShard], mode: str, steps: int, rounds: int,
            loader_batches: int) -> dict[str, Any]:
    """Score the tar(s), time both loops and the loader on one torch thread, remove the outputs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for library in (diffusers, transformers):  # no progress bars or load notices between the tables
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    phases: dict[str, float] = {}
    shutil.rmtree(WORK, ignore_errors=True)
    try:
        with TreeSampler() as mem:
            tick = time.perf_counter()
            analyzed = analyzed_shards(corpus, shards, WORK / "analyzed")
            rows = len(RowIndex.build(DataConfig(shards=[str(analyzed)])))
            phases["shards"], tick = round(time.perf_counter() - tick, 2), time.perf_counter()
            step = measure_steps(analyzed, steps, rounds, with_ema=mode == "full")
            phases["steps"], tick = round(time.perf_counter() - tick, 2), time.perf_counter()
            loader = measure_loader(analyzed, loader_batches)
            phases["loader"] = round(time.perf_counter() - tick, 2)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(WORK, ignore_errors=True)  # the analyzed shards hold every image's bytes
    ours, minimal = step["ours"]["median_s"], step["minimal"]["median_s"]
    headline = {
        "train_step_s": ours,
        "minimal_step_s": minimal,
        "train_step_ratio": round(ours / minimal, 3),
        # None when not measured (quick), so a merged bench-results.json keeps no stale figure.
        "train_step_ema_s": step["ours_ema"]["median_s"] if "ours_ema" in step else None,
        "loader_samples_per_s_per_core": loader[512],
    }
    return {**headline, "train": {
        "mode": mode,
        "setup": {"preset": "tiny", "stage": "concept", "resolution": RESOLUTION, "bucketed": False,
                  "batch_size": BATCH, "torch_threads": 1, "mixed_precision": "none (CPU)", "rows": rows,
                  "tars": [s.shard_id for s in shards], "rounds": rounds, "measured_steps_per_round": steps,
                  "warmup_steps_dropped": WARMUP, "final_step_dropped": True},
        "steps": step,
        "loader": {"samples_per_s_per_core": {str(k): v for k, v in loader.items()}, "batches": loader_batches,
                   "batch_size": BATCH, "bucketed": True, "num_workers": 0, "torch_threads": 1},
        "gpu_feed": gpu_feed(loader),
        "phase_s": phases,
        "other_cpu_s": round(mem.other_cpu_s, 2),
        "wall_s": round(mem.seconds, 1),
    }}


def gpu_feed(loader: dict[int, float]) -> dict[str, Any]:
    """Loader cores one GPU would need at each side, from an assumed (not measured) GPU rate."""
    rates: dict[int, tuple[float, float]] = GPU_ASSUMPTION["samples_per_s"]
    cores = {side: (round(lo / loader[side], 3), round(hi / loader[side], 3)) for side, (lo, hi) in rates.items()}
    parts = [f"{side} px: {lo:g}-{hi:g} samples/s -> {cores[side][0]}-{cores[side][1]} cores "
             f"({loader[side]} samples/s per core here)" for side, (lo, hi) in rates.items()]
    return {
        "assumption": {**GPU_ASSUMPTION, "samples_per_s": {str(k): v for k, v in rates.items()}},
        "loader_cores_per_gpu": {str(k): v for k, v in cores.items()},
        "note": ("NOT MEASURED, assumed GPU rates (SDXL on one A100, bf16, batch 4): " + "; ".join(parts)
                 + f". At most {max(hi for _, hi in cores.values())} cores per GPU on these 0.3-1.5 MP JPEGs; "
                 "larger sources (stage 2: short side >= 1024) decode slower."),
    }


def print_section(t: dict[str, Any]) -> None:
    """Both loops' step times side by side, the loader per core, and what it means for a GPU."""
    s, setup = t["steps"], t["setup"]
    print(f"\ntrainer step ({t['mode']}, tiny preset {setup['resolution']} px, batch {setup['batch_size']}, not "
          f"bucketed, 1 torch thread, {setup['rows']} rows; {setup['rounds']} round(s) of "
          f"{setup['measured_steps_per_round']} steps per loop after {setup['warmup_steps_dropped']} warm-up; "
          f"{t['wall_s']} s: {t['phase_s']})")
    print(f"{'loop':<22}{'median s':>10}{'min s':>10}{'max s':>10}  {'per round':<22}cpu/wall")
    for name, label in (("ours", "ours (trainer.loop)"), ("minimal", "minimal diffusers"), ("ours_ema", "ours + EMA")):
        if name in s:
            r = s[name]
            rounds = " ".join(map(str, r["round_medians_s"]))
            print(f"{label:<22}{r['median_s']:>10}{r['min_s']:>10}{r['max_s']:>10}  {rounds:<22}"
                  f"{' '.join(map(str, r.get('cpu_per_wall', [])))}")
    rates = ", ".join(f"{side} px {rate}" for side, rate in t["loader"]["samples_per_s_per_core"].items())
    print(f"loader samples/s per core (bucketed, batch {t['loader']['batch_size']}, 0 workers): {rates}")
    print(f"gpu feed: {t['gpu_feed']['note']}")
    if t["other_cpu_s"] > 2:
        print(f"  <- {t['other_cpu_s']} CPU s taken by other processes meanwhile: figures are noisy")
