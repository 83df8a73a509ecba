"""Tiny, random, offline stand-ins for the translator backends' weights (a few MB, seconds to build).

* ``write_tiny_marian``: a MarianMTModel shaped like opus-mt-en-zh (shared vocab.json with target
  language tokens such as ``>>cmn_Hans<<``, ``</s>`` = 0, ``<pad>`` last and the decoder start,
  source.spm/target.spm trained here on a small built-in English and Chinese text).
* ``write_tiny_ct2``: that model converted to CTranslate2 (int8 unless told otherwise).
* ``write_tiny_llm``: a Qwen2ForCausalLM with a byte-level BPE tokenizer and a Qwen-like chat template.

Outputs are random text. The end-of-sequence logit is raised by a calibrated amount (Marian: the
final logits bias; LLM: the end token's output row) so greedy runs on ``SAMPLE_TEXTS`` end after a
few tokens rather than always running to ``max_new_tokens``. Weights are seeded: a rebuild is equal.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET_TOKENS = (">>cmn_Hans<<", ">>yue_Hant<<", ">>cmn_Hant<<")

# What the tests translate: three lengths, a placeholder in one.
SAMPLE_TEXTS = (
    "A red bus.",
    "A wooden table with two white cups of coffee and a small plant near the window.",
    "A street at night in the old city, with a shop sign reading ⟦0⟧ above the door, many people walking "
    "past, bright lanterns hanging over the road and a tall tower far behind them.",
)

ENGLISH = """A red bus parked on a quiet street next to a tall building.
A wooden table with two white cups of coffee and a small green plant near the window.
A street at night in the old city, with a shop sign above the door and many people walking past.
Bright lanterns hang over the road and a tall tower stands far behind them.
A cat sleeps on a blue sofa in a sunny living room.
Three children play football on the grass in a large park.
A close-up photo of a bowl of noodles with eggs, green onions and chili oil.
The poster shows the words written in large yellow letters on a black background.
A mountain lake under a clear sky, with pine trees along the shore.
An old man rides a bicycle along the river in the morning.
A bookshelf full of books, a lamp and a clock on the wall.
A white dog runs across the beach while waves roll in from the sea.
The Forbidden City in Beijing, with red walls and golden roofs in the snow.
A plate of dumplings on a round table, chopsticks beside it.
Two women in traditional dresses stand in front of a temple gate.
A sign reading open hangs on the glass door of a small cafe.
Placeholders like ⟦0⟧ ⟦1⟧ ⟦2⟧ ⟦3⟧ stay as they are, 0 1 2 3 4 5 6 7 8 9.
"""

CHINESE = """一辆红色的公共汽车停在一栋高楼旁边安静的街道上。
一张木桌上放着两杯白色的咖啡，窗边有一盆绿色的小植物。
老城区夜晚的街道，门上方有一个商店招牌，许多人从旁边走过。
明亮的灯笼挂在路的上方，远处有一座高塔。
一只猫睡在阳光明媚的客厅里的蓝色沙发上。
三个孩子在大公园的草地上踢足球。
一碗面条的特写照片，上面有鸡蛋、葱和辣椒油。
海报上用黑色背景上的黄色大字写着这些字。
晴朗天空下的山间湖泊，岸边有松树。
一位老人早上沿着河边骑自行车。
一个装满书的书架，墙上有一盏灯和一个时钟。
一只白色的狗跑过海滩，海浪从海上涌来。
雪中的北京故宫，红墙金顶。
圆桌上放着一盘饺子，旁边有筷子。
两位穿着传统服装的女士站在寺庙门前。
一个写着营业的牌子挂在一家小咖啡馆的玻璃门上。
占位符如⟦0⟧⟦1⟧⟦2⟧⟦3⟧保持不变，“春节快乐”，0 1 2 3 4 5 6 7 8 9。
"""

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _train_spm(lines: Sequence[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1)
    return model.getvalue()


def _spm_pieces(model: bytes) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]


def _best_threshold(gaps: list[list[float]], lo: int = 2, hi: int = 16) -> float:
    """The eos boost that ends most runs between steps ``lo`` and ``hi`` (never at the first), with
    the widest margin to every gap so float noise (batching, CT2) does not move where runs end.
    ``gaps[r][t]``: best other logit minus the eos logit at step t of run r (greedy, eos never chosen)."""
    values = sorted({g for run in gaps for g in run if g != float("inf")})
    first = min(run[0] for run in gaps)
    best: tuple[int, float, float] | None = None
    for a, b in itertools.pairwise(values):
        boost = (a + b) / 2
        if boost >= first:
            break
        ends = [next((t for t, g in enumerate(run) if g < boost), None) for run in gaps]
        score = sum(1 for e in ends if e is not None and lo <= e <= hi)
        key = (score, b - a, boost)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best is not None else 0.0


def write_tiny_marian(directory: Path, seed: int = 0) -> Path:
    """A random opus-mt-en-zh-shaped Marian model and its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = _train_spm(ENGLISH.splitlines(), 160)
    target = _train_spm(CHINESE.splitlines(), 320)
    (directory / "source.spm").write_bytes(source)
    (directory / "target.spm").write_bytes(target)
    tokens = ["</s>", "<unk>", *TARGET_TOKENS]
    for piece in _spm_pieces(source) + _spm_pieces(target):
        if piece not in tokens:
            tokens.append(piece)
    tokens.append("<pad>")  # last, as in opus-mt: the CTranslate2 converter drops it
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    n, pad, eos = len(tokens), len(tokens) - 1, 0
    tokenizer = MarianTokenizer(str(directory / "source.spm"), str(directory / "target.spm"),
                                str(directory / "vocab.json"), source_lang="en", target_lang="zh")
    config = MarianConfig(
        vocab_size=n, decoder_vocab_size=n, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=256, activation_function="swish", scale_embedding=True,
        init_std=0.1,  # the default 0.02 gives the same output whatever the input
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=False)  # tied: one output for every input
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    with torch.no_grad():
        model.model.shared.weight[pad].zero_()  # the decoder starts from a zero embedding
    # What opus-mt's generation_config says (pad never generated, eos forced at max_length).
    model.generation_config = GenerationConfig(
        bad_words_ids=[[pad]], decoder_start_token_id=pad, eos_token_id=eos, forced_eos_token_id=eos,
        pad_token_id=pad, max_length=512, num_beams=1)

    def gaps(text: str, steps: int = 24) -> list[float]:
        enc = tokenizer([f"{TARGET_TOKENS[0]} {text}"], return_tensors="pt")
        out, dec = [], torch.tensor([[pad]])
        with torch.no_grad():
            for _ in range(steps):
                logits = model(**enc, decoder_input_ids=dec).logits[0, -1].clone()
                eos_logit = logits[eos].item()
                logits[[eos, pad]] = -float("inf")
                out.append(logits.max().item() - eos_logit)
                dec = torch.cat([dec, logits.argmax().view(1, 1)], dim=1)
        return out

    calib = [*SAMPLE_TEXTS, *ENGLISH.splitlines()[:6]]
    boost = _best_threshold([gaps(t) for t in calib])
    with torch.no_grad():
        model.final_logits_bias[0, eos] = boost
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_ct2(marian_dir: Path, directory: Path, quantization: str = "int8") -> Path:
    """The tiny Marian converted to CTranslate2 (self-contained: tokenizer files copied in)."""
    from captioners.ct2 import convert_marian

    return convert_marian(marian_dir, directory, quantization=quantization)


def _train_bpe(lines: Sequence[str], specials: list[str], vocab_size: int = 400) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def write_tiny_llm(directory: Path, seed: int = 0) -> Path:
    """A random Qwen2ForCausalLM with a byte-level BPE tokenizer and a Qwen-like chat template."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe((ENGLISH + CHINESE).splitlines(), specials),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, padding_side="left",
        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    n = len(tokenizer)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        initializer_range=0.1,  # the default 0.02 gives nearly the same output whatever the input
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)

    # Calibrate the end token's output row: w_eos = scale * u, u the mean final hidden state.
    from captioners.llm_translate import build_prompt

    def run(text: str, steps: int = 24) -> tuple[list[torch.Tensor], list[float]]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": build_prompt(text)}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
        hidden, best = [], []
        with torch.no_grad():
            for _ in range(steps):
                h = model.model(input_ids=ids).last_hidden_state[0, -1]
                logits = model.lm_head(h).clone()
                logits[[eos, pad]] = -float("inf")
                hidden.append(h)
                best.append(logits.max().item())
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        return hidden, best

    runs = [run(t) for t in SAMPLE_TEXTS]
    u = torch.stack([h for hs, _ in runs for h in hs]).mean(0)
    u = u / u.norm()
    # The eos logit becomes scale * (h . u): it wins at step t once scale > best_t / (h_t . u).
    ratios = [[best / float(h @ u) if float(h @ u) > 0 else float("inf") for h, best in zip(hs, bs, strict=True)]
              for hs, bs in runs]
    scale = _best_threshold(ratios)
    with torch.no_grad():
        model.lm_head.weight[eos] = scale * u
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_all(directory: Path) -> dict[str, Path]:
    """All three under ``directory``: {"marian": ..., "ctranslate2": ..., "llm": ...}."""
    directory = Path(directory)
    marian = write_tiny_marian(directory / "tiny-marian")
    return {"marian": marian, "ctranslate2": write_tiny_ct2(marian, directory / "tiny-marian-ct2"),
            "llm": write_tiny_llm(directory / "tiny-llm")}

