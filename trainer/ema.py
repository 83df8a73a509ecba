"""Exponential moving average of the UNet's weights, kept as a second UNet.

A module copy (rather than a list of shadow tensors) saves and loads like the UNet itself and is
exported as-is, so the released model can be the EMA one without any conversion step.
"""

from __future__ import annotations

import copy

import torch


class Ema(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * weights``, for every parameter (buffers are copied)."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)

    def state_dict(self, *args, **kwargs):  # the wrapped UNet's keys, so files match a plain UNet's
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state, strict=strict, assign=assign)
