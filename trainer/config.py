"""The training config: one YAML file per run (one stage), validated before any model is built.

Stage defaults follow the Kolors recipe, and apply only where the file leaves a key out:

============  ===========================  ======================================
key           concept (stage 1)            quality (stage 2)
============  ===========================  ======================================
schedule      SDXL, 1000 steps             Kolors, 1100 steps, beta_end 0.014
resolution    512                          1024
bucketed      False (optional)             True
short side    any                          >= 1024
============  ===========================  ======================================

The ``tiny`` preset swaps the models for small random ones (built offline) and, unless the file
says otherwise, trains at 128 px with no short-side bar, so it runs on any shards on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.config import ConfigError, Strict, read_yaml_mapping
from trainer.data import DataConfig
from trainer.schedules import Stage

STAGE_DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "concept": {"resolution": 512, "bucketed": False},
    "quality": {"resolution": 1024, "bucketed": True, "min_short_side": 1024},
}
TINY_DATA_DEFAULTS: dict[str, Any] = {"resolution": 128, "min_short_side": None}


class ModelConfig(Strict):
    """Where the UNet, VAE and ChatGLM come from. ``path`` is a KolorsPipeline folder on local disk
    (``unet/ vae/ text_encoder/ tokenizer/``, e.g. Kwai-Kolors/Kolors-diffusers fetched beforehand);
    ``preset: tiny`` builds small random ones instead. Nothing is ever downloaded."""

    preset: Literal["tiny"] | None = None
    path: str | None = None
    # "pretrained" continues the UNet in ``path``; "random" starts a fresh Kolors-sized UNet
    # (its config from trainer.tiny.kolors_unet_config) beside the pretrained VAE and text encoder.
    unet_init: Literal["pretrained", "random"] = "pretrained"
    trust_remote_code: bool = False  # load text_encoder/ with the folder's own code (trusted folders only)
    # Weight files' variant: Kwai-Kolors/Kolors-diffusers ships only *.fp16.safetensors, so "fp16" there.
    # Weights are upcast to fp32 on load either way.
    variant: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("set exactly one of model.preset (tiny) and model.path (a local KolorsPipeline folder)")
        return self


class OptimConfig(Strict):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-2, ge=0)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")


class ScaleConfig(Strict):
    """One process by default; ``workers`` > 1 runs Ray Train's TorchTrainer (DDP) across them."""

    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    backend: Literal["gloo", "nccl"] | None = None  # None: nccl with GPUs, else gloo
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local runtime


class TrainConfig(Strict):
    stage: Stage = "concept"
    model: ModelConfig = ModelConfig(preset="tiny")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    scale: ScaleConfig = ScaleConfig()
    steps: int = Field(1000, ge=1, description="optimizer steps in total (a resumed run counts on)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on CUDA, none on CPU
    ema_decay: float | None = Field(None, gt=0, lt=1)
    min_snr_gamma: float | None = Field(5.0, gt=0)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    sample_prompts: list[str] = Field(default_factory=lambda: ["一只熊猫在竹林里吃竹子", "a red lantern at night"])
    sample_steps: int = Field(20, ge=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, raw: Any) -> Any:
        """Fill the data keys the file left out from the stage's (and the tiny preset's) defaults."""
        if not isinstance(raw, dict):
            return raw
        stage = raw.get("stage", "concept")
        model = raw.get("model") or {}
        tiny = (model.get("preset") if isinstance(model, dict) else getattr(model, "preset", None)) == "tiny"
        if "model" not in raw:
            tiny = True
        data = raw.get("data") or {}
        if isinstance(data, DataConfig):  # built in Python: only what was set counts as set
            data = data.model_dump(exclude_unset=True)
        if not isinstance(data, dict):
            return raw
        defaults = {**STAGE_DATA_DEFAULTS.get(stage, {}), **(TINY_DATA_DEFAULTS if tiny else {})}
        return {**raw, "data": {**defaults, **data}}


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The YAML file (or the defaults), with command-line ``overrides`` applied as nested keys
    (``{"stage": "quality", "model": {"preset": "tiny"}, "data": {"shards": [...]}}``) before the
    stage defaults, so a flag counts as if written in the file."""
    base = read_yaml_mapping(path) if path is not None else {}
    if overrides.get("model"):  # --preset tiny replaces the file's model (dry runs of a real config)
        base = {k: v for k, v in base.items() if k != "model"}
    merged = _deep_merge(base, overrides)
    try:
        return TrainConfig.model_validate(merged)
    except ValueError as exc:
        raise ConfigError(f"{path or 'train config'}: {exc}") from exc


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
