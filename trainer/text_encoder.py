"""Kolors' text condition: ChatGLM3's penultimate hidden state as the sequence, its last token as the pooled vector.

This mirrors ``KolorsPipeline.encode_prompt`` in diffusers (the reference for inference), so what the UNet is
trained on is exactly what it is sampled with: left-padded to ``max_length`` (256) tokens after the
``[gMASK] sop`` prefix, sequence = ``hidden_states[-2]`` made batch-first, pooled = ``hidden_states[-1]`` at the
last position (the last real token, since ChatGLM pads on the left).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer


@torch.no_grad()
def encode_prompts(
    text_encoder: ChatGLMModel,
    tokenizer: ChatGLMTokenizer,
    prompts: str | Sequence[str],
    max_length: int = 256,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(prompt_embeds [B, max_length, H], pooled [B, H])`` for the prompts, as KolorsPipeline computes them.

    Runs without gradients: Kolors keeps the text encoder frozen. ``device`` defaults to the encoder's device;
    the outputs are in the encoder's dtype. An empty prompt "" is the unconditional (caption-dropout) condition.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = torch.device(device) if device is not None else text_encoder.device
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt").to(device)
    output = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          position_ids=inputs["position_ids"], output_hidden_states=True)
    prompt_embeds = output.hidden_states[-2].permute(1, 0, 2).clone()  # [L, B, H] -> [B, L, H]
    pooled = output.hidden_states[-1][-1, :, :].clone()  # last position of the last layer: [B, H]
    return prompt_embeds, pooled


def _component_dirs(path: Path) -> tuple[Path, Path]:
    """A pipeline folder has text_encoder/ and tokenizer/; otherwise both are expected in ``path`` itself."""
    if (path / "text_encoder").is_dir():
        return path / "text_encoder", path / "tokenizer"
    return path, path


def load_text_encoder(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    variant: str | None = None,
) -> tuple[ChatGLMModel, ChatGLMTokenizer]:
    """Load ``(text_encoder, tokenizer)`` from a local folder, offline, frozen and in eval mode.

    ``path`` is a KolorsPipeline folder (e.g. Kwai-Kolors/Kolors-diffusers downloaded beforehand, with
    ``text_encoder/`` and ``tokenizer/``) or one folder holding both. By default diffusers' own ChatGLMModel and
    ChatGLMTokenizer classes are used, so no code from the folder runs; setting ``trust_remote_code`` opts in to the
    folder's ``modeling_chatglm.py`` through transformers' Auto classes instead (only for folders you trust).
    Raises FileNotFoundError naming the path when it is missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {path}")
    te_dir, tok_dir = _component_dirs(path)
    for d in (te_dir, tok_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"text encoder folder not found: {d}")
    if trust_remote_code:
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(te_dir, dtype=dtype, local_files_only=True, variant=variant,
                                          trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True, trust_remote_code=trust_remote_code)
    else:
        model = ChatGLMModel.from_pretrained(te_dir, dtype=dtype, local_files_only=True, variant=variant)
        tokenizer = ChatGLMTokenizer.from_pretrained(tok_dir, local_files_only=True)
    model.requires_grad_(False)
    return model.eval(), tokenizer
