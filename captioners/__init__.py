"""VLM captioners (English) and EN->ZH translators, chosen by ``backend:`` in a caption config.

Backends are named here and imported only when a config asks for them, so a machine without
CTranslate2 (say) can still run the transformers ones.
"""

from __future__ import annotations

import importlib
from typing import Any

from captioners.base import Captioner, CaptionerParams, ModelMissing, Translator, TranslatorParams

CAPTIONERS = {
    "cogvlm": "captioners.cogvlm:CogVLMCaptioner",  # CogVLM / CogVLM2 (remote code)
    "transformers": "captioners.hf_vlm:ChatVLMCaptioner",  # native: Qwen2.5-VL, SmolVLM, GLM-4V, ...
}
TRANSLATORS = {
    "marian": "captioners.marian:MarianTranslator",  # opus-mt-en-zh with transformers
    "ctranslate2": "captioners.ct2:CTranslate2Translator",  # the same model converted, int8 CPU / fp16 GPU
    "llm": "captioners.llm_translate:LLMTranslator",  # an instruction LLM with a fixed prompt
}

__all__ = ["CAPTIONERS", "TRANSLATORS", "Captioner", "ModelMissing", "Translator", "build_captioner",
           "build_translator"]


def _backend(table: dict[str, str], kind: str, section: dict[str, Any]) -> type:
    """A registered backend, or ``package.module:Class`` for one of your own (installed code, as a
    signal is: a new backend is one file plus its config entry)."""
    name = section.get("backend")
    if not isinstance(name, str) or (name not in table and ":" not in name):
        raise ModelMissing(f"{kind}.backend must be one of {', '.join(sorted(table))} (or module:Class), not {name!r}")
    module, _, attr = table.get(name, name).partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelMissing(f"{kind}.backend {name!r} cannot be imported: {exc}") from exc


def build_captioner(section: dict[str, Any]) -> Captioner:
    """A captioner from its config section (``backend``, ``path``, generation settings)."""
    cls = _backend(CAPTIONERS, "captioner", section)
    params: CaptionerParams = cls.Params.model_validate(section)
    return cls(params)


def build_translator(section: dict[str, Any]) -> Translator:
    cls = _backend(TRANSLATORS, "translator", section)
    params: TranslatorParams = cls.Params.model_validate(section)
    return cls(params)
