"""What every transformers backend shares: device and dtype choice, load and generate arguments,
and turning generated ids into ``Generated`` (text, token count, cut off or not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from captioners.base import Captioner, CaptionerParams, Generated, GenerationParams


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda asked for, but torch sees no GPU")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU (CPU half is slow)."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_kwargs(params: GenerationParams, dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments: local files only, remote code only when the config says so."""
    return {"local_files_only": True, "trust_remote_code": params.trust_remote_code, "dtype": dtype}


def generate_kwargs(params: GenerationParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": params.do_sample,
                              "num_beams": params.num_beams, "repetition_penalty": params.repetition_penalty}
    if params.do_sample:
        kwargs |= {"temperature": params.temperature, "top_p": params.top_p}
    else:  # a checkpoint's generation_config may set sampling: greedy means greedy
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    return kwargs


def seed_for(params: GenerationParams) -> None:
    """Sampling draws from torch's generator: seed it per batch, so a rerun of a batch repeats it."""
    if params.do_sample:
        torch.manual_seed(params.seed)


def finish(tokenizer: Any, new_ids: torch.Tensor, eos_ids: Sequence[int], pad_id: int | None,
           max_new_tokens: int) -> list[Generated]:
    """Generated texts from the new tokens only (the prompt cut off): a row's length is up to its
    first end-of-sequence token; one with none within ``max_new_tokens`` was cut off."""
    out = []
    stops = set(eos_ids)
    for row in new_ids.tolist():
        n = next((i for i, t in enumerate(row) if t in stops), None)
        tokens = row if n is None else row[:n]
        if n is None and pad_id is not None and pad_id not in stops:
            while tokens and tokens[-1] == pad_id:
                tokens = tokens[:-1]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        out.append(Generated(text, len(tokens), n is None and len(row) >= max_new_tokens))
    return out


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends generation: the generation config's (an int or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


class TorchCaptioner(Captioner):
    """A captioner on a torch model: nothing is loaded until ``load``, which calls ``place`` first
    to take the device and dtype from the config."""

    def __init__(self, params: CaptionerParams):
        super().__init__(params)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def place(self) -> None:
        self.device = pick_device(self.params.device)
        self.dtype = pick_dtype(self.params.dtype, self.device)
