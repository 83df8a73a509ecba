"""EN->ZH with an instruction LLM (Qwen2.5-Instruct, GLM-4, ...): a fixed prompt in the model's chat
template, greedy by default, batched with left padding; only the new tokens are decoded."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from captioners.base import Generated, GenerationParams, ModelMissing, Translator, TranslatorParams, require_folder

# ⟦n⟧: the placeholders of captioners.protect (quoted text and proper nouns kept verbatim).
PROMPT = (
    "Translate the following English image description into fluent Simplified Chinese. Keep every token of "
    "the form ⟦n⟧ (n a number) unchanged, where it belongs in the sentence. Output only the translation.\n\n{text}"
)


class LLMTranslatorParams(TranslatorParams, GenerationParams):
    """The translator's fields (max_new_tokens 512 by default) and the generation ones (dtype, sampling,
    seed, trust_remote_code), so the shared torch_utils helpers apply."""

    prompt: str = Field(PROMPT, description="the user message; {text} is replaced by the English text")
    system: str | None = Field(None, description="a system message; None: the chat template's default")

    @field_validator("prompt")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("translator.prompt must contain {text}")
        return value


def build_prompt(text: str, prompt: str = PROMPT) -> str:
    return prompt.replace("{text}", text)


class LLMTranslator(Translator):
    Params = LLMTranslatorParams
    params: LLMTranslatorParams

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from captioners.torch_utils import load_kwargs, pick_device, pick_dtype

        folder = require_folder(self.params.path, "translator")
        self.device = pick_device(self.params.device)
        dtype = pick_dtype(self.params.dtype, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, trust_remote_code=self.params.trust_remote_code)
            self.model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs(self.params, dtype))
        except OSError as exc:
            raise ModelMissing(f"the translator model folder {folder} cannot be loaded: {exc}") from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            raise ModelMissing(f"the translator model folder {folder} has no chat template (an instruction model "
                               "is needed)")

    def chat(self, text: str) -> str:
        messages: list[dict[str, Any]] = []
        if self.params.system is not None:
            messages.append({"role": "system", "content": self.params.system})
        messages.append({"role": "user", "content": build_prompt(text, self.params.prompt)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def translate(self, texts: list[str]) -> list[Generated]:
        import torch

        from captioners.torch_utils import eos_ids_of, finish, generate_kwargs, seed_for

        if not texts:
            return []
        enc = self.tokenizer([self.chat(t) for t in texts], return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        seed_for(self.params)
        eos_ids = eos_ids_of(self.model, self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(**enc, **generate_kwargs(self.params), eos_token_id=eos_ids or None,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return finish(self.tokenizer, new.cpu(), eos_ids, self.tokenizer.pad_token_id, self.params.max_new_tokens)
