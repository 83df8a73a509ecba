"""Synthetic Chinese text images: word list, fonts, rendering, captions (synth_text)."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from synth_text.captions import caption_for, color_name, font_description
from synth_text.config import BACKGROUNDS, LAYOUTS, SynthConfig
from synth_text.fonts import DEFAULT_FAMILIES, Font, FontError, discover_fonts, fonts_covering, load_fonts
from synth_text.render import RenderError, contrast_ratio, encode_jpeg, render_sample
from synth_text.words import is_han, phrase, phrase_lines, split_lines, top_words

pytestmark = pytest.mark.timeout(120)

EXT_B = "\U00020000"  # CJK Extension B: in none of the installed fonts
EMOJI = "\U0001f600"
NOTO_SANS_ONLY = "\u9fef"  # a Unicode 11 ideograph only Noto Sans CJK has (of the installed fonts)


@pytest.fixture(scope="module")
def fonts() -> list[Font]:
    found = discover_fonts()
    if not found:
        pytest.skip("no CJK fonts installed")
    return found


@pytest.fixture(scope="module")
def words() -> list[str]:
    return top_words(50000)


@pytest.fixture(scope="module")
def busy_photo() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.random((300, 400, 3)) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- words


def test_top_words_order_and_filter(words):
    assert words[:5] == ["了", "是", "在", "和", "有"]  # what jieba 0.42.1's dict.txt really ranks first
    assert "的" in words[:10] and "中国" in words[:1000]
    assert len(words) == 50000 and len(set(words)) == 50000
    assert all(is_han(w) for w in words)
    every = top_words()
    assert len(every) == 348974
    assert every[:50000] == words
    assert not any(ch.isascii() for w in every for ch in w)
    assert top_words(3) == ["了", "是", "在"]


@pytest.mark.parametrize("n", [0, -1, 348975])
def test_top_words_n_validation(n):
    with pytest.raises(ValueError, match="between 1 and 348974"):
        top_words(n)


def test_is_han():
    assert is_han("春节") and is_han("\u3400")
    for bad in ("", "B超", "c#", "一、", "中 国", "ＡＢ", EXT_B):
        assert not is_han(bad)


def test_phrase_deterministic(words):
    assert phrase(words, 3, 17, 4) == phrase(words, 3, 17, 4)
    assert len({phrase(words, 3, i, 3) for i in range(20)}) > 15
    assert phrase(words, 3, 17, 4) != phrase(words, 4, 17, 4)
    lines = phrase_lines(words, 3, 17, 4, 3)
    assert len(lines) == 3 and "".join(lines) == phrase(words, 3, 17, 4)
    assert split_lines(["一二三", "四", "五六"], 2) == ["一二三", "四五六"]
    assert split_lines(["一", "二"], 3) == ["一", "二"]
    with pytest.raises(ValueError):
        phrase([], 0, 0, 2)


# --------------------------------------------------------------------------------------------- fonts


def test_discover_fonts(fonts):
    families = {f.family for f in fonts}
    assert set(DEFAULT_FAMILIES) <= families, families
    sans = {f.style for f in fonts if f.family == "Noto Sans CJK SC"}
    assert {"Regular", "Bold", "Black", "Light"} <= sans
    serif = {f.style for f in fonts if f.family == "Noto Serif CJK SC"}
    assert len(serif) >= 3
    assert fonts == sorted(fonts, key=lambda f: (f.family, f.style, f.path, f.index))
    bold = next(f for f in fonts if f.family == "Noto Sans CJK SC" and f.style == "Bold")
    assert bold.name == "Noto Sans CJK SC Bold" and bold.path.endswith(".ttc")
    assert discover_fonts() == fonts
    assert [f.family for f in discover_fonts(["WenQuanYi Zen Hei"])] == ["WenQuanYi Zen Hei"]


def test_covers(fonts):
    assert all(f.covers("春节快乐") for f in fonts)
    assert not any(f.covers(EXT_B) for f in fonts)
    arphic = [f for f in fonts if f.family.startswith("AR PL")]
    assert arphic and not any(f.covers(EMOJI) for f in arphic)
    assert not any(f.covers("春" + EXT_B) for f in fonts)
    only = fonts_covering(fonts, NOTO_SANS_ONLY)
    assert only and {f.family for f in only} == {"Noto Sans CJK SC"}
    assert fonts_covering(fonts, "春节") == fonts


def test_font_errors(tmp_path, caplog):
    missing = tmp_path / "nope.ttf"
    with pytest.raises(FontError, match=r"nope\.ttf"):
        load_fonts([str(missing)])
    corrupt = tmp_path / "broken.ttf"
    corrupt.write_bytes(b"\x00\x01\x00\x00" + b"garbage" * 50)
    with pytest.raises(FontError, match=r"broken\.ttf"):
        load_fonts([str(corrupt)])
    truncated = tmp_path / "half.ttc"
    truncated.write_bytes(b"ttcf" + b"\x00" * 40)
    with pytest.raises(FontError, match=r"half\.ttc"):
        load_fonts([str(truncated)])
    assert issubclass(FontError, ValueError)
    ukai = "/usr/share/fonts/truetype/arphic/ukai.ttc"
    (tmp_path / "ukai.ttc").symlink_to(ukai)
    with caplog.at_level(logging.WARNING, logger="synth_text.fonts"):
        found = discover_fonts(["AR PL UKai CN"], dirs=[str(tmp_path)])
    assert [f.family for f in found] == ["AR PL UKai CN"]
    assert "broken.ttf" in caplog.text and "half.ttc" in caplog.text
    loaded = load_fonts([str(tmp_path / "ukai.ttc")])
    assert {f.family for f in loaded} >= {"AR PL UKai CN", "AR PL UKai TW"}


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "bad",
    [
        {"sizes": [(300, 512)]},
        {"sizes": [(128, 128)]},
        {"sizes": [(4096, 512)]},
        {"layouts": {"diagonal": 1.0}},
        {"layouts": {"single": -1.0, "vertical": 2.0}},
        {"backgrounds": {"solid": 0.0}},
        {"backgrounds": {"video": 1.0}},
        {"words": 0},
        {"per_word": 0},
        {"colour": "red"},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValidationError):
        SynthConfig(**bad)


def test_config_defaults():
    cfg = SynthConfig()
    assert cfg.words == 50000 and cfg.min_contrast == 4.5 and cfg.words_per_shard == 500
    assert (1024, 1024) in cfg.sizes and all(min(s) >= 512 and max(s) <= 1344 for s in cfg.sizes)
    assert set(cfg.layouts) == set(LAYOUTS) and max(cfg.layouts, key=cfg.layouts.get) == "single"
    assert cfg.layouts["vertical"] < 0.2 and set(cfg.backgrounds) == set(BACKGROUNDS)
    with pytest.raises(ValidationError):
        cfg.seed = 3  # frozen


# --------------------------------------------------------------------------------------------- render


def _inside(pt, quad, tol):
    """pt inside the convex quad grown by tol pixels."""
    cx = sum(p[0] for p in quad) / 4
    cy = sum(p[1] for p in quad) / 4
    sign = None
    for (x0, y0), (x1, y1) in zip(quad, quad[1:] + quad[:1], strict=True):
        ex, ey = x1 - x0, y1 - y0
        length = max((ex * ex + ey * ey) ** 0.5, 1e-9)
        cross = (ex * (pt[1] - y0) - ey * (pt[0] - x0)) / length  # signed distance from the edge
        inner = ex * (cy - y0) - ey * (cx - x0)
        if sign is None:
            sign = 1.0 if inner >= 0 else -1.0
        if cross * sign < -tol:
            return False
    return True


def _check(r, cfg, fonts):
    w, h = r.image.size
    assert r.image.mode == "RGB" and (w, h) in [tuple(s) for s in cfg.sizes]
    assert r.font in fonts and r.font.covers(r.text.replace("\n", ""))
    assert r.text == "\n".join(r.lines) and all(r.lines)
    assert min(r.line_sizes) >= cfg.min_text_px and r.font_size == max(r.line_sizes)
    assert len(r.line_boxes) == len(r.lines)
    assert len(r.char_boxes) == sum(len(line) for line in r.lines)
    for q in r.line_boxes + r.char_boxes:
        assert len(q) == 4
        for x, y in q:
            assert 0 <= x <= w and 0 <= y <= h
    k = 0
    for line, lq in zip(r.lines, r.line_boxes, strict=True):
        for _ in line:
            assert all(_inside(p, lq, 1.5) for p in r.char_boxes[k]), (r.layout, k)
            k += 1
    assert abs(r.rotation) <= cfg.max_rotation_deg
    assert r.contrast >= cfg.min_contrast - 1e-6


def test_render_deterministic(fonts, words):
    cfg = SynthConfig(seed=5)
    a = render_sample("春节快乐", 3, cfg, fonts, words)
    b = render_sample("春节快乐", 3, cfg, fonts, words)
    assert a.image.tobytes() == b.image.tobytes()
    assert encode_jpeg(a.image, 92) == encode_jpeg(b.image, 92)
    assert (a.text, a.font, a.line_boxes, a.contrast) == (b.text, b.font, b.line_boxes, b.contrast)
    others = [render_sample("春节快乐", i, cfg, fonts, words) for i in range(4, 8)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)
    assert len({(o.layout, o.font, o.image.size, o.background) for o in [a, *others]}) > 1
    c = render_sample("春节快乐", 3, SynthConfig(seed=6), fonts, words)
    assert c.image.tobytes() != a.image.tobytes()
    jpg = encode_jpeg(a.image, 92)
    assert jpg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpg)).size == a.image.size


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("background", BACKGROUNDS)
def test_every_layout_and_background(layout, background, fonts, words, busy_photo):
    sizes = [(512, 512), (1344, 768), (768, 1344), (256, 256)]
    cfg = SynthConfig(seed=1, sizes=sizes, layouts={layout: 1.0}, backgrounds={background: 1.0}, rotation_prob=0.5)
    seen_sizes = set()
    for i, word in enumerate(["中国", "发展", "春节快乐", "了", "社会主义"]):
        r = render_sample(word, i, cfg, fonts, words, photos=[busy_photo])
        seen_sizes.add(r.image.size)
        _check(r, cfg, fonts)
        assert r.background == background
        assert r.lines[0] == word or word in r.text
        if r.layout != layout:  # only when the layout cannot fit, it falls back to one line
            assert r.layout == "single"
        if background in ("solid", "gradient"):
            assert r.contrast >= cfg.min_contrast
        if r.stroke_color is None and r.plate_color is None:
            assert r.background_contrast >= cfg.min_contrast
        assert caption_for(r, 1, i)
    assert len(seen_sizes) >= 2



def test_layouts_stay_readable_at_the_detector_size(fonts, words):
    """What the OCR check measured (bench --only synth): lone glyphs are capped at 0.3 of the short side, stacked
    lines have at least three characters and a gap of half a line, and fillers use common characters only."""
    from synth_text.render import MIN_LINE_CHARS, _common_char

    assert _common_char("的") and _common_char("国") and not _common_char("鍚") and not _common_char("國")
    cfg = SynthConfig(sizes=[(1024, 1024), (1344, 768)], rotation_prob=0.0)
    seen = set()
    for i, word in enumerate(words[:120]):
        r = render_sample(word, i, cfg, fonts, words)
        seen.add(r.layout)
        assert r.font_size <= 0.3 * min(r.image.size) + 1
        if r.layout in ("multiline", "title_subtitle"):
            fillers = "".join(r.lines)[len(word):]  # the word starts the first line
            assert fillers and all(_common_char(ch) for ch in fillers)
            lines = r.lines if r.layout == "multiline" else r.lines[1:]  # a title is the word, however long
            assert all(len(line) >= MIN_LINE_CHARS for line in lines)
            for a, b, size in zip(r.line_boxes, r.line_boxes[1:], r.line_sizes, strict=False):
                assert min(p[1] for p in b) - max(p[1] for p in a) >= 0.3 * size
    assert seen == set(LAYOUTS)

def test_layout_shapes(fonts, words):
    cfg = SynthConfig(sizes=[(1024, 1024)], layouts={"vertical": 1.0}, rotation_prob=0.0)
    v = render_sample("春节快乐", 0, cfg, fonts, words)
    assert v.layout == "vertical" and v.lines == ["春节快乐"]
    xs = [sum(p[0] for p in q) / 4 for q in v.char_boxes]
    ys = [sum(p[1] for p in q) / 4 for q in v.char_boxes]
    assert max(xs) - min(xs) < 0.2 * v.font_size and ys == sorted(ys)  # one under the other
    cfg = SynthConfig(sizes=[(1024, 1024)], layouts={"title_subtitle": 1.0}, rotation_prob=0.0)
    t = render_sample("春节", 0, cfg, fonts, words)
    assert t.layout == "title_subtitle" and len(t.lines) == 2 and t.lines[0] == "春节"
    assert t.line_sizes[1] < t.line_sizes[0]
    assert max(p[1] for p in t.line_boxes[0]) < min(p[1] for p in t.line_boxes[1])  # no overlap
    cfg = SynthConfig(sizes=[(1024, 1024)], layouts={"multiline": 1.0}, rotation_prob=0.0)
    for i in range(5):
        m = render_sample("春节", i, cfg, fonts, words)
        assert m.layout == "multiline" and 2 <= len(m.lines) <= 3 and m.lines[0].startswith("春节")
        for a, b in zip(m.line_boxes, m.line_boxes[1:], strict=False):
            assert max(p[1] for p in a) < min(p[1] for p in b)
    no_words = render_sample("春节", 0, SynthConfig(layouts={"multiline": 1.0}), fonts, [])
    assert no_words.layout == "single" and no_words.lines == ["春节"]
    cfg = SynthConfig(rotation_prob=1.0, max_rotation_deg=8.0, sizes=[(512, 512)], layouts={"single": 1.0})
    rots = [render_sample("中国", i, cfg, fonts, words).rotation for i in range(8)]
    assert all(0 < abs(a) <= 8.0 for a in rots)


def test_boxes_match_ink(fonts, words):
    """Rotated char boxes cover the glyphs actually drawn (checked on solid backgrounds)."""
    cfg = SynthConfig(backgrounds={"solid": 1.0}, rotation_prob=1.0, sizes=[(512, 512), (768, 1344)])
    for i in range(12):
        r = render_sample(words[i * 101], i, cfg, fonts, words)
        a = np.asarray(r.image).astype(int)
        ink = np.abs(a - a[0, 0]).sum(-1) > 60
        cover = Image.new("L", r.image.size, 0)
        draw = ImageDraw.Draw(cover)
        for q in r.char_boxes:
            draw.polygon(q, fill=255, outline=255)
        outside = (ink & (np.asarray(cover) == 0)).sum() / max(1, ink.sum())
        assert outside < 0.03, (i, r.layout, r.rotation, outside)


def test_busy_photo_gets_stroke_or_plate(fonts, words, busy_photo):
    cfg = SynthConfig(backgrounds={"photo": 1.0}, sizes=[(512, 512)])
    results = [render_sample(w, i, cfg, fonts, words, photos=[busy_photo]) for i, w in enumerate(words[:16])]
    helped = [r for r in results if r.stroke_color is not None or r.plate_color is not None]
    assert helped, "random-noise photos need an outline or a plate"
    assert any(r.stroke_color for r in helped) and any(r.plate_color for r in helped)
    for r in results:
        assert r.contrast >= cfg.min_contrast
        if r.stroke_color is not None:
            assert contrast_ratio(r.text_color, r.stroke_color) >= cfg.min_contrast
    # without photos the photo share falls back to another kind
    r = render_sample("中国", 0, cfg, fonts, words)
    assert r.background != "photo"


def test_font_choice_covers_text(fonts, words):
    word = "春" + NOTO_SANS_ONLY
    for i in range(6):
        r = render_sample(word, i, SynthConfig(), fonts, words)
        assert r.font.family == "Noto Sans CJK SC" and r.font.covers(r.text.replace("\n", ""))


def test_uncoverable_word(fonts, words):
    with pytest.raises(RenderError, match="U\\+20000"):
        render_sample("春" + EXT_B, 0, SynthConfig(), fonts, words)
    with pytest.raises(RenderError):
        render_sample("春节", 0, SynthConfig(), [], words)
    ukai = [f for f in fonts if f.family == "AR PL UKai CN"]
    with pytest.raises(RenderError):
        render_sample("好" + EMOJI, 0, SynthConfig(), ukai, words)


def test_cannot_fit(fonts, words):
    long = "".join(words[100:130])[:30]
    assert len(long) == 30
    cfg = SynthConfig(sizes=[(256, 256)], min_text_px=64)
    for i in range(4):
        with pytest.raises(RenderError, match="cannot fit"):
            render_sample(long, i, cfg, fonts, words)
    # the same text fits a wide canvas with a small minimum
    r = render_sample(long, 0, SynthConfig(sizes=[(2048, 512)], min_text_px=24, layouts={"single": 1.0}), fonts, words)
    assert r.lines == [long]


def test_captions(fonts, words):
    cfg = SynthConfig()
    langs = set()
    for i in range(40):
        r = render_sample(words[i * 7], i, cfg, fonts, words)
        cap = caption_for(r, 0, i)
        assert cap == caption_for(r, 0, i)
        for line in r.lines:
            assert line in cap, (cap, r.lines)
        langs.add("zh" if any(is_han(ch) and ch not in r.text for ch in cap) else "en")
    assert langs == {"zh", "en"}
    assert color_name((0, 0, 0)) == "black" and color_name((255, 255, 255), "zh") == "白色"
    assert color_name((220, 30, 30)) == "red" and color_name((30, 60, 200)) == "blue"
    kai = next(f for f in fonts if f.family == "AR PL UKai CN")
    assert font_description(kai, "zh") == "楷体"


def test_speed(fonts, words, busy_photo):
    for size, n in (((512, 512), 150), ((1024, 1024), 40)):
        cfg = SynthConfig(sizes=[size])
        render_sample("中国", 0, cfg, fonts, words, photos=[busy_photo])
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            encode_jpeg(render_sample(words[i], i, cfg, fonts, words, photos=[busy_photo]).image, cfg.jpeg_quality)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"\nsynth render+jpeg {size[0]}x{size[1]}: {n / wall:.0f} img/s wall, {n / cpu:.0f} img/s per CPU-second")
