"""The VLM captioner backends on tiny random models (built offline once per module), and the
repetition-loop check.

* cogvlm: a CogVLM-shaped folder loaded through transformers' real remote-code path.
* transformers: Qwen2-VL and SmolVLM (Idefics3) with their real processors and chat templates.

Outputs are random text; what is checked is the plumbing: one string per request, in order, token
counts and cut-offs, greedy reruns equal, left-padded batches equal to one-by-one runs (float32 on
CPU: the padded positions are masked out exactly, and the tiny models' logits have no near-ties on
these inputs), the prompt (with the OCR hint) and the image reaching the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from PIL import Image

from captioners import build_captioner
from captioners.base import OCR_HINT, CaptionRequest, ModelMissing
from captioners.cogvlm import (
    COGVLM2_TRANSFORMERS,
    CogVLMCaptioner,
    RemoteCodeRefused,
    transformers_in_range,
)
from captioners.hf_vlm import ChatVLMCaptioner
from captioners.repetition import is_repetitive, loops, units
from schemas.config import ConfigError

BACKENDS = ("cogvlm", "qwen2vl", "smolvlm")
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    from captioners.tiny_vlms import write_all

    return write_all(tmp_path_factory.mktemp("tiny-vlms"))


def section(name: str, path: Path, **kw) -> dict:
    """A caption config section; CPU float32 even where there is a GPU (the equalities below are exact)."""
    common = {"path": str(path), "max_new_tokens": MAX_NEW, "device": "cpu", "dtype": "float32"}
    if name == "cogvlm":
        return {"backend": "cogvlm", "trust_remote_code": True, **common, **kw}
    return {"backend": "transformers", **common, **kw}


@pytest.fixture(scope="module")
def captioners(tiny_dirs) -> dict:
    out = {}
    for name in BACKENDS:
        c = build_captioner(section(name, tiny_dirs[name]))
        c.check()
        c.load()
        out[name] = c
    return out


def image(w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 4):  # some structure, so the vision encoders see more than one colour
        for y in range(0, h, 5):
            img.putpixel((x, y), (255 - colour[0], (x * 7) % 256, (y * 11) % 256))
    return img


REQUESTS = [
    CaptionRequest(image(48, 32, (200, 30, 30)), caption="a red thing"),
    CaptionRequest(image(24, 40, (30, 200, 30)), ocr_text="OPEN 24h"),
    CaptionRequest(image(64, 64, (30, 30, 200)), caption="a blue square", ocr_text="  "),
]


def with_params(c, **update):
    clone = type(c).__new__(type(c))
    clone.__dict__.update(c.__dict__)
    clone.params = c.params.model_copy(update=update)
    return clone


@pytest.mark.parametrize("name", BACKENDS)
def test_batch_of_three_captions(captioners, name):
    c = captioners[name]
    assert type(c) is (CogVLMCaptioner if name == "cogvlm" else ChatVLMCaptioner)
    out = c.caption(REQUESTS)
    assert len(out) == 3
    for g in out:
        assert isinstance(g.text, str) and g.text
        assert 1 <= g.tokens <= MAX_NEW
        assert g.truncated == (g.tokens == MAX_NEW)
    assert c.caption(REQUESTS) == out  # greedy: a rerun writes the same captions
    assert c.caption([]) == []


@pytest.mark.parametrize("name", BACKENDS)
def test_batch_equals_one_by_one(captioners, name):
    """Left padding is masked out exactly: each row of the batch is what it would be alone (float32)."""
    c = captioners[name]
    assert c.caption(REQUESTS) == [c.caption([r])[0] for r in REQUESTS]
    assert c.caption(REQUESTS[::-1]) == c.caption(REQUESTS)[::-1]


@pytest.mark.parametrize("name", BACKENDS)
def test_image_and_prompt_reach_the_model(captioners, name):
    c = captioners[name]
    red, blue = REQUESTS[0].image, REQUESTS[2].image
    same_prompt = c.caption([CaptionRequest(red), CaptionRequest(blue)])
    assert same_prompt[0] != same_prompt[1]  # only the image differs
    same_image = c.caption([CaptionRequest(red), CaptionRequest(red, ocr_text="SALE")])
    assert same_image[0] != same_image[1]  # only the OCR hint differs


@pytest.mark.parametrize("name", BACKENDS)
def test_max_new_tokens_two_is_truncated(captioners, name):
    c = with_params(captioners[name], max_new_tokens=2)
    out = c.caption(REQUESTS)
    assert [(g.tokens, g.truncated) for g in out] == [(2, True)] * 3


def test_ocr_hint_in_prompt(captioners):
    hint = OCR_HINT.format(ocr_text="OPEN 24h")
    c = captioners["qwen2vl"]
    assert hint in c.prompt_for(REQUESTS[1])
    assert "OCR read" not in c.prompt_for(REQUESTS[0])
    assert "OCR read" not in c.prompt_for(REQUESTS[2])  # blank OCR text: no hint
    assert "{ocr_hint}" not in c.prompt_for(REQUESTS[1])
    # What the model is given: the chat-rendered prompt holds the hint ...
    for name in ("qwen2vl", "smolvlm"):
        c = captioners[name]
        text = c.processor.apply_chat_template(c.messages_for(REQUESTS[1]), add_generation_prompt=True,
                                               tokenize=False)
        assert hint in text
    # ... and so do CogVLM's built input ids, after the image positions.
    cog = captioners["cogvlm"]
    row = cog.rows_for([REQUESTS[1]])[0]
    lang = row["input_ids"][row["token_type_ids"] == 0]
    decoded = cog.tokenizer.decode(lang, skip_special_tokens=True)
    assert hint in decoded and decoded.rstrip().endswith("Answer:")
    assert int((row["token_type_ids"] == 1).sum()) == (32 // 4 // 2) ** 2 + 2


def test_cogvlm_left_padding(captioners):
    cog = captioners["cogvlm"]
    rows = cog.rows_for([REQUESTS[0], REQUESTS[1]])
    batch = cog.collate(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths[0] < lengths[1]  # the OCR hint makes the second longer
    short = max(lengths) - lengths[0]
    assert batch["attention_mask"][0, :short].sum() == 0 and batch["attention_mask"][0, short:].all()
    assert (batch["input_ids"][0, :short] == cog.tokenizer.pad_token_id).all()
    assert (batch["token_type_ids"][0, :short] == 0).all()
    assert [len(i) for i in batch["images"]] == [1, 1]


def test_qwen_max_pixels_shrinks_images(tiny_dirs):
    base = build_captioner(section("qwen2vl", tiny_dirs["qwen2vl"]))
    small = build_captioner(section("qwen2vl", tiny_dirs["qwen2vl"], max_pixels=8 * 8 * 4))
    base.load()
    small.load()
    req = [CaptionRequest(image(64, 64, (10, 120, 200)))]
    n_base = int(base.inputs_for(req)["image_grid_thw"].prod())
    n_small = int(small.inputs_for(req)["image_grid_thw"].prod())
    assert n_small < n_base
    assert small.caption(req)[0].tokens >= 1


def test_pixel_bounds_refused_for_smolvlm(tiny_dirs):
    c = build_captioner(section("smolvlm", tiny_dirs["smolvlm"], min_pixels=1024))
    with pytest.raises(ConfigError, match="min_pixels/max_pixels apply to Qwen-VL"):
        c.load()


def test_cogvlm_refuses_without_trust_remote_code(tiny_dirs, tmp_path, monkeypatch):
    """No remote code runs: the copied modeling file gets its own marker, which must stay unset."""
    import transformers.dynamic_module_utils as dmu

    folder = tmp_path / "refuse-cogvlm"
    shutil.copytree(tiny_dirs["cogvlm"], folder)
    marker = f"TINY_COGVLM_REFUSE_{os.getpid()}_{time.time_ns()}"
    modeling = folder / "modeling_tinycogvlm.py"
    src = modeling.read_text()
    assert 'LOADED_MARKER = "TINY_COGVLM_MODELING_LOADED"' in src
    modeling.write_text(src.replace('"TINY_COGVLM_MODELING_LOADED"', f'"{marker}"'))

    calls = []
    real = dmu.get_class_in_module  # what imports a folder's module (get_class_from_dynamic_module calls it)
    monkeypatch.setattr(dmu, "get_class_in_module", lambda *a, **k: calls.append(a) or real(*a, **k))
    c = build_captioner({"backend": "cogvlm", "path": str(folder)})  # trust_remote_code defaults to False
    c.check()  # the folder is fine
    with pytest.raises(RemoteCodeRefused) as err:
        c.load()
    assert isinstance(err.value, ConfigError)
    msg = str(err.value)
    assert str(folder) in msg and "Python code" in msg and "trust_remote_code: true" in msg
    assert marker not in os.environ
    assert not calls
    assert not [m for m in sys.modules if "refuse_cogvlm" in m or "refuse-cogvlm" in m]
    assert c.model is None

    # The control: with trust_remote_code the same folder's code does run (so the checks above can fail).
    ok = build_captioner({"backend": "cogvlm", "path": str(folder), "trust_remote_code": True, "max_new_tokens": 2})
    ok.load()
    assert os.environ.get(marker) == "1" and calls
    assert ok.caption(REQUESTS[:1])[0].tokens == 2


def test_cogvlm_warns_about_transformers_version(tiny_dirs, caplog):
    assert COGVLM2_TRANSFORMERS == ">=4.40.2,<4.42"
    assert transformers_in_range("4.40.2") and transformers_in_range("4.41.3") and transformers_in_range("4.41.0.dev0")
    assert not transformers_in_range("4.42.3") and not transformers_in_range("4.40.1")
    assert not transformers_in_range("5.24.0")
    import transformers

    c = build_captioner(section("cogvlm", tiny_dirs["cogvlm"]))
    with caplog.at_level(logging.WARNING, logger="captioners.cogvlm"):
        c.load()
    expect_warning = not transformers_in_range(transformers.__version__)
    assert any(COGVLM2_TRANSFORMERS in r.getMessage() for r in caplog.records) == expect_warning


@pytest.mark.parametrize("backend", ["cogvlm", "transformers"])
def test_missing_folder_is_named_fast(tmp_path, backend):
    missing = tmp_path / "no-such-model"
    c = build_captioner({"backend": backend, "path": str(missing)})
    start = time.monotonic()
    with pytest.raises(ModelMissing, match=str(missing)):
        c.check()
    assert time.monotonic() - start < 1.0


def test_cogvlm_check_wants_a_remote_code_folder(tiny_dirs):
    c = build_captioner({"backend": "cogvlm", "path": str(tiny_dirs["qwen2vl"]), "trust_remote_code": True})
    with pytest.raises(ModelMissing, match="auto_map"):
        c.check()


def test_params_are_validated():
    with pytest.raises(ValueError):
        build_captioner({"backend": "cogvlm", "path": "/x", "template_version": "nope"})
    with pytest.raises(ValueError):
        build_captioner({"backend": "transformers", "path": "/x", "template_version": "chat"})  # cogvlm's field
    assert build_captioner({"backend": "cogvlm", "path": "/x"}).params.template_version == "chat"


# -- repetition loops -----------------------------------------------------------------------------------

NORMAL_EN = (
    "The image shows a busy street market at dusk in an old town, with rows of stalls under striped awnings "
    "selling fruit, vegetables, spices and handmade baskets. In the foreground a woman in a red coat holds a paper "
    "bag of oranges while a boy beside her points at a cart of roasted chestnuts. Behind them, strings of warm "
    "yellow lights hang between the buildings, whose stone walls are covered in ivy and old painted signs. A sign "
    'above the bakery reads "Panificio Rossi" in gold letters. Further back, a church tower rises against a purple '
    "sky with a few thin clouds. The style is a realistic photograph with soft evening light, shallow depth of "
    "field and a slightly warm colour grade. There are about twenty people in the picture, most of them walking "
    "away from the camera toward the church, and two dogs, one white and one brown, near the fountain.")
NORMAL_ZH = (
    "图片中是一条黄昏时分老城区繁忙的街市，一排排摊位搭着条纹遮阳篷，出售水果、蔬菜、香料和手工编织的篮子。"
    "前景中一位穿红色外套的女士拿着一袋橙子，她身边的男孩指着一辆卖烤栗子的推车。后面的建筑之间挂着一串串暖黄色的灯，"
    "石墙上爬满了常春藤和旧的彩绘招牌。面包店上方的招牌用金色字写着“罗西面包店”。远处一座教堂的钟楼耸立在紫色的天空下。")


@pytest.mark.parametrize("text", [
    NORMAL_EN, NORMAL_ZH, "A red bus.", "very very very good", "a red car, a red car, and a blue car",
    "A poster with the words SALE SALE SALE in yellow on a black background, two people in front of it.",
    'A neon sign reading "哈哈哈" above a noodle shop, 一只猫 sits by the door. ' + NORMAL_EN,
    "", "   ", "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
])
def test_normal_captions_are_not_repetitive(text):
    assert not is_repetitive(text)


@pytest.mark.parametrize("text", [
    "A cat sits on a sofa. " + "The cat is black and white, " * 12,  # an English phrase loop at the end
    "一只猫坐在沙发上。" + "猫是黑白相间的，" * 10,  # a Chinese loop (characters, punctuation ignored)
    "一只猫坐在沙发上" + "的" * 25,  # one character over and over
    "He laughs: " + "ha" * 30,  # a loop inside one word
    "A photo of a " + "very " * 30,  # one word over and over
    "A dog. " + "a red car and a blue car, " * 6 + "a red ca",  # cut off inside the last copy and word
    "Intro. " + "a big red bus, " * 40 + NORMAL_EN,  # a loop in the middle, then normal text
    NORMAL_ZH + "，".join(["红色的灯笼", "金色的屋顶"] * 30),  # two alternating Chinese phrases
])
def test_loops_are_repetitive(text):
    assert is_repetitive(text)


def test_units_split_words_and_cjk():
    assert units("A Red-bus, 一只猫!") == ["a", "red", "bus", "一", "只", "猫"]
    assert loops(units("x y z " * 5)) == ((3, 15), (3, 15))


def test_one_megabyte_is_fast():
    import random

    random.seed(0)
    words = NORMAL_EN.split()
    varied = " ".join(random.choice(words) for _ in range(180_000))[:1_000_000]  # 1 MB, no loop
    loop = "the same words again and again " * (1_000_000 // 31)
    chinese = (NORMAL_ZH * 2000)[:340_000]  # about 1 MB of UTF-8
    start = time.monotonic()
    assert not is_repetitive(varied)
    assert is_repetitive(loop)
    assert is_repetitive(chinese)  # the same paragraph 2000 times
    assert is_repetitive("x" * 1_000_000)  # a loop inside one "word"
    assert not is_repetitive("supercalifragilistic" * 2 + " " + varied[:10_000])
    assert time.monotonic() - start < 5.0
