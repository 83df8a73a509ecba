"""Checkpoints that a kill cannot half-write, and the latest one to resume from.

A checkpoint is a folder ``checkpoints/step-000500/`` written as ``.tmp-step-000500/`` and renamed
when complete, so a folder with the final name is always whole. It holds the UNet weights
(safetensors), the EMA weights, the optimizer and grad-scaler states (torch tensors, read back with
``weights_only=True``: no pickle runs on load), and ``state.json``: the step, the sampler's data
position and the loss of the last logged steps.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state.json").read_text())


def _name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(out: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], ema: torch.nn.Module | None = None,
                    scaler: torch.amp.GradScaler | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / _name(step)
    tmp = root / f".tmp-{_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(unet.state_dict()), tmp / "unet.safetensors")
    if ema is not None:
        save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of the same step from a run that was killed later
    tmp.replace(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def list_checkpoints(out: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (half-written ``.tmp-*`` folders are not listed)."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [Checkpoint(p, int(m.group(1))) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(out: Path) -> Checkpoint | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_checkpoint(ckpt: Checkpoint, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ema: torch.nn.Module | None = None, scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """Restore the weights and optimizer state in place; return ``state.json``. Tensors load on the CPU
    first (every DDP rank would otherwise put its copy on the GPU it was saved from) and the optimizer
    moves them to its parameters' device."""
    unet.load_state_dict(load_file(ckpt.path / "unet.safetensors"))
    if ema is not None:
        ema_file = ckpt.path / "ema.safetensors"
        if not ema_file.is_file():
            raise FileNotFoundError(f"{ckpt.path} has no EMA weights, but ema_decay is set: resume with the "
                                    "config the run started with")
        ema.load_state_dict(load_file(ema_file))
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scaler is not None and (ckpt.path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ckpt.path / "scaler.pt", weights_only=True, map_location="cpu"))
    return ckpt.state
