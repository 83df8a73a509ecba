"""Aesthetic: the LAION improved-aesthetic-predictor (higher is better, roughly 1-10).

An MLP (768-1024-128-64-16-1) over the L2-normalised CLIP ViT-L/14 image embedding. The
published head (``sac+logos+ava1-l14-linearMSE.pth``) was trained on OpenAI's ViT-L/14,
which uses QuickGELU: hence the default ``ViT-L-14-quickgelu`` (plain ``ViT-L-14`` with
OpenAI weights loads without error but gives shifted embeddings and scores).

Nothing is downloaded: both weight files are local paths; ``clip_model`` is a built-in
open_clip name or a path to an open_clip model-config JSON (tiny test models), never a
``hf-hub:``/``local-dir:`` spec or a config with a Hugging Face text tower; the CLIP path
is made absolute so open_clip cannot take it for a pretrained tag (which it would fetch).
Weights load as tensors only (safetensors, or ``torch.load(weights_only=True)``).
Only the image tower is kept after loading: the text tower is ~0.5 GB of ViT-L/14 for nothing.
CPU threads default to ``cpus_per_actor`` (1): ViT-L/14 takes ~1.2 s/image on one core and
~0.7 s on two, so two 1-thread actors out-run one 2-thread actor, but leave no core to decode.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from tasks.signals.base import ModelParams, ModelSignal, Ranges, Sample

_MLP_SUFFIXES = (".safetensors", ".pth", ".pt")
_EMBED_DIM = 768  # the head's input: ViT-L/14's embedding


class AestheticParams(ModelParams):
    clip_model: str = Field("ViT-L-14-quickgelu", description="open_clip model name, or path to a config JSON")
    clip_weights: str | None = Field(None, description="local open_clip CLIP checkpoint")
    mlp_weights: str | None = Field(None, description="local aesthetic head: .safetensors, .pth or .pt")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: cpus_per_actor, at least 1")

    @field_validator("clip_model")
    @classmethod
    def _local_model(cls, v: str) -> str:
        if v.startswith(("hf-hub:", "local-dir:")):
            raise ValueError("clip_model must be a built-in open_clip name or a config JSON path (no hub)")
        return os.path.abspath(os.path.expanduser(v)) if v.endswith(".json") else v

    @field_validator("clip_weights", "mlp_weights")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # Absolute, so no open_clip tag lookup can match it and Ray actors see the driver's path.
        return None if v is None else os.path.abspath(os.path.expanduser(v))

    @field_validator("mlp_weights")
    @classmethod
    def _tensor_format(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(_MLP_SUFFIXES):
            raise ValueError(f"mlp_weights must end with one of {', '.join(_MLP_SUFFIXES)}")
        return v


_CONFIGS: dict[str, dict[str, Any]] = {}  # found configs only: a missing file may appear later


def model_config(clip_model: str) -> dict[str, Any] | None:
    """The open_clip config JSON, read without importing open_clip (torch) so it is cheap."""
    if clip_model in _CONFIGS:
        return _CONFIGS[clip_model]
    if clip_model.endswith(".json"):
        path = Path(clip_model)
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        name = clip_model.replace("/", "-")  # as open_clip does: ViT-L/14 -> ViT-L-14
        path = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{name}.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        return None
    _CONFIGS[clip_model] = cfg
    return cfg


def load_mlp(path: str) -> Any:
    """The head as an eval-mode ``nn.Sequential``; tensors only, never arbitrary pickles."""
    import torch
    from torch import nn

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("layers."): v for k, v in state.items()}
    mlp = nn.Sequential(  # the published layout: keys layers.{0,2,4,6,7}
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )
    mlp.load_state_dict(state, strict=True)
    return mlp.eval()


def _register_config(path: str) -> str:
    """Make a config JSON known to open_clip under its file stem, refusing to shadow another."""
    import open_clip

    name, cfg = Path(path).stem, model_config(path)
    known = open_clip.get_model_config(name)
    if known is not None and known != cfg:
        raise ValueError(f"aesthetic: config name {name!r} ({path}) clashes with another open_clip config")
    if known is None:
        open_clip.add_model_config(path)
    return name


class Aesthetic(ModelSignal):
    name = "aesthetic"
    cost = 300
    Params = AestheticParams
    fields = (pa.field("aesthetic", pa.float32()),)
    ranges: ClassVar[Ranges] = {"aesthetic": (None, None)}  # an unclamped linear head: "roughly 1-10" is no guarantee

    def pixel_side(self) -> int | None:
        cfg = model_config(self.params.clip_model)
        size = cfg["vision_cfg"].get("image_size", 224) if cfg else 224
        return int(max(size) if isinstance(size, list | tuple) else size)

    def unavailable(self) -> str | None:
        p = self.params
        problems = []
        if importlib.util.find_spec("open_clip") is None:
            problems.append("open_clip is not installed")
        elif model_config(p.clip_model) is None:
            problems.append(f"clip_model config not found: {p.clip_model}")
        for field in ("clip_weights", "mlp_weights"):
            path = getattr(p, field)
            if path is None:
                problems.append(f"{field} not set")
            elif not os.path.isfile(path):
                problems.append(f"{field} file not found: {path}")
        return "aesthetic: " + "; ".join(problems) if problems else None

    def model_files(self) -> list[Path]:
        p = self.params
        files = [Path(f) for f in (p.clip_weights, p.mlp_weights) if f]
        return files + ([Path(p.clip_model)] if p.clip_model.endswith(".json") else [])

    def setup(self) -> None:
        import open_clip
        import torch

        problem = self.unavailable()
        if problem:
            raise FileNotFoundError(problem)
        p = self.params
        cfg = model_config(p.clip_model)
        if "hf_model_name" in cfg["text_cfg"]:
            raise ValueError("aesthetic: configs with a Hugging Face text tower would fetch it; not supported")
        if cfg["embed_dim"] != _EMBED_DIM:
            raise ValueError(f"aesthetic: {p.clip_model} embeds to {cfg['embed_dim']}, the head needs 768")
        if p.device == "cpu":
            torch.set_num_threads(p.threads or max(1, int(p.cpus_per_actor)))
        name = _register_config(p.clip_model) if p.clip_model.endswith(".json") else p.clip_model
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=p.clip_weights, device=p.device, weights_only=True, require_pretrained=True
        )
        self._visual = model.visual.eval()  # the text tower is dropped with ``model``
        self._preprocess = preprocess
        self._mlp = load_mlp(p.mlp_weights).to(p.device)

    def prepare(self, sample: Sample) -> np.ndarray:
        return sample.image.pixel_array(self.pixel_side())

    def infer(self, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
        import torch
        import torch.nn.functional as F
        from PIL import Image

        out: list[dict[str, Any]] = []
        step = self.params.batch_size
        with torch.inference_mode():
            for start in range(0, len(inputs), step):
                chunk = inputs[start : start + step]
                x = torch.stack([self._preprocess(Image.fromarray(a)) for a in chunk]).to(self.params.device)
                emb = F.normalize(self._visual(x).float(), dim=-1)
                scores = self._mlp(emb).squeeze(-1).cpu().tolist()
                out.extend({"aesthetic": float(s)} for s in scores)
        return out


SIGNAL = Aesthetic
