"""EN->ZH with a Marian model converted to CTranslate2 (int8 on CPU, float16 on GPU by default).

The folder is what ``convert_marian`` writes: CTranslate2's ``model.bin``, ``config.json`` and
``shared_vocabulary.json``, plus the Marian tokenizer files (``source.spm``, ``target.spm``,
``vocab.json``) copied in so the folder is self-contained. Tokenization is the Marian tokenizer's
(pieces via ``convert_ids_to_tokens``), so a source is the same pieces as for ``MarianTranslator``:
the target token, the pieces, ``</s>``.

Conversion notes (CTranslate2's Marian loader): the decoder starts from a zero embedding instead of
``<pad>``, and ``<pad>`` (the last vocab entry in opus-mt) is dropped from the vocabulary, so
it is never generated; ``final_logits_bias`` becomes the output projection's bias.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from captioners.base import Generated, Translator, TranslatorParams, require_folder
from captioners.marian import TOKENIZER_FILES, target_prefix, warn_if_placeholders_unknown

# Copied from the transformers folder into the converted one (those that exist). Not config.json:
# the converted folder has CTranslate2's own.
COPY_FILES = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

ComputeType = Literal["auto", "default", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                      "float16", "bfloat16", "float32"]


class CTranslate2Params(TranslatorParams):
    compute_type: ComputeType = Field("auto", description="auto: int8 on CPU, float16 on GPU")
    tokenizer_path: str | None = Field(
        None, description="folder with the Marian tokenizer files; default: the model folder "
                          "(convert_marian copies them there)")
    target_token: str | None = Field(">>cmn_Hans<<", description="as for the marian backend")
    inter_threads: int = Field(1, ge=1, description="batches translated in parallel")
    intra_threads: int = Field(0, ge=0, description="threads per batch; 0: CTranslate2's default")


def convert_marian(src_folder: str | Path, dst_folder: str | Path, quantization: str | None = "int8") -> Path:
    """Convert a transformers Marian folder to CTranslate2 at ``dst_folder`` (replaced if there),
    with the tokenizer files copied in. ``quantization``: int8, float16, float32 (None: as stored)..."""
    from ctranslate2.converters import TransformersConverter

    src = require_folder(src_folder, "translator", ("config.json", *TOKENIZER_FILES))
    dst = Path(dst_folder).expanduser()
    copy = [name for name in COPY_FILES if (src / name).is_file()]
    TransformersConverter(str(src), copy_files=copy).convert(str(dst), quantization=quantization, force=True)
    return dst


class CTranslate2Translator(Translator):
    Params = CTranslate2Params
    params: CTranslate2Params

    def _tokenizer_folder(self) -> Path:
        return Path(self.params.tokenizer_path or self.params.path).expanduser()

    def check(self) -> None:
        """Cheap: the folders and files are there (nothing imported, nothing loaded)."""
        require_folder(self.params.path, "translator", ("model.bin",))
        require_folder(self._tokenizer_folder(), "translator tokenizer", TOKENIZER_FILES)

    def device(self) -> str:
        import ctranslate2

        if self.params.device == "auto":
            return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        if self.params.device == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise RuntimeError("device: cuda asked for, but CTranslate2 sees no GPU")
        return self.params.device

    def load(self) -> None:
        import ctranslate2
        from transformers import MarianTokenizer

        self.check()
        folder = Path(self.params.path).expanduser()
        device = self.device()
        compute_type = self.params.compute_type
        if compute_type == "auto":
            compute_type = "float16" if device == "cuda" else "int8"
        self.translator: Any = ctranslate2.Translator(
            str(folder), device=device, compute_type=compute_type,
            inter_threads=self.params.inter_threads, intra_threads=self.params.intra_threads)
        tok_folder = self._tokenizer_folder()
        self.tokenizer = MarianTokenizer.from_pretrained(tok_folder, local_files_only=True)
        self.prefix = target_prefix(self.tokenizer, self.params.target_token, str(tok_folder),
                                    explicit="target_token" in self.params.model_fields_set)
        warn_if_placeholders_unknown(self.tokenizer, str(tok_folder))

    def tokenize(self, text: str) -> list[str]:
        ids = self.tokenizer(self.prefix + text, truncation=True)["input_ids"]  # ends with </s>
        return self.tokenizer.convert_ids_to_tokens(ids)

    def translate(self, texts: list[str]) -> list[Generated]:
        if not texts:
            return []
        n = self.params.max_new_tokens
        results = self.translator.translate_batch(
            [self.tokenize(t) for t in texts], max_decoding_length=n, beam_size=self.params.num_beams)
        out = []
        for result in results:
            tokens = result.hypotheses[0]  # without </s>; n of them when none came within n steps
            ids = self.tokenizer.convert_tokens_to_ids(tokens)
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            out.append(Generated(text, len(tokens), len(tokens) >= n))
        return out


def copy_tokenizer(src_folder: str | Path, dst_folder: str | Path) -> None:
    """Copy the Marian tokenizer files into a converted folder made elsewhere (e.g. by ct2-transformers-converter)."""
    src, dst = Path(src_folder), Path(dst_folder)
    for name in COPY_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
