"""A tiny CogVLM-shaped model for tests: copied into a model folder as ``modeling_tinycogvlm.py`` and
loaded through transformers' remote-code path (a config opting in with ``trust_remote_code: true``),
like a real CogVLM folder.

It follows the interface of CogVLM / CogVLM2's own ``modeling_cogvlm.py`` (what
``captioners.cogvlm.CogVLMCaptioner`` relies on), not its architecture's size:

* ``model.build_conversation_input_ids(tokenizer, query=..., history=[], images=[image],
  template_version="chat")`` returns one row as a dict of 1-D ``input_ids``, ``token_type_ids``,
  ``attention_mask`` and ``images`` (a list with one ``(3, S, S)`` tensor). The row is
  ``[bos] + [pad] * vision_token_num + tokens("Question: {query} Answer:")`` with the vision positions
  marked ``VISION_TOKEN_TYPE`` in ``token_type_ids``; ``vision_token_num = (S // patch // 2) ** 2 + 2``
  (the 2x2 downsampling conv's grid plus begin/end-of-image), as in CogVLM2.
* ``model.generate(input_ids=..., token_type_ids=..., attention_mask=..., images=[[img], ...], ...)``:
  the image embedding replaces the embeddings at the vision positions of each row; rows may be left
  padded (positions come from the attention mask). The MLP is a "visual expert": vision positions use
  their own weights, as in CogVLM.

Everything is small and random: a patch conv, a 2x2 conv and a projection for vision, a pre-norm
transformer with learned positions for the LM, using transformers' ``Cache`` for generation.
This file runs only when a loader allows remote code (``trust_remote_code: true`` in the config):
it sets ``LOADED_MARKER`` in ``os.environ`` at import, so a test can tell whether it ran.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

LANGUAGE_TOKEN_TYPE = 0
VISION_TOKEN_TYPE = 1
LOADED_MARKER = "TINY_COGVLM_MODELING_LOADED"
os.environ[LOADED_MARKER] = "1"  # proof for tests that this file was executed

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class TinyCogVLMConfig(PretrainedConfig):
    model_type = "tiny_cogvlm"

    def __init__(self, vocab_size: int = 512, hidden_size: int = 32, intermediate_size: int = 64,
                 num_hidden_layers: int = 2, num_attention_heads: int = 4, max_position_embeddings: int = 512,
                 rms_norm_eps: float = 1e-6, initializer_range: float = 0.1, vision_config: dict | None = None,
                 template_version: str = "chat", **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.vision_config = {"image_size": 32, "patch_size": 4, "in_channels": 3, "hidden_size": 16,
                              **(vision_config or {})}
        self.template_version = template_version
        super().__init__(**kwargs)


def _history_to_prompt(template_version: str, history: list[tuple[str, str]], query: str) -> str:
    """CogVLM2's prompt templates: base is the query; chat and vqa are Question/Answer turns."""
    if template_version == "base":
        return query
    if template_version == "chat":
        answer = "Answer:"
    elif template_version == "vqa":
        answer = "Short answer:"
    else:
        raise ValueError(f"unknown template_version {template_version!r} (base, chat or vqa)")
    prompt = "".join(f"Question: {q} {answer} {r}\n" for q, r in history)
    return prompt + f"Question: {query} {answer}"


def _image_tensor(image, size: int) -> torch.Tensor:
    """Resize to size x size (bicubic) and CLIP-normalise, as CogVLM's torchvision transform does."""
    image = image.convert("RGB").resize((size, size), resample=3)
    t = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    t = t.permute(2, 0, 1).float() / 255.0
    return (t - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    """CogVLM's visual expert: vision positions go through their own MLP."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.language_mlp = MLP(hidden, inner)
        self.vision_mlp = MLP(hidden, inner)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        return torch.where(vision_mask[..., None], self.vision_mlp(x), self.language_mlp(x))


class Attention(nn.Module):
    def __init__(self, config: TinyCogVLMConfig, layer_idx: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        b, q_len, _ = x.shape
        q, k, v = self.qkv(x).view(b, q_len, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, q_len, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyCogVLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, mask, vision_mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x), vision_mask)


class TinyVision(nn.Module):
    """Patch conv -> 2x2 conv (CogVLM2's downsampling) -> projection, between learned boi/eoi."""

    def __init__(self, config: TinyCogVLMConfig):
        super().__init__()
        v = config.vision_config
        self.patch = nn.Conv2d(v["in_channels"], v["hidden_size"], kernel_size=v["patch_size"], stride=v["patch_size"])
        self.conv = nn.Conv2d(v["hidden_size"], v["hidden_size"], kernel_size=2, stride=2)
        self.linear_proj = nn.Linear(v["hidden_size"], config.hidden_size)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.gelu(self.patch(images)))  # (n, c, g, g)
        x = self.linear_proj(x.flatten(2).transpose(1, 2))
        n = x.shape[0]
        return torch.cat([self.boi.expand(n, -1, -1), x, self.eoi.expand(n, -1, -1)], dim=1)


class TinyCogVLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyCogVLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ("DecoderLayer",)

    def __init__(self, config: TinyCogVLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.vision = TinyVision(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, TinyVision):
            nn.init.normal_(module.boi, std=std)
            nn.init.normal_(module.eoi, std=std)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # -- CogVLM's documented interface ---------------------------------------------------------------

    def build_conversation_input_ids(self, tokenizer, *, query: str, history: list | None = None,
                                     images: list | None = None, template_version: str | None = None,
                                     answer: str | None = None) -> dict:
        v = self.config.vision_config
        template_version = template_version or self.config.template_version
        if images is not None and len(images) > 1:
            raise ValueError("not support multi images by now.")
        text = _history_to_prompt(template_version, history or [], query)
        input_ids = [tokenizer.bos_token_id]
        token_type_ids = [LANGUAGE_TOKEN_TYPE]
        tensors = []
        if images:
            tensors = [_image_tensor(images[0], v["image_size"])]
            n = (v["image_size"] // v["patch_size"] // 2) ** 2 + 2
            input_ids += [tokenizer.pad_token_id] * n
            token_type_ids += [VISION_TOKEN_TYPE] * n
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        if answer is not None:
            text_ids += [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        input_ids += text_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "token_type_ids": torch.tensor(token_type_ids, dtype=torch.long),
                "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
                "images": tensors}

    def forward(self, input_ids: torch.LongTensor | None = None, images: list | None = None,
                token_type_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, q_len, _ = inputs_embeds.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros((b, q_len), dtype=torch.long, device=inputs_embeds.device)
        vision_mask = token_type_ids == VISION_TOKEN_TYPE
        flat = [img for row in images for img in row] if images is not None else []
        if flat:
            feats = self.vision(torch.stack(flat).to(inputs_embeds.device, inputs_embeds.dtype))
            if feats.shape[0] * feats.shape[1] != int(vision_mask.sum()):
                raise ValueError(f"{int(vision_mask.sum())} vision positions for {feats.shape[0]} images of "
                                 f"{feats.shape[1]} tokens")
            inputs_embeds = inputs_embeds.masked_scatter(vision_mask[..., None], feats.reshape(-1, feats.shape[-1]))
        past = cache.get_seq_length() if cache is not None else 0
        total = past + q_len
        if attention_mask is None:
            attention_mask = torch.ones((b, total), dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:  # left padding: a row's first real token is position 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        x = inputs_embeds + self.embed_positions(position_ids)
        keys = attention_mask[:, None, None, :].bool()  # (b, 1, 1, total)
        causal = torch.ones((q_len, total), dtype=torch.bool, device=x.device).tril(past)
        mask = keys & causal
        # A padding query sees no key: let every query see itself so no row is all masked (NaN).
        diag = torch.zeros_like(causal)
        diag[torch.arange(q_len), torch.arange(past, total)] = True
        mask = mask | diag
        for layer in self.layers:
            x = layer(x, mask, vision_mask, cache if use_cache is not False else None)
        logits = self.lm_head(self.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def prepare_inputs_for_generation(self, input_ids, images=None, token_type_ids=None, cache=None, **kwargs):
        prefill = cache is None or cache.get_seq_length() == 0
        inputs = super().prepare_inputs_for_generation(input_ids, token_type_ids=token_type_ids, cache=cache,
                                                       **kwargs)
        inputs["images"] = images if prefill else None  # the image is in the cache after the prefill
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens)
        if token_type_ids is not None:  # generated tokens are language tokens
            new = token_type_ids.new_full((token_type_ids.shape[0], num_new_tokens), LANGUAGE_TOKEN_TYPE)
            model_kwargs["token_type_ids"] = torch.cat([token_type_ids, new], dim=-1)
        return model_kwargs
