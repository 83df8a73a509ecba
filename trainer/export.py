"""Write and read the trained model as a diffusers ``KolorsPipeline`` folder, the format Kolors ships in.

One folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``) that
``KolorsPipeline.from_pretrained`` loads offline, so exports can be sampled and shared without this repo.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, KolorsPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer


def save_pipeline(
    out_dir: str | Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: ChatGLMModel,
    tokenizer: ChatGLMTokenizer,
    scheduler: SchedulerMixin,
) -> Path:
    """Save the components as a KolorsPipeline folder (safetensors) and return its path.

    ``force_zeros_for_empty_prompt`` is saved False: with True, diffusers 0.42.1 crashes under guidance when no
    negative prompt is given; False encodes "" as the negative prompt, which is also what we train the
    unconditional branch on (caption dropout to "")."""
    pipe = KolorsPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def load_pipeline(directory: str | Path, **kwargs) -> KolorsPipeline:
    """Load a saved KolorsPipeline folder, offline only. ``kwargs`` go to ``from_pretrained`` (e.g. torch_dtype)."""
    directory = Path(directory)
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(f"no KolorsPipeline (model_index.json) in {directory}")
    return KolorsPipeline.from_pretrained(directory, local_files_only=True, **kwargs)
