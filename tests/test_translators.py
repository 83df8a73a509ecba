"""EN->ZH translator backends on tiny random models (built offline, once per module), and the
placeholder protection of quoted text and proper nouns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from captioners import build_translator
from captioners.base import Generated, ModelMissing
from captioners.protect import placeholder, protect, restore
from captioners.tiny_translators import ENGLISH, SAMPLE_TEXTS
from schemas.config import ConfigError

TEXTS = list(SAMPLE_TEXTS)  # three lengths: 4, 17 and 35 words


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from captioners.tiny_translators import write_tiny_ct2, write_tiny_llm, write_tiny_marian

    root = tmp_path_factory.mktemp("tiny-translators")
    marian = write_tiny_marian(root / "marian")
    return {"marian": marian, "ctranslate2": write_tiny_ct2(marian, root / "ct2-int8"),
            "ct2-float32": write_tiny_ct2(marian, root / "ct2-float32", quantization="float32"),
            "llm": write_tiny_llm(root / "llm")}


_loaded: dict[tuple, object] = {}


def translator(tiny: dict[str, Path], backend: str, **params):
    """A loaded translator (cached per settings: loading is the slow part)."""
    path = params.pop("path", None) or tiny[backend]
    key = (backend, str(path), tuple(sorted(params.items())))
    if key not in _loaded:
        t = build_translator({"backend": backend, "path": str(path), **params})
        t.check()
        t.load()
        _loaded[key] = t
    return _loaded[key]


BACKENDS = ["marian", "ctranslate2", "llm"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_translates_a_batch_deterministically(tiny, backend):
    t = translator(tiny, backend, max_new_tokens=40)
    out = t.translate(TEXTS)
    assert len(out) == 3 and all(isinstance(g, Generated) and isinstance(g.text, str) for g in out)
    assert all(g.tokens > 0 for g in out)
    assert all(g.tokens <= 40 for g in out)
    # The tiny models' eos is calibrated to come within a few tokens: ended, so not truncated.
    assert any(not g.truncated for g in out)
    assert all(g.truncated == (g.tokens == 40) for g in out)
    assert t.translate(TEXTS) == out  # greedy: a rerun writes the same
    # Batched (padded) equals one by one: padding is masked (right padding for Marian's encoder,
    # left padding with position ids from the mask for the LLM). Holds exactly on these models;
    # a real model in float16 may flip a near-tie, which is why the stage does not rely on it.
    assert [t.translate([x])[0] for x in TEXTS] == out
    assert t.translate([]) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_new_tokens_cut_off_is_flagged(tiny, backend):
    out = translator(tiny, backend, max_new_tokens=2).translate(TEXTS)
    assert [(g.tokens, g.truncated) for g in out] == [(2, True)] * 3
    longer = translator(tiny, backend, max_new_tokens=40).translate(TEXTS)
    assert all(full.tokens >= 2 for full in longer) and any(not full.truncated for full in longer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_folder_is_named_by_check(tmp_path, backend):
    missing = tmp_path / "no-such-model"
    t = build_translator({"backend": backend, "path": str(missing)})
    start = time.perf_counter()
    with pytest.raises(ModelMissing, match=str(missing)):
        t.check()
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ModelMissing, match=str(missing)):
        t.load()


def test_ct2_check_names_what_the_folder_lacks(tiny, tmp_path):
    # A transformers Marian folder is not a CTranslate2 one: no model.bin.
    with pytest.raises(ModelMissing, match=r"model\.bin") as exc:
        build_translator({"backend": "ctranslate2", "path": str(tiny["marian"])}).check()
    assert str(tiny["marian"]) in str(exc.value)
    # A converted folder without the tokenizer files: named, unless tokenizer_path points at them.
    bare = tmp_path / "bare-ct2"
    bare.mkdir()
    for name in ("model.bin", "config.json", "shared_vocabulary.json"):
        (bare / name).write_bytes((tiny["ctranslate2"] / name).read_bytes())
    with pytest.raises(ModelMissing, match=r"source\.spm"):
        build_translator({"backend": "ctranslate2", "path": str(bare)}).check()
    t = translator(tiny, "ctranslate2", path=bare, tokenizer_path=str(tiny["marian"]), max_new_tokens=40)
    assert t.translate(TEXTS) == translator(tiny, "ctranslate2", max_new_tokens=40).translate(TEXTS)


def test_marian_check_needs_the_tokenizer_files(tiny, tmp_path):
    folder = tmp_path / "marian-no-spm"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny["marian"] / "config.json").read_bytes())
    with pytest.raises(ModelMissing, match=r"source\.spm"):
        build_translator({"backend": "marian", "path": str(folder)}).check()


@pytest.mark.parametrize("backend", ["marian", "ctranslate2"])
def test_target_token_missing_from_vocab_is_a_clear_error(tiny, backend):
    t = build_translator({"backend": backend, "path": str(tiny[backend]), "target_token": ">>xx_Fake<<"})
    t.check()  # the folder is fine; the token is a load-time (vocab) matter
    with pytest.raises(ConfigError, match=r">>xx_Fake<<.*>>cmn_Hans<<"):
        t.load()


def test_target_token_is_prepended_only_when_configured(tiny):
    default = translator(tiny, "ctranslate2", max_new_tokens=40)
    none = translator(tiny, "ctranslate2", max_new_tokens=40, target_token=None)
    assert default.tokenize("A red bus.")[0] == ">>cmn_Hans<<"
    assert none.tokenize("A red bus.")[0] != ">>cmn_Hans<<"
    assert default.tokenize("A red bus.")[1:] == none.tokenize("A red bus.")
    assert default.tokenize("A red bus.")[-1] == "</s>"
    marian = translator(tiny, "marian", max_new_tokens=40)
    assert marian.prefix == ">>cmn_Hans<< "
    assert translator(tiny, "marian", max_new_tokens=40, target_token=None).prefix == ""


def test_ct2_float32_matches_transformers(tiny):
    texts = [*TEXTS, *ENGLISH.splitlines()[:8]]
    hf = translator(tiny, "marian", max_new_tokens=30).translate(texts)
    ct2 = translator(tiny, "ctranslate2", path=tiny["ct2-float32"], compute_type="float32",
                     max_new_tokens=30).translate(texts)
    assert ct2 == hf
    # int8 weights may pick other tokens: it runs and returns one output per text.
    int8 = translator(tiny, "ctranslate2", max_new_tokens=30).translate(texts)
    assert len(int8) == len(texts) and all(g.tokens > 0 for g in int8)


def test_convert_marian_writes_a_self_contained_folder(tiny):
    folder = tiny["ctranslate2"]
    for name in ("model.bin", "config.json", "shared_vocabulary.json", "source.spm", "target.spm", "vocab.json"):
        assert (folder / name).is_file(), name
    # config.json is CTranslate2's own, not the transformers one.
    assert '"model_type"' not in (folder / "config.json").read_text()
    assert (folder / "source.spm").read_bytes() == (tiny["marian"] / "source.spm").read_bytes()


def test_llm_prompt_and_padding(tiny):
    t = translator(tiny, "llm", max_new_tokens=40)
    assert t.tokenizer.padding_side == "left"
    chat = t.chat("A red bus.")
    assert "A red bus." in chat and "⟦n⟧" in chat and chat.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match=r"\{text\}"):
        build_translator({"backend": "llm", "path": str(tiny["llm"]), "prompt": "Translate."})


# --- protect / restore -------------------------------------------------------------------------


def roundtrip(text: str, nouns=()) -> tuple[str, str, bool]:
    p = protect(text, nouns)
    out, ok = restore(p.text, p)
    return p.text, out, ok


def test_quoted_ascii_and_curly_quotes_are_kept_and_restored_in_chinese_quotes():
    p = protect('A sign reading "HAPPY NEW YEAR" and a banner saying “Sale 50%”.', [])
    assert p.text == "A sign reading ⟦0⟧ and a banner saying ⟦1⟧."
    assert [s.original for s in p.spans] == ['"HAPPY NEW YEAR"', "“Sale 50%”"]
    out, ok = restore("一个写着⟦0⟧的招牌和一条写着⟦1⟧的横幅。", p)
    assert ok and out == "一个写着“HAPPY NEW YEAR”的招牌和一条写着“Sale 50%”的横幅。"
    out, ok = restore("⟦1⟧，“⟦0⟧”，「⟦1⟧」", p)  # order may change; quotes the model adds are not doubled
    assert not ok and out == "“Sale 50%”，“HAPPY NEW YEAR”，「」"  # a repeat is dropped (and reported)
    out, ok = restore("“⟦0⟧”，「⟦1⟧」", p)
    assert ok and out == "“HAPPY NEW YEAR”，「Sale 50%」"


def test_chinese_text_in_quotes_is_kept_verbatim():
    p = protect('A red couplet reading "春节快乐" on the door.', [])
    assert restore("门上的红色对联写着⟦0⟧。", p) == ("门上的红色对联写着“春节快乐”。", True)


def test_proper_nouns_whole_words_case_sensitive_chinese_anywhere():
    nouns = ["Forbidden City", "故宫", "Rome", "City"]
    p = protect("The Forbidden City (故宫) at dusk; Romeo in Rome; the forbidden city; 北京故宫博物院.", nouns)
    assert p.text == "The ⟦0⟧ (⟦1⟧) at dusk; Romeo in ⟦2⟧; the forbidden city; 北京⟦3⟧博物院."
    assert [s.kind for s in p.spans] == ["noun"] * 4
    out, ok = restore(p.text, p)
    assert ok and out == "The Forbidden City (故宫) at dusk; Romeo in Rome; the forbidden city; 北京故宫博物院."


def test_quotes_win_over_nouns_and_nested_quotes_are_one_span():
    p = protect('a poster "Visit the Forbidden City" and “the “Coca-Cola” logo” here', ["Forbidden City"])
    assert p.text == "a poster ⟦0⟧ and ⟦1⟧ here"
    assert restore(p.text, p) == ('a poster “Visit the Forbidden City” and “the “Coca-Cola” logo” here', True)
    # ASCII quotes holding curly ones (and the reverse): the outer pair is the span.
    p = protect('"say “hi”" and “say "bye"”', [])
    assert [s.original for s in p.spans] == ['"say “hi”"', '“say "bye"”']


def test_unbalanced_and_empty_quotes_are_left_alone():
    for text in ['a 5" screen on a table', 'the word “open on a sign', 'an empty "" pair', 'closing” only']:
        masked, out, ok = roundtrip(text)
        assert masked == text and out == text and ok
    # An odd third quote stays; the first two pair up. ASCII quotes pair within one line only.
    assert protect('"a" b "c', []).text == '⟦0⟧ b "c'
    assert protect('say "a\nb" now', []).text == 'say "a\nb" now'


def test_text_with_no_spans_is_unchanged():
    text = "A cat sleeps on a blue sofa."
    p = protect(text, ["Forbidden City"])
    assert p.text == text and p.spans == ()
    assert restore("一只猫睡在蓝色沙发上。", p) == ("一只猫睡在蓝色沙发上。", True)


def test_dropped_placeholder_is_reported_and_no_syntax_left():
    p = protect('"A" and "B" near the Forbidden City', ["Forbidden City"])
    out, ok = restore("⟦0⟧和⟦2⟧附近", p)
    assert not ok and out == "“A”和Forbidden City附近"
    out, ok = restore("全丢了", p)
    assert not ok and out == "全丢了"


def test_duplicated_or_unknown_placeholder_is_reported_and_removed():
    p = protect('a "X" sign', [])
    out, ok = restore("⟦0⟧招牌⟦0⟧", p)
    assert not ok and out == "“X”招牌"
    out, ok = restore("⟦0⟧招牌⟦7⟧", p)
    assert not ok and out == "“X”招牌"


def test_placeholders_with_spaces_fullwidth_digits_or_lookalike_brackets_restore():
    p = protect('"A" "B" "C" "D"', [])
    assert p.text == "⟦0⟧ ⟦1⟧ ⟦2⟧ ⟦3⟧"
    out, ok = restore("⟦ 0 ⟧、⟦１⟧、〚2〛、⟦\u30003⟧", p)
    assert ok and out == "“A”、“B”、“C”、“D”"


def test_mangled_placeholder_restores_what_it_can_and_reports():
    p = protect('"A" "B" "C"', [])
    out, ok = restore("⟦0、1⟧、⟦⟧ ⟧⟦2⟧", p)  # lost brackets, an empty pair, a lone bracket
    assert not ok and out == "“A”、“B”、 “C”"
    assert not any(ch in out for ch in "⟦⟧〚〛")


def test_bracket_characters_in_the_input_survive():
    text = "a ⟦0⟧ literal and a “quote”"
    p = protect(text, [])
    assert p.text == "a ⟦0⟧0⟦1⟧ literal and a ⟦2⟧" and [s.kind for s in p.spans] == ["literal", "literal", "quote"]
    assert restore(p.text, p) == ("a ⟦0⟧ literal and a “quote”", True)


def test_placeholder_form():
    assert placeholder(12) == "⟦12⟧"
    assert protect('"a"', []).placeholders == ["⟦0⟧"]


def test_a_megabyte_is_linear():
    unit = 'A "quoted" word near the Forbidden City, 2023 and 5" of rain.\n'  # 5": unbalanced, to the line end
    text = unit * (1_000_000 // len(unit))
    start = time.perf_counter()
    p = protect(text, ["Forbidden City", "故宫"])
    out, ok = restore(p.text, p)
    assert ok and len(p.spans) == 2 * text.count(unit) and out.count("“quoted”") == text.count(unit)
    # Pathological runs: a megabyte of digits before a bracket, of spaces after one.
    assert restore("1" * 1_000_000 + "⟧", p)[1] is False
    assert restore("⟦" + " " * 1_000_000, p)[1] is False
    assert time.perf_counter() - start < 10
