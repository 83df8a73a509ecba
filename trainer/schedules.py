"""Noise schedules for the two Kolors training stages.

Kolors trains stage 1 (concept learning) on SDXL's schedule and stage 2 (quality, high resolution) on a
schedule stretched from 1000 to 1100 steps with beta_end 0.012 -> 0.014, so the last step is almost pure
noise (terminal alpha-bar 0.00118 vs 0.00466) while alpha-bar keeps its shape over the first 1000 steps.
Both are epsilon-prediction, scaled_linear, with no zero-terminal-SNR rescale (see /work/shared/ANCHORS.md).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from diffusers import DDPMScheduler

Stage = Literal["concept", "quality"]

# Shared by both stages; clip_sample must be off for latents (DDPM's default clips x0 to [-1, 1]).
_COMMON = {
    "beta_start": 0.00085,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def sdxl_scheduler() -> DDPMScheduler:
    """SDXL's training schedule: 1000 steps, beta 0.00085..0.012 (Kolors stage 1)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_end=0.012, **_COMMON)


def kolors_scheduler() -> DDPMScheduler:
    """Kolors' stage-2 schedule: 1100 steps, beta 0.00085..0.014, so the terminal SNR is ~4x lower."""
    return DDPMScheduler(num_train_timesteps=1100, beta_end=0.014, **_COMMON)


def scheduler_for_stage(stage: Stage) -> DDPMScheduler:
    """'concept' -> SDXL's schedule, 'quality' -> Kolors' 1100-step schedule."""
    if stage == "concept":
        return sdxl_scheduler()
    if stage == "quality":
        return kolors_scheduler()
    raise ValueError(f"unknown stage {stage!r}; expected 'concept' or 'quality'")


def alpha_bars(scheduler: DDPMScheduler) -> np.ndarray:
    """Cumulative product of alphas (alpha-bar_t, float64, one per training timestep)."""
    return scheduler.alphas_cumprod.double().numpy()


def snr(scheduler: DDPMScheduler) -> np.ndarray:
    """Signal-to-noise ratio alpha-bar / (1 - alpha-bar) per training timestep (for SNR-weighted losses)."""
    ab = alpha_bars(scheduler)
    return ab / (1.0 - ab)
