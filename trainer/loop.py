"""The training loop: one readable function, in the manner of diffusers' SDXL training example.

Per micro-batch: VAE-encode the pixels (frozen), encode the prompts with ChatGLM (frozen, the
penultimate hidden state and the last-token pooled vector, as KolorsPipeline does), noise the
latents at a random timestep of the stage's schedule, predict the noise with the UNet conditioned
on text and SDXL's six micro-conditioning numbers, and take the (min-SNR weighted) MSE. Every
``grad_accum`` micro-batches: clip, AdamW step, EMA update, and the sampler records the data
position, so a checkpoint says exactly where the data stream stands.

Resuming is exact: the data order is a pure function of (seed, epoch, position) (see
trainer/buckets_sampler.py) and the noise and timesteps of a micro-batch are drawn from a
generator seeded by (seed, epoch, position, rank), so a run killed after checkpoint N and resumed
computes the same steps N+1, N+2, ... as a run that was never stopped.

Under DDP (Ray Train sets up the process group) every rank reads its own block of batches, rank 0
alone writes logs, checkpoints, samples and the export.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, KolorsPipeline
from diffusers.training_utils import compute_snr

from trainer.caption_mix import caption_mix, check_caption_set, report_caption_mix
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import RowIndex, make_loader, make_sampler
from trainer.ema import Ema
from trainer.export import save_pipeline
from trainer.models import load_components
from trainer.text_encoder import encode_prompts

log = logging.getLogger(__name__)
LOSS_LOG = "train-log.jsonl"
RESULT_FILE = "train-result.json"
MODEL_DIR = "model"


@dataclass
class TrainResult:
    steps: int
    resumed_from: int
    loss: float | None
    seconds: float
    model_dir: str | None
    log_path: str
    captions: dict[str, Any] | None = None  # the caption mix the run trained on (trainer/caption_mix.py)


@dataclass
class Conditioning:
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    time_ids: torch.Tensor


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pick_device(cfg: TrainConfig) -> torch.device:
    if not cfg.scale.use_gpu or not torch.cuda.is_available():
        return torch.device("cpu")
    try:  # under Ray Train each worker has its own GPU
        from ray.train.torch import get_device

        return get_device()
    except Exception:
        return torch.device("cuda")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 where the GPU has it, else fp16 on CUDA, full precision on CPU (slow there)."""
    if cfg.mixed_precision == "no" or (cfg.mixed_precision == "auto" and device.type != "cuda"):
        return None
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16


def batch_generator(seed: int, epoch: int, position: int, rank: int, device: torch.device) -> torch.Generator:
    """The noise of one micro-batch depends on where it is in the data, not on how the run got there."""
    state = int(np.random.SeedSequence([seed, epoch, position, rank]).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator(device=device).manual_seed(state)


def diffusion_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, cond: Conditioning,
                   generator: torch.Generator, min_snr_gamma: float | None,
                   amp: torch.dtype | None) -> torch.Tensor:
    """Epsilon-prediction loss at uniformly drawn timesteps, min-SNR-gamma weighted when set."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    with torch.autocast(latents.device.type, dtype=amp, enabled=amp is not None):
        pred = unet(noisy, timesteps, cond.prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
    per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma) / snr  # epsilon target: min(snr, gamma) / snr
    return (per_sample * weights).mean()


@torch.no_grad()
def encode_batch(batch: dict[str, Any], parts: dict[str, Any], device: torch.device,
                 generator: torch.Generator) -> tuple[torch.Tensor, Conditioning]:
    """Latents (scaled) and the text + micro-conditioning for one loader batch; both models frozen."""
    vae = parts["vae"]
    pixels = batch["pixel_values"].to(device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    embeds, pooled = encode_prompts(parts["text_encoder"], parts["tokenizer"], batch["prompts"], device=device)
    time_ids = batch["time_ids"].to(device, dtype=torch.float32)  # sizes up to 16M are exact in fp32
    return latents.float(), Conditioning(embeds.float(), pooled.float(), time_ids)


def _step_of(line: str) -> float:
    """The step of a log line; a line torn by a kill (only ever the last) counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class LossLog:
    """``train-log.jsonl``: one line per logged step. A resumed run first drops lines past its
    checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if _step_of(ln) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, out: str | Path) -> TrainResult:
    """Train ``cfg.steps`` optimizer steps in total (resuming from ``out/checkpoints`` if there are
    any), then export a KolorsPipeline folder to ``out/model``."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_and_world()
    device = pick_device(cfg)
    amp = autocast_dtype(cfg, device)
    torch.manual_seed(cfg.seed)

    # The data first: a selection or caption set that cannot work fails before any model loads.
    index = RowIndex.build(cfg.data)
    sets = check_caption_set(index.files, cfg.data.caption)
    mix = caption_mix(index, cfg.data.caption, sets) if rank == 0 else None
    if mix is not None:
        report_caption_mix(mix)
    sampler = make_sampler(index, cfg.data, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise ValueError(f"{len(index)} selected rows make no full batch of {cfg.data.batch_size} in any bucket "
                         f"on {world} rank(s): lower data.batch_size or widen the selection")

    # Every part stays fp32 (autocast runs the UNet in bf16/fp16): one dtype for sampling and for the
    # export, which then loads and samples without torch_dtype. ChatGLM3-6B takes 24 GB so.
    if rank == 0:  # the tiny preset is built once, by rank 0, before the others load it
        parts = load_components(cfg.model, cfg.stage, out, cfg.seed)
    if world > 1:
        dist.barrier()
    if rank != 0:
        parts = load_components(cfg.model, cfg.stage, out, cfg.seed)
    unet, scheduler = parts["unet"].to(device), parts["scheduler"]
    parts["vae"].to(device)
    parts["text_encoder"].to(device)
    ema = Ema(unet, cfg.ema_decay) if cfg.ema_decay and rank == 0 else None  # only rank 0 saves/exports it
    o = cfg.optim
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    step = resumed_from = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state = load_checkpoint(ckpt, unet, optimizer, ema, scaler)
        if state.get("stage", cfg.stage) != cfg.stage:
            raise ValueError(f"{ckpt.path} was trained as stage {state['stage']!r}, the config says {cfg.stage!r}: "
                             "a stage continues in its own folder (start the next stage from the exported model)")
        for group in optimizer.param_groups:  # the config's hyperparameters, not the checkpoint's
            group.update(lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        sampler.load_state_dict(state["sampler"])
        step = resumed_from = state["step"]
        log.info("resumed from %s", ckpt.path)
    loss_log = LossLog(out / LOSS_LOG, step, enabled=rank == 0)
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet

    last_loss: float | None = None
    window: list[float] = []
    micro = 0
    tick = time.perf_counter()
    epoch = sampler.epoch
    while step < cfg.steps:
        sampler.set_epoch(epoch)
        resumed_mid_epoch = sampler.position > 0  # a resume right at an epoch's end delivers nothing: fine
        delivered = 0
        for batch in make_loader(index, sampler, cfg.data):
            delivered += 1
            g = batch_generator(cfg.seed, int(batch["epoch"]), int(batch["position"]), rank, device)
            latents, cond = encode_batch(batch, parts, device, g)
            sync = (micro + 1) % o.grad_accum == 0
            no_sync = model.no_sync() if world > 1 and not sync else contextlib.nullcontext()
            with no_sync:
                loss = diffusion_loss(model, scheduler, latents, cond, g, cfg.min_snr_gamma, amp)
                scaler.scale(loss / o.grad_accum).backward()
            window.append(loss.item())
            micro += 1
            if not sync:
                continue
            if o.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(unet.parameters(), o.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(unet)
            sampler.record(batch)
            step += 1
            last_loss = _mean_across_ranks(float(np.mean(window)), world, device)
            window.clear()
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                loss_log.write({"step": step, "loss": last_loss, "epoch": int(batch["epoch"]),
                                "seconds": round(now - tick, 4), "lr": optimizer.param_groups[0]["lr"],
                                "world_size": world})
                tick = now
            if rank == 0 and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                _checkpoint(cfg, out, step, unet, optimizer, sampler, ema, scaler, parts)
            if step >= cfg.steps:
                break
        if delivered == 0 and not resumed_mid_epoch and step < cfg.steps:
            raise RuntimeError(f"epoch {epoch} delivered no batch: the data loader is empty")
        epoch += 1

    model_dir = None
    if rank == 0:
        model_dir = str(export_model(out, ema.model if ema is not None else unet, parts))
    result = TrainResult(step, resumed_from, last_loss, round(time.perf_counter() - started, 2), model_dir,
                         str(out / LOSS_LOG), asdict(mix) if mix is not None else None)
    if rank == 0:
        tmp = out / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(result), indent=1))
        tmp.replace(out / RESULT_FILE)
    if world > 1:
        dist.barrier()
    return result


def _mean_across_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def _checkpoint(cfg: TrainConfig, out: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                sampler: Any, ema: Ema | None, scaler: torch.amp.GradScaler, parts: dict[str, Any]) -> None:
    path = save_checkpoint(out, step, unet, optimizer, {"sampler": sampler.state_dict(), "stage": cfg.stage},
                           ema=ema, scaler=scaler, keep=cfg.keep_checkpoints)
    write_samples(path / "samples", ema.model if ema is not None else unet, parts, cfg)


def sampling_pipeline(unet: torch.nn.Module, parts: dict[str, Any]) -> KolorsPipeline:
    """A KolorsPipeline around the current weights, with Euler on the stage's schedule (what Kolors ships)."""
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    return KolorsPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                          unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False)


@torch.no_grad()
def write_samples(folder: Path, unet: torch.nn.Module, parts: dict[str, Any], cfg: TrainConfig) -> list[Path]:
    """One PNG per ``sample_prompts`` entry, fixed seeds, so checkpoints can be compared by eye."""
    was_training = unet.training
    unet.eval()
    pipe = sampling_pipeline(unet, parts)
    pipe.set_progress_bar_config(disable=True)
    folder.mkdir(parents=True, exist_ok=True)
    side = cfg.data.resolution
    paths = []
    for i, prompt in enumerate(cfg.sample_prompts):
        g = torch.Generator(device=unet.device).manual_seed(cfg.seed + i)
        image = pipe(prompt, height=side, width=side, num_inference_steps=cfg.sample_steps, generator=g,
                     guidance_scale=5.0).images[0]
        paths.append(folder / f"{i:02d}.png")
        image.save(paths[-1])
    unet.train(was_training)
    return paths


def export_model(out: Path, unet: torch.nn.Module, parts: dict[str, Any]) -> Path:
    """``out/model``: a KolorsPipeline folder, written beside and renamed into place."""
    final, tmp = out / MODEL_DIR, out / f".{MODEL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = EulerDiscreteScheduler.from_config(parts["scheduler"].config)
    save_pipeline(tmp, unet=unet, vae=parts["vae"], text_encoder=parts["text_encoder"],
                  tokenizer=parts["tokenizer"], scheduler=scheduler)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    return final

