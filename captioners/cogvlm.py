"""The CogVLM captioner (backend ``cogvlm``): CogVLM, CogVLM2 and cogvlm2-llama3-caption checkpoints
in their transformers remote-code format (a folder whose ``config.json`` has an ``auto_map`` pointing
at the folder's own ``modeling_cogvlm.py``). Kolors' recipe recaptions its images with CogVLM.

The folder's Python code runs in this process, so loading needs ``trust_remote_code: true`` in the
caption config; without it ``load()`` refuses (``RemoteCodeRefused``) before any of that code is read.

It uses CogVLM's own interface, as CogVLM2's ``basic_demo/cli_demo_batch_inference.py`` does:
``model.build_conversation_input_ids(tokenizer, query=..., history=[], images=[image],
template_version="chat")`` gives one row (1-D ``input_ids``, ``token_type_ids``, ``attention_mask``
and ``images``); rows are LEFT padded here (pad id, language token type, mask 0) so every row's new
tokens start at the same column, ``images=[[img], ...]``, then ``model.generate(**inputs, ...)``; only
the new tokens are decoded.

transformers version: CogVLM2's remote code (``modeling_cogvlm.py`` of THUDM/cogvlm2-llama3-chat-19B
and cogvlm2-llama3-caption) asks for ``transformers>=4.40.2`` (CogVLM2 ``basic_demo/requirements.txt``)
and breaks from 4.42 on: ``llm_forward`` reads ``past_key_values[0][0].shape`` and fails with
``AttributeError: 'str' object has no attribute 'shape'`` once generate passes a ``Cache`` object.
The maintainers' answer is to downgrade: zai-org/CogVLM2 issue #156 ("Fail to run a demo", 2024-07,
maintainer zRzRzRzRzRzRzR: "降级到4.40", i.e. downgrade to 4.40; another user: transformers==4.40.1),
and issue #142 ("transformers-4.42.3 无法运行basic demo，4.41.3可以正常运行basic demo": 4.42.3 fails,
4.41.3 works). CogVLM (v1, cogvlm-chat-hf) hits the same error (zai-org/CogVLM #504: 4.36.2 works).
So: ``COGVLM2_TRANSFORMERS = ">=4.40.2,<4.42"``; ``load()`` logs a warning when the installed
transformers is outside it (it still tries: a folder with updated code may work).
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from captioners import torch_utils
from captioners.base import CaptionerParams, CaptionRequest, Generated, ModelMissing, require_folder
from schemas.config import ConfigError

log = logging.getLogger(__name__)

# What CogVLM2's remote code runs on (see the module docstring for the sources).
COGVLM2_TRANSFORMERS = ">=4.40.2,<4.42"
COGVLM2_TRANSFORMERS_MIN = "4.40.2"
COGVLM2_TRANSFORMERS_BELOW = "4.42"

LANGUAGE_TOKEN_TYPE = 0  # CogVLM's token_type_ids: 0 language, 1 vision


class RemoteCodeRefused(ConfigError):
    """A model folder whose own Python code would have to run, with ``trust_remote_code`` off."""


class CogVLMParams(CaptionerParams):
    template_version: Literal["base", "chat", "vqa"] = Field(
        "chat", description="CogVLM's prompt template: chat (Question: ... Answer:), vqa (Short answer:), base")


def transformers_in_range(version: str) -> bool:
    """Whether ``version`` is inside COGVLM2_TRANSFORMERS."""
    from packaging.version import Version

    v = Version(Version(version).base_version)  # 4.41.0.dev0 counts as 4.41.0
    return Version(COGVLM2_TRANSFORMERS_MIN) <= v < Version(COGVLM2_TRANSFORMERS_BELOW)


def check_transformers_version(version: str | None = None) -> bool:
    """Log a warning when the installed transformers is outside what CogVLM2's remote code needs."""
    import transformers

    version = version or transformers.__version__
    ok = transformers_in_range(version)
    if not ok:
        log.warning("transformers %s is installed, but CogVLM2's remote code needs transformers%s (it fails "
                    "with \"'str' object has no attribute 'shape'\" from 4.42 on; see zai-org/CogVLM2 issues "
                    "#156 and #142); a folder with updated modeling code may still work", version,
                    COGVLM2_TRANSFORMERS)
    return ok


class CogVLMCaptioner(torch_utils.TorchCaptioner):
    """CogVLM / CogVLM2 remote-code checkpoints from a local folder, batched with left padding."""

    Params: ClassVar[type[CaptionerParams]] = CogVLMParams
    params: CogVLMParams

    def check(self) -> None:
        """The folder and its config.json exist, and the config names remote-code classes (cheap, no code runs)."""
        folder = require_folder(self.params.path, "captioner")
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelMissing(f"the captioner model folder {folder} has an unreadable config.json: {e}") from e
        if "AutoModelForCausalLM" not in (config.get("auto_map") or {}):
            raise ModelMissing(f"the captioner model folder {folder} is not a CogVLM remote-code checkpoint: its "
                               "config.json has no auto_map.AutoModelForCausalLM (use backend: transformers for "
                               "models transformers supports natively)")

    def refuse_without_remote_code(self) -> None:
        if not self.params.trust_remote_code:
            raise RemoteCodeRefused(
                f"the cogvlm captioner loads {self.params.path} with its own Python code (the folder's "
                "modeling_*.py, named by auto_map in its config.json), which would run in this process; "
                "the caption config must say trust_remote_code: true to allow that")

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.check()
        self.refuse_without_remote_code()  # before any of the folder's code is read
        check_transformers_version()
        folder = require_folder(self.params.path, "captioner")
        self.place()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                       trust_remote_code=self.params.trust_remote_code)
        if self.tokenizer.pad_token_id is None:  # the image placeholders and the left padding need one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            folder, **torch_utils.load_kwargs(self.params, self.dtype)).to(self.device).eval()

    def rows_for(self, requests: list[CaptionRequest]) -> list[dict[str, Any]]:
        return [self.model.build_conversation_input_ids(
            self.tokenizer, query=self.prompt_for(r), history=[], images=[r.image],
            template_version=self.params.template_version) for r in requests]

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Left pad input_ids (pad id), token_type_ids (language) and attention_mask (0); images [[img], ...]."""
        width = max(len(row["input_ids"]) for row in rows)
        pad = self.tokenizer.pad_token_id

        def left(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([torch.full((width - len(t),), value, dtype=t.dtype), t])

        batch: dict[str, Any] = {
            "input_ids": torch.stack([left(r["input_ids"], pad) for r in rows]).to(self.device),
            "token_type_ids": torch.stack([left(r["token_type_ids"], LANGUAGE_TOKEN_TYPE)
                                           for r in rows]).to(self.device),
            "attention_mask": torch.stack([left(r["attention_mask"], 0) for r in rows]).to(self.device),
        }
        batch["images"] = [[img.to(self.device, self.dtype) for img in r["images"]] for r in rows]
        return batch

    def caption(self, requests: list[CaptionRequest]) -> list[Generated]:
        if not requests:
            return []
        if self.model is None:
            raise RuntimeError("CogVLMCaptioner.caption() before load()")
        inputs = self.collate(self.rows_for(requests))
        torch_utils.seed_for(self.params)
        pad = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(**inputs, **torch_utils.generate_kwargs(self.params), pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        return torch_utils.finish(self.tokenizer, new, torch_utils.eos_ids_of(self.model, self.tokenizer), pad,
                                  self.params.max_new_tokens)
