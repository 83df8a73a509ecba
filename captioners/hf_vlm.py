"""Captioners for VLMs that transformers supports natively (no remote code), backend ``transformers``.

One path for every chat VLM with an ``AutoModelForImageTextToText`` class and an ``AutoProcessor``
with a chat template: tested with Qwen2-VL and SmolVLM (Idefics3); Qwen2.5-VL and GLM-4V
(``Glm4vForConditionalGeneration``, in the installed transformers) take the same path, untested
here. Each request becomes one user message (the image, then the prompt with the OCR hint), rendered with the
processor's chat template (``add_generation_prompt=True``); the batch is tokenized with LEFT padding
so every row's new tokens start at the same column, generated greedily unless the config samples,
and only the new tokens are decoded.

Per-architecture knobs are ``Params`` fields: ``min_pixels``/``max_pixels`` bound the image size
for Qwen2-VL, Qwen2.5-VL and GLM-4V processors (their ``size.shortest_edge``/``longest_edge``,
in pixels); a processor without those keys refuses them at load.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from pydantic import Field

from captioners import torch_utils
from captioners.base import CaptionerParams, CaptionRequest, Generated, require_folder
from schemas.config import ConfigError

log = logging.getLogger(__name__)


class ChatVLMParams(CaptionerParams):
    system_prompt: str | None = Field(None, description="a system message before the user turn (none by default)")
    min_pixels: int | None = Field(None, ge=1, description="Qwen-VL / GLM-4V processors: fewest pixels per image")
    max_pixels: int | None = Field(None, ge=1, description="Qwen-VL / GLM-4V processors: most pixels per image")


class ChatVLMCaptioner(torch_utils.TorchCaptioner):
    """AutoModelForImageTextToText + AutoProcessor from a local folder; one chat turn per image."""

    Params: ClassVar[type[CaptionerParams]] = ChatVLMParams
    params: ChatVLMParams

    def __init__(self, params: CaptionerParams):
        super().__init__(params)
        self.processor: Any = None
        self.image_kwargs: dict[str, Any] = {}

    def load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = require_folder(self.params.path, "captioner")
        self.place()
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True,
                                                       trust_remote_code=self.params.trust_remote_code)
        if getattr(self.processor, "chat_template", None) is None:
            raise ConfigError(f"the processor in {folder} has no chat template (chat_template.jinja or "
                              "processor_config.json): the transformers backend needs a chat VLM")
        self.image_kwargs = self._pixel_bounds()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # new tokens start at the same column in every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, **torch_utils.load_kwargs(self.params, self.dtype)).to(self.device).eval()

    def _pixel_bounds(self) -> dict[str, Any]:
        p = self.params
        if p.min_pixels is None and p.max_pixels is None:
            return {}
        ip = self.processor.image_processor
        size = getattr(ip, "size", None)  # a dict or a SizeDict: shortest/longest_edge are pixel counts here
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        edges = {k: get(k) for k in ("shortest_edge", "longest_edge")}
        if None in edges.values() or not hasattr(ip, "merge_size"):
            raise ConfigError(f"min_pixels/max_pixels apply to Qwen-VL and GLM-4V processors only, not "
                              f"{type(ip).__name__}")
        size = edges
        lo = p.min_pixels if p.min_pixels is not None else size["shortest_edge"]
        hi = p.max_pixels if p.max_pixels is not None else size["longest_edge"]
        if lo > hi:
            raise ConfigError(f"min_pixels {lo} is more than max_pixels {hi}")
        return {"size": {"shortest_edge": lo, "longest_edge": hi}}

    def messages_for(self, request: CaptionRequest) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.params.system_prompt:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.params.system_prompt}]})
        messages.append({"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.prompt_for(request)}]})
        return messages

    def inputs_for(self, requests: list[CaptionRequest]) -> Any:
        """The processor's batch (left padded), on the model's device, float tensors in its dtype."""
        texts = [self.processor.apply_chat_template(self.messages_for(r), add_generation_prompt=True, tokenize=False)
                 for r in requests]
        batch = self.processor(text=texts, images=[[r.image] for r in requests], padding=True, return_tensors="pt",
                               **self.image_kwargs)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def caption(self, requests: list[CaptionRequest]) -> list[Generated]:
        if not requests:
            return []
        if self.model is None:
            raise RuntimeError("ChatVLMCaptioner.caption() before load()")
        inputs = self.inputs_for(requests)
        torch_utils.seed_for(self.params)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, **torch_utils.generate_kwargs(self.params), pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        return torch_utils.finish(self.tokenizer, new, torch_utils.eos_ids_of(self.model, self.tokenizer), pad,
                                  self.params.max_new_tokens)
