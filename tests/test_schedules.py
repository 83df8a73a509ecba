"""The two stage schedules match the figures in ANCHORS.md (Kolors report: 1000 -> 1100 steps, same alpha-bar shape)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.schedules import alpha_bars, kolors_scheduler, scheduler_for_stage, sdxl_scheduler, snr

torch.set_num_threads(1)


def test_configs() -> None:
    sdxl, kolors = sdxl_scheduler().config, kolors_scheduler().config
    assert (sdxl.num_train_timesteps, sdxl.beta_start, sdxl.beta_end) == (1000, 0.00085, 0.012)
    assert (kolors.num_train_timesteps, kolors.beta_start, kolors.beta_end) == (1100, 0.00085, 0.014)
    for c in (sdxl, kolors):
        assert c.beta_schedule == "scaled_linear"
        assert c.prediction_type == "epsilon"
        assert not c.rescale_betas_zero_snr
        assert not c.clip_sample


def test_stage_mapping() -> None:
    assert scheduler_for_stage("concept").config.num_train_timesteps == 1000
    assert scheduler_for_stage("quality").config.num_train_timesteps == 1100
    with pytest.raises(ValueError, match="stage"):
        scheduler_for_stage("pretrain")  # type: ignore[arg-type]


def test_alpha_bar_ratio_matches_anchors() -> None:
    a, b = alpha_bars(sdxl_scheduler()), alpha_bars(kolors_scheduler())
    assert a.shape == (1000,) and b.shape == (1100,)
    expected = {100: 1.000, 250: 0.998, 500: 0.991, 750: 0.974, 999: 0.946}
    for t, ratio in expected.items():
        assert b[t] / a[t] == pytest.approx(ratio, abs=0.002), t
    # Same shape over the shared range: within ~5.5%, and Kolors always a little noisier.
    ratio = b[:1000] / a
    assert np.all(ratio <= 1.0) and ratio.min() > 1 - 0.055


def test_terminal_snr_drops_about_4x() -> None:
    a, b = alpha_bars(sdxl_scheduler()), alpha_bars(kolors_scheduler())
    assert a[-1] == pytest.approx(0.00466, abs=1e-5)
    assert b[-1] == pytest.approx(0.00118, abs=1e-5)
    drop = snr(sdxl_scheduler())[-1] / snr(kolors_scheduler())[-1]
    assert 3.8 < drop < 4.1
