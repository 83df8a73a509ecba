"""Tiny, random, local stand-ins for the aesthetic signal's weights, so tests run offline in seconds.

The CLIP is a 2-layer ViT at 64 px with a 768-d embedding (the real head's input size), built
from a custom open_clip config JSON; the head has the real LAION architecture and key names.
Scores are meaningless; only the plumbing (config, loading, preprocessing, batching) is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


def _seeded(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def write_tiny_clip(directory: Path, name: str = "t2i-tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """Write ``<name>.json`` (open_clip config) and ``<name>.safetensors`` (random weights); return both paths."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    _seeded(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    weights = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


def aesthetic_head_state(seed: int = 0) -> dict[str, Any]:
    """A random head with the published key names (layers.{0,2,4,6,7}.{weight,bias})."""
    import torch
    from torch import nn

    _seeded(seed)
    layers = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )
    with torch.no_grad():  # default init gives near-constant outputs; spread them so images differ
        for p in layers.parameters():
            p.mul_(3.0)
    return {f"layers.{k}": v.contiguous() for k, v in layers.state_dict().items()}


def write_aesthetic_head(path: Path, seed: int = 0) -> Path:
    """Save a random head to ``path``: safetensors, or a plain tensor dict for .pth/.pt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = aesthetic_head_state(seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        import torch

        torch.save(state, path)
    return path


def tiny_aesthetic_params(directory: Path, **overrides: Any) -> dict[str, Any]:
    """The ``signals: aesthetic:`` parameters for a tiny model written into ``directory``."""
    config, weights = write_tiny_clip(directory)
    head = write_aesthetic_head(directory / "aesthetic_head.safetensors")
    params: dict[str, Any] = {"clip_model": str(config), "clip_weights": str(weights), "mlp_weights": str(head)}
    return params | overrides
