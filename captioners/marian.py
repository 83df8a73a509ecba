"""EN->ZH with a Marian model (Helsinki-NLP/opus-mt-en-zh) in transformers.

opus-mt-en-zh is multi-target (Simplified and Traditional Mandarin, Cantonese, ...): a source
must begin with a target-language token such as ``>>cmn_Hans<<``. ``target_token`` is prepended
when the tokenizer's vocab has it; a model without any such tokens (a single-target one) is used
with ``target_token: null``; a configured token the vocab lacks is a ``ConfigError`` at load.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from captioners.base import Generated, ModelMissing, Translator, TranslatorParams, require_folder
from schemas.config import ConfigError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")


class MarianParams(TranslatorParams):
    target_token: str | None = Field(
        ">>cmn_Hans<<", description="prepended to every source (multi-target models); null: none")


def target_prefix(tokenizer: Any, token: str | None, path: str, explicit: bool = True) -> str:
    """The text to put before each source: ``token + " "``, or "" for none.

    A token the vocab lacks is a ``ConfigError`` naming it, except for the default (not
    ``explicit``) on a model with no ``>>xx<<`` tokens at all (a single-target model): none then.
    On a multi-target model a missing token would let it translate into whichever language it likes."""
    if token is None:
        return ""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return token + " "
    codes = sorted(t for t in vocab if t.startswith(">>") and t.endswith("<<"))
    if codes or explicit:
        raise ConfigError(f"translator.target_token {token!r} is not in the vocab of {path} "
                          f"(it has {', '.join(codes[:8]) or 'no language tokens'}"
                          f"{', ...' if len(codes) > 8 else ''}); set target_token to one of those, or null")
    return ""


def warn_if_placeholders_unknown(tokenizer: Any, path: str) -> None:
    """Placeholders (captioners.protect, ``⟦0⟧``) that the tokenizer maps to <unk> cannot be copied."""
    from captioners.protect import placeholder

    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in tokenizer(placeholder(0), add_special_tokens=False)["input_ids"]:
        log.warning("the tokenizer of %s has no pieces for the placeholder %s: protected spans may be lost "
                    "(restore then reports them as missing)", path, placeholder(0))


class MarianTranslator(Translator):
    Params = MarianParams
    params: MarianParams

    def check(self) -> None:
        require_folder(self.params.path, "translator", ("config.json", *TOKENIZER_FILES))

    def load(self) -> None:
        import torch
        from transformers import MarianMTModel, MarianTokenizer

        from captioners.torch_utils import pick_device

        folder = require_folder(self.params.path, "translator", ("config.json", *TOKENIZER_FILES))
        self.device = pick_device(self.params.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        try:
            self.tokenizer = MarianTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = MarianMTModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype)
        except OSError as exc:
            raise ModelMissing(f"the translator model folder {folder} cannot be loaded: {exc}") from exc
        self.model.to(self.device).eval()
        self.prefix = target_prefix(self.tokenizer, self.params.target_token, str(folder),
                                    explicit="target_token" in self.params.model_fields_set)
        warn_if_placeholders_unknown(self.tokenizer, str(folder))

    def translate(self, texts: list[str]) -> list[Generated]:
        import torch

        from captioners.torch_utils import eos_ids_of, finish

        if not texts:
            return []
        enc = self.tokenizer([self.prefix + t for t in texts], return_tensors="pt", padding=True,
                             truncation=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.params.max_new_tokens, max_length=None,  # opus-mt sets 512: quiet
                num_beams=self.params.num_beams,
                do_sample=False, temperature=None, top_p=None, top_k=None,
                forced_eos_token_id=None)  # opus-mt forces eos at max_length: a cut-off would look ended
        # Each row begins with the decoder start token (<pad>): drop that column.
        return finish(self.tokenizer, out[:, 1:].cpu(), eos_ids_of(self.model, self.tokenizer),
                      self.tokenizer.pad_token_id, self.params.max_new_tokens)
