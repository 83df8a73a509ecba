"""Tiny, random, offline stand-ins for the captioner backends' weights (a few MB, seconds to build).

* ``write_tiny_cogvlm``: a CogVLM-shaped remote-code folder: ``config.json`` with an ``auto_map``
  pointing at ``modeling_tinycogvlm.py`` (a copy of ``captioners/tiny_cogvlm_modeling.py``), random
  weights, and a byte-level BPE tokenizer. It loads only through transformers' real remote-code path
  (``from_pretrained(folder, local_files_only=True)`` with remote code allowed, as a caption config
  with ``trust_remote_code: true`` asks).
* ``write_tiny_qwen2vl``: a Qwen2VLForConditionalGeneration with a Qwen2VLProcessor (a small
  image processor: patch 4, merge 2, at most 32x32 pixels) and a Qwen-like chat template.
* ``write_tiny_smolvlm``: an Idefics3ForConditionalGeneration (what SmolVLM is) with an
  Idefics3Processor (tiles of 32 pixels, at most 2x2 tiles plus the global image) and SmolVLM's
  chat template.

All three save a generation_config with the end-of-sequence id. Outputs are random text.
Weights are seeded (``torch.manual_seed``): a rebuild is equal.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT = """A red bus parked on a quiet street next to a tall building.
A wooden table with two white cups of coffee and a small green plant near the window.
A street at night in the old city, with a shop sign above the door and many people walking past.
Describe this image in detail for a text-to-image training caption: the main objects and their attributes.
Colour, material, size, how many there are, where they are in the picture relative to each other.
The background, the style, and any visible text, quoted exactly. OCR read this text in the image.
Question: Answer: Short answer: User: Assistant: system user assistant
A cat sleeps on a blue sofa in a sunny living room. 0 1 2 3 4 5 6 7 8 9
"""

QWEN2VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# SmolVLM-Instruct's template.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

COGVLM_MODULE = "modeling_tinycogvlm"
# Weight init std: the default 0.02 makes a tiny random model say the same whatever its input.
INIT = 0.2


def _train_bpe(specials: Sequence[str], vocab_size: int = 320) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    return tok


def _fast_tokenizer(specials: Sequence[str], **kwargs: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_train_bpe(specials), unk_token=None, padding_side="left",
                                   **kwargs)


def write_tiny_cogvlm(directory: Path, seed: int = 0) -> Path:
    """A tiny CogVLM-shaped remote-code folder (config with auto_map, modeling file, weights, tokenizer)."""
    import torch
    from transformers import GenerationConfig

    from captioners import tiny_cogvlm_modeling as modeling

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _fast_tokenizer(["<|end_of_text|>", "<|begin_of_text|>", "<|reserved_special_token_0|>"],
                                bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                pad_token="<|reserved_special_token_0|>")
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    config = modeling.TinyCogVLMConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vision_config={"image_size": 32, "patch_size": 4, "in_channels": 3, "hidden_size": 16},
        template_version="chat", initializer_range=INIT, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        architectures=["TinyCogVLMForCausalLM"])
    torch.manual_seed(seed)
    model = modeling.TinyCogVLMForCausalLM(config).eval()
    # pad marks the image positions; like CogVLM2's reserved pad token it is never generated
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos,
                                               suppress_tokens=[pad, bos], do_sample=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    shutil.copyfile(Path(modeling.__file__), directory / f"{COGVLM_MODULE}.py")
    # What a CogVLM folder's config says: the classes live in the folder's own Python file.
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoConfig": f"{COGVLM_MODULE}.TinyCogVLMConfig",
                       "AutoModelForCausalLM": f"{COGVLM_MODULE}.TinyCogVLMForCausalLM"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return directory


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def write_tiny_qwen2vl(directory: Path, seed: int = 0) -> Path:
    """A random Qwen2VLForConditionalGeneration and its processor, saved with save_pretrained."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _fast_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    patch, merge = 4, 2
    sizes = {"patch_size": patch, "merge_size": merge, "temporal_patch_size": 2,
             "size": {"shortest_edge": (patch * merge) ** 2, "longest_edge": 32 * 32}}
    image_processor = Qwen2VLImageProcessor(**sizes)
    # The processor wants a video processor too (never used for captions).
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=QWEN2VL_CHAT_TEMPLATE)
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                          "mrope_section": [1, 1, 2]},
                     "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad, "initializer_range": INIT},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": 2,
                       "initializer_range": INIT},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                 "<global-img>", *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]


def write_tiny_smolvlm(directory: Path, seed: int = 0) -> Path:
    """A random Idefics3ForConditionalGeneration (SmolVLM's architecture) and its processor."""
    import torch
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _fast_tokenizer(SMOL_SPECIALS, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                pad_token="<|endoftext|>")
    tile, patch, scale = 32, 8, 2
    image_seq_len = (tile // patch) ** 2 // scale**2
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
                                             do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Idefics3Config(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": tile, "patch_size": patch, "initializer_range": INIT},
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": eos, "pad_token_id": pad, "initializer_range": INIT},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale, tie_word_embeddings=False,
        pad_token_id=pad)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False,
                                               suppress_tokens=[pad])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_all(directory: Path) -> dict[str, Path]:
    """All three under ``directory``: {"cogvlm": ..., "qwen2vl": ..., "smolvlm": ...}."""
    directory = Path(directory)
    return {"cogvlm": write_tiny_cogvlm(directory / "tiny-cogvlm"),
            "qwen2vl": write_tiny_qwen2vl(directory / "tiny-qwen2vl"),
            "smolvlm": write_tiny_smolvlm(directory / "tiny-smolvlm")}
