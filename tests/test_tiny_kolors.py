"""The tiny Kolors stack: build offline, export as a KolorsPipeline folder, reload offline, sample, and check that
the trainer's text condition is the pipeline's own, number for number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.export import load_pipeline, save_pipeline
from trainer.schedules import scheduler_for_stage
from trainer.text_encoder import encode_prompts, load_text_encoder
from trainer.tiny import TINY_TEXT_HIDDEN, build_tiny_kolors, kolors_unet_config, sdxl_sized_unet_config

torch.set_num_threads(1)

PROMPTS = ["一只熊猫在雪地里，水墨画", 'a poster of a lantern at night, 写着"新年快乐"的招牌', ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("tiny-kolors")
    return directory, build_tiny_kolors(directory, stage="quality")


def test_build_save_reload_sample(tmp_path: Path) -> None:
    build_tiny_kolors(tmp_path / "built")
    pipe = load_pipeline(tmp_path / "built")
    image = pipe("一只猫 a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    assert not pipe.config.force_zeros_for_empty_prompt


def test_saved_layout_and_quality_schedule(tiny: tuple[Path, dict[str, Any]]) -> None:
    directory, _ = tiny
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (directory / sub).is_dir(), sub
    assert (directory / "tokenizer" / "tokenizer.model").stat().st_size > 0
    index = json.loads((directory / "model_index.json").read_text())
    assert index["_class_name"] == "KolorsPipeline"
    assert index["text_encoder"] == ["kolors", "ChatGLMModel"]
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["num_train_timesteps"] == 1100 and scheduler["beta_end"] == 0.014


def test_concept_stage_export(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    _, parts = tiny
    save_pipeline(tmp_path / "concept", **(parts | {"scheduler": scheduler_for_stage("concept")}))
    scheduler = load_pipeline(tmp_path / "concept").scheduler.config
    assert (scheduler.num_train_timesteps, scheduler.beta_end) == (1000, 0.012)


def test_encode_prompts_matches_pipeline(tiny: tuple[Path, dict[str, Any]]) -> None:
    directory, parts = tiny
    text_encoder, tokenizer = load_text_encoder(directory)
    embeds, pooled = encode_prompts(text_encoder, tokenizer, PROMPTS)
    assert embeds.shape == (3, 256, TINY_TEXT_HIDDEN) and pooled.shape == (3, TINY_TEXT_HIDDEN)
    assert not embeds.requires_grad
    pipe = load_pipeline(directory)
    pipe_embeds, neg_embeds, pipe_pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
    assert torch.equal(embeds, pipe_embeds) and torch.equal(pooled, pipe_pooled)
    assert torch.equal(neg_embeds[0], embeds[2]) and torch.equal(neg_pooled[0], pooled[2])  # negative = ""
    assert not torch.allclose(embeds[0], embeds[1])
    # The in-memory components give the same numbers as the reloaded ones (save/load is lossless).
    fresh_embeds, fresh_pooled = encode_prompts(parts["text_encoder"], parts["tokenizer"], PROMPTS)
    assert torch.equal(fresh_embeds, embeds) and torch.equal(fresh_pooled, pooled)
    short, _ = encode_prompts(text_encoder, tokenizer, PROMPTS[0], max_length=32)
    assert short.shape == (1, 32, TINY_TEXT_HIDDEN)


def test_tokenizer_round_trip(tiny: tuple[Path, dict[str, Any]]) -> None:
    directory, parts = tiny
    _, tokenizer = load_text_encoder(directory)
    assert tokenizer.tokenizer.sp_model.vocab_size() == 1000
    assert parts["text_encoder"].config.padded_vocab_size >= tokenizer.vocab_size == 1009
    ids = tokenizer(PROMPTS[:2])["input_ids"]
    assert ids == parts["tokenizer"](PROMPTS[:2])["input_ids"]
    assert ids[0][:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert tokenizer.decode(ids[0][2:]) == PROMPTS[0]
    assert tokenizer.decode(tokenizer("☃ 𝄞")["input_ids"][2:]) == "☃ 𝄞"  # unseen characters: byte fallback


def test_build_is_deterministic(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    directory, parts = tiny
    again = build_tiny_kolors(tmp_path)
    assert (tmp_path / "tokenizer" / "tokenizer.model").read_bytes() == (
        directory / "tokenizer" / "tokenizer.model").read_bytes()
    for name in ("unet", "vae", "text_encoder"):
        a, b = parts[name].state_dict(), again[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_load_text_encoder_from_flat_folder(tiny: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    directory, _ = tiny
    for sub in ("text_encoder", "tokenizer"):
        for f in (directory / sub).iterdir():
            shutil.copy(f, tmp_path / f.name)
    text_encoder, tokenizer = load_text_encoder(tmp_path, dtype=torch.bfloat16)
    assert text_encoder.dtype == torch.bfloat16 and not text_encoder.training
    assert not any(p.requires_grad for p in text_encoder.parameters())
    embeds, pooled = encode_prompts(text_encoder, tokenizer, PROMPTS[:1], max_length=16)
    assert embeds.dtype == torch.bfloat16 and pooled.shape == (1, TINY_TEXT_HIDDEN)


def test_missing_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_text_encoder(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-pipeline"):
        load_pipeline(tmp_path / "no-such-pipeline")


def test_full_size_config() -> None:
    config = kolors_unet_config()
    assert config == sdxl_sized_unet_config()
    assert config["encoder_hid_dim"] == 4096 and config["encoder_hid_dim_type"] == "text_proj"
    assert config["projection_class_embeddings_input_dim"] == 5632 == 6 * config["addition_time_embed_dim"] + 4096
    assert config["cross_attention_dim"] == 2048 and config["transformer_layers_per_block"] == [1, 2, 10]
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only, no memory
        unet = UNet2DConditionModel(**config)
    assert unet.encoder_hid_proj.in_features == 4096
    assert unet.add_embedding.linear_1.in_features == 5632
    assert 2.5e9 < sum(p.numel() for p in unet.parameters()) < 2.65e9
