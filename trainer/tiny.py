"""A tiny random Kolors stack, built offline in seconds, for tests and smoke runs of the trainer.

Same classes and conditioning wiring as Kolors (ChatGLM text encoder + ChatGLMTokenizer from
``diffusers.pipelines.kolors``, SDXL-architecture UNet with ``text_proj`` / ``text_time`` conditioning,
AutoencoderKL, Kolors scheduler) at toy sizes, so every code path that touches the real 2.6B UNet and 6B
text encoder can run on a CPU without any download. The outputs are meaningless; only the plumbing is real.
The full-size configs are here too, for documentation and shape checks on the meta device.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm

from trainer.export import save_pipeline
from trainer.schedules import Stage, scheduler_for_stage

TINY_TEXT_HIDDEN = 64
TINY_TIME_EMBED_DIM = 8
SP_VOCAB = 1000
CHATGLM_SPECIAL_TOKENS = 9  # [MASK] [gMASK] [sMASK] sop eop + 4 role tokens, appended after the sp vocab

_EN_SUBJECTS = ["a cat", "a dog", "an old man", "a young woman", "a red car", "a panda", "a lantern", "a teapot",
                "a mountain", "a lighthouse", "a bicycle", "a bowl of noodles", "two children", "a poster", "a bridge"]
_EN_PLACES = ["in the snow", "on the beach", "at night", "in a busy street", "under cherry blossoms", "in the forest",
              "by the river", "in the Forbidden City", "on a wooden table", "at sunset", "in the rain"]
_EN_STYLES = ["photo", "oil painting", "watercolor", "3d render", "ink painting", "close-up photo", "poster design"]
_ZH_SUBJECTS = ["一只猫", "一只狗", "一位老人", "一个女孩", "一辆红色汽车", "一只熊猫", "一盏灯笼", "一把茶壶",
                "一座山", "一座灯塔", "一碗面条", "两个孩子", "一张海报", "一座桥", "月饼", "故宫", "长城", "书法作品"]
_ZH_PLACES = ["在雪地里", "在海边", "在夜晚", "在热闹的街道上", "在樱花树下", "在森林中", "在河边", "在木桌上",
              "在夕阳下", "在雨中", "在春节的庙会上"]
_ZH_STYLES = ["照片", "油画", "水彩画", "三维渲染", "水墨画", "特写照片", "海报设计", "高清摄影"]
_ZH_WORDS = ["你好", "欢迎", "新年快乐", "中秋节", "咖啡", "茶", "书店", "北京", "上海", "春天", "夏天", "秋天", "冬天"]


def tiny_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Deterministic bilingual caption-like lines (English, Chinese, mixed) to train the toy tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        en = f"a {rng.choice(_EN_STYLES)} of {rng.choice(_EN_SUBJECTS)} {rng.choice(_EN_PLACES)}"
        zh = f"{rng.choice(_ZH_SUBJECTS)}{rng.choice(_ZH_PLACES)}，{rng.choice(_ZH_STYLES)}"
        sign = f'写着"{rng.choice(_ZH_WORDS)}"的招牌'
        lines.append([en, zh, f"{zh}, {en}", f"{en}, {sign}", f"{zh}，{sign}"][i % 5])
    return lines


def train_sentencepiece(path: Path, vocab_size: int = SP_VOCAB, seed: int = 0) -> Path:
    """Train a BPE sentencepiece model with byte fallback on ``tiny_corpus`` and write it to ``path``."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus(seed=seed)), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0, num_threads=1,
        hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity",  # keep full-width CJK punctuation (NFKC would turn ， into ,)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def _init_chatglm(model: ChatGLMModel) -> None:
    """ChatGLM's ``_init_weights`` is a no-op, so initialise like a fresh transformer: norms 1, weights N(0, 0.02)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)
        elif isinstance(module, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)


def tiny_text_encoder(sp_vocab: int = SP_VOCAB) -> ChatGLMModel:
    """A 2-layer ChatGLM3-shaped encoder (grouped-query attention, RMSNorm, original rope) with hidden size 64."""
    config = ChatGLMConfig(
        num_layers=2, hidden_size=TINY_TEXT_HIDDEN, ffn_hidden_size=128, kv_channels=16, num_attention_heads=4,
        multi_query_attention=True, multi_query_group_num=2, seq_length=256, original_rope=True,
        padded_vocab_size=sp_vocab + CHATGLM_SPECIAL_TOKENS + 7,  # >= sp vocab + 9; rounded up to a multiple of 8
        add_qkv_bias=True, torch_dtype="float32",
    )
    model = ChatGLMModel(config, empty_init=False)
    _init_chatglm(model)
    return model.eval()


def tiny_unet(text_hidden: int = TINY_TEXT_HIDDEN) -> UNet2DConditionModel:
    """SDXL-architecture UNet at toy width with Kolors' conditioning; 8x8 latents (64 px images)."""
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), use_linear_projection=True,
        norm_num_groups=8, cross_attention_dim=32,
        encoder_hid_dim_type="text_proj", encoder_hid_dim=text_hidden,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + text_hidden,
    )


def tiny_vae() -> AutoencoderKL:
    """AutoencoderKL with 3 downsamples (scale factor 8, like SDXL's) and 4 latent channels."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025,
    )


def build_tiny_kolors(directory: str | Path, stage: Stage = "quality", seed: int = 0) -> dict[str, Any]:
    """Build a tiny random Kolors stack, save it as a diffusers KolorsPipeline folder in ``directory`` and return
    its components: ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (the ``save_pipeline``
    arguments). Deterministic for a given seed; the global torch RNG is left untouched."""
    directory = Path(directory)
    sp_model = train_sentencepiece(directory / "tokenizer" / "tokenizer.model", seed=seed)
    tokenizer = ChatGLMTokenizer(vocab_file=str(sp_model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components: dict[str, Any] = {
            "unet": tiny_unet(),
            "vae": tiny_vae(),
            "text_encoder": tiny_text_encoder(tokenizer.tokenizer.sp_model.vocab_size()),
            "tokenizer": tokenizer,
            "scheduler": scheduler_for_stage(stage),
        }
    save_pipeline(directory, **components)
    return components


def kolors_unet_config(text_hidden: int = 4096) -> dict[str, Any]:
    """Kolors' full-size UNet config: SDXL-base's UNet unchanged except the text condition, a ``text_proj``
    from ChatGLM3's ``text_hidden`` to SDXL's 2048-d cross-attention and ``text_time`` added embeddings of
    6 * 256 (time ids) + ``text_hidden`` (pooled) = 5632 inputs. About 2.6B parameters: build it on the meta
    device only."""
    return {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True, "norm_num_groups": 32, "cross_attention_dim": 2048,
        "encoder_hid_dim_type": "text_proj", "encoder_hid_dim": text_hidden,
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 6 * 256 + text_hidden,
    }


def sdxl_sized_unet_config(text_hidden: int = 4096) -> dict[str, Any]:
    """Same as ``kolors_unet_config``: the SDXL-sized UNet with Kolors' ChatGLM conditioning."""
    return kolors_unet_config(text_hidden)
