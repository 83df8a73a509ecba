"""Build or load the four parts the loop trains with: UNet (trained), VAE and ChatGLM (frozen), tokenizer.

Everything reads local folders only (``local_files_only``): on a machine without the weights the
error names the folder that is missing, and nothing tries a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from trainer.config import ModelConfig
from trainer.export import load_pipeline
from trainer.schedules import Stage, scheduler_for_stage
from trainer.text_encoder import load_text_encoder
from trainer.tiny import build_tiny_kolors, kolors_unet_config

BASE_DIR = "base"  # under the run's out dir: the tiny preset's starting point, saved once


def load_components(cfg: ModelConfig, stage: Stage, out: Path, seed: int = 0,
                    frozen_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (the stage's training schedule).

    The tiny preset is built once into ``out/base`` and reloaded from there afterwards, so a resumed
    run continues with the very same frozen VAE and text encoder it started with."""
    if cfg.preset == "tiny":
        parts = _tiny(out / BASE_DIR, stage, seed)
    else:
        parts = _from_folder(Path(cfg.path or ""), cfg, frozen_dtype)
    parts["scheduler"] = scheduler_for_stage(stage)
    for frozen in (parts["vae"], parts["text_encoder"]):
        frozen.requires_grad_(False)
        frozen.eval()
    parts["unet"].train()
    return parts


def _tiny(base: Path, stage: Stage, seed: int) -> dict[str, Any]:
    if not (base / "model_index.json").is_file():
        tmp = base.with_name(base.name + ".tmp")
        build_tiny_kolors(tmp, stage=stage, seed=seed)
        tmp.replace(base)
    pipe = load_pipeline(base)
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}


def _from_folder(path: Path, cfg: ModelConfig, frozen_dtype: torch.dtype) -> dict[str, Any]:
    """A KolorsPipeline folder: ``unet/`` (unless the UNet starts random), ``vae/``, ``text_encoder/``,
    ``tokenizer/``."""
    needed = ["vae", "text_encoder", "tokenizer"] + (["unet"] if cfg.unet_init == "pretrained" else [])
    missing = [str(path / name) for name in needed if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.path {path} lacks {', '.join(missing)}: download the KolorsPipeline "
                                "folder (e.g. Kwai-Kolors/Kolors-diffusers) there beforehand")
    text_encoder, tokenizer = load_text_encoder(path, dtype=frozen_dtype, trust_remote_code=cfg.trust_remote_code,
                                                variant=cfg.variant)
    # fp32: SDXL's VAE overflows in fp16
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, variant=cfg.variant,
                                        torch_dtype=torch.float32)
    if cfg.unet_init == "pretrained":
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, variant=cfg.variant,
                                                    torch_dtype=torch.float32)
    else:
        hidden = text_encoder.config.hidden_size
        unet = UNet2DConditionModel.from_config(kolors_unet_config(hidden))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
