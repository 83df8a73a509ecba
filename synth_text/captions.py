"""Captions for synthetic text images: Chinese and English templates that quote the drawn text exactly.

Every line of the drawn text appears verbatim inside the caption (multi-line text is quoted line by line, joined with
a space), so a text-to-image model learns to spell what the caption asks for.
"""

from __future__ import annotations

import colorsys
import random
from collections.abc import Sequence

from synth_text.fonts import Font
from synth_text.render import Rendered

__all__ = ["EN_TEMPLATES", "ZH_TEMPLATES", "caption_for", "color_name", "font_description"]

# {text}: all lines joined by a space; {title}/{subtitle}: the two lines of a title_subtitle poster;
# {font}: a font description; {color}: the text colour; {bg}: a background description; {n}: the number of lines.
ZH_TEMPLATES: dict[str, Sequence[str]] = {
    "single": (
        "一张海报，上面写着“{text}”",
        "一块招牌，上面用{font}写着“{text}”",
        "{bg}上的{color}文字“{text}”",
        "用{font}书写的“{text}”字样，{color}，{bg}",
        "一张图片，中间是{color}的“{text}”",
        "文字设计：“{text}”，{font}，{bg}",
    ),
    "title_subtitle": (
        "一张海报，大标题写着“{title}”，下面的小字是“{subtitle}”",
        "海报设计，标题“{title}”，副标题“{subtitle}”，{font}，{bg}",
        "{bg}上用{color}{font}写着大字“{title}”和小字“{subtitle}”",
        "一张宣传海报，主标题为“{title}”，副标题为“{subtitle}”",
    ),
    "multiline": (
        "一张海报，上面分{n}行写着“{text}”",
        "{bg}上的{color}{font}文字，共{n}行：“{text}”",
        "一块牌子，上面写着“{text}”",
        "排版设计，{n}行文字“{text}”，{font}",
    ),
    "vertical": (
        "一幅竖排文字的图片，从上到下写着“{text}”",
        "竖排的{color}{font}文字“{text}”，{bg}",
        "一张竖幅，上面竖着写着“{text}”",
        "一块竖招牌，上面用{font}写着“{text}”",
    ),
}
EN_TEMPLATES: dict[str, Sequence[str]] = {
    "single": (
        "A poster with the words “{text}” written on it",
        "A sign with “{text}” written in {font} Chinese characters",
        "{color} Chinese text “{text}” on {bg}",
        "The Chinese word “{text}” in {color} {font} type, {bg}",
        "Typography of the Chinese characters “{text}”, centered, {bg}",
    ),
    "title_subtitle": (
        "A poster with the title “{title}” and the subtitle “{subtitle}”",
        "Poster design: large {font} title “{title}”, smaller subtitle “{subtitle}”, {bg}",
        "{color} Chinese headline “{title}” above the smaller line “{subtitle}” on {bg}",
    ),
    "multiline": (
        "A poster with {n} lines of Chinese text: “{text}”",
        "A sign that reads “{text}” in {font} characters",
        "{color} Chinese text in {n} lines, “{text}”, on {bg}",
    ),
    "vertical": (
        "Vertical Chinese text “{text}” written from top to bottom",
        "A vertical banner with the Chinese characters “{text}” in {color} {font} type",
        "Chinese characters “{text}” arranged vertically, one under the other, on {bg}",
    ),
}

_ZH_COLORS = {
    "black": "黑色", "white": "白色", "gray": "灰色", "red": "红色", "orange": "橙色", "yellow": "黄色",
    "green": "绿色", "cyan": "青色", "blue": "蓝色", "purple": "紫色", "pink": "粉色", "brown": "棕色",
}  # fmt: skip


def color_name(rgb: Sequence[int], lang: str = "en") -> str:
    """A basic colour name for an sRGB colour ("red", "dark blue" is just "blue"); ``lang`` "en" or "zh"."""
    r, g, b = (float(c) / 255.0 for c in rgb[:3])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if v < 0.18:
        name = "black"
    elif s < 0.15:
        name = "white" if v > 0.85 else "gray" if v > 0.25 else "black"
    else:
        deg = h * 360
        if deg < 15 or deg >= 345:
            name = "red" if v > 0.5 or s > 0.6 else "brown"
        elif deg < 45:
            name = "orange" if v > 0.6 else "brown"
        elif deg < 70:
            name = "yellow" if v > 0.5 else "brown"
        elif deg < 165:
            name = "green"
        elif deg < 195:
            name = "cyan"
        elif deg < 255:
            name = "blue"
        elif deg < 290:
            name = "purple"
        else:
            name = "pink" if v > 0.6 else "purple"
        if name == "red" and s < 0.45 and v > 0.7:
            name = "pink"
    return _ZH_COLORS[name] if lang == "zh" else name


def font_description(font: Font, lang: str = "en") -> str:
    """"粗黑体" / "bold sans-serif", "楷体" / "Kai (brush-script)", ... from the family and weight."""
    fam = font.family.lower()
    style = font.style.lower().replace(" ", "")
    if "ukai" in fam or "kai" in fam:
        zh, en = "楷体", "Kai brush-script"
    elif "serif" in fam or "ming" in fam or "song" in fam:
        zh, en = "宋体", "serif (Song)"
    else:
        zh, en = "黑体", "sans-serif"
    if style in ("bold", "black", "heavy", "extrabold", "semibold", "demibold"):
        zh, en = "粗" + zh, "bold " + en
    elif style in ("thin", "light", "extralight", "ultralight", "demilight"):
        zh, en = "细" + zh, "thin " + en
    return zh if lang == "zh" else en


def _background_description(rendered: Rendered, lang: str) -> str:
    c = color_name(rendered.background_color, lang)
    kind = rendered.background
    if lang == "zh":
        return {"solid": f"{c}背景", "gradient": f"{c}渐变背景", "noise": "纹理背景", "photo": "照片背景"}.get(
            kind, "背景"
        )
    return {
        "solid": f"a plain {c} background",
        "gradient": f"a {c} gradient background",
        "noise": "a textured background",
        "photo": "a photographic background",
    }.get(kind, "a background")


def caption_for(rendered: Rendered, seed: int, index: int, zh_share: float = 0.6) -> str:
    """A caption naming the drawn text exactly, chosen deterministically from ``(seed, index)``.

    Chinese with probability ``zh_share``, else English; the template fits ``rendered.layout``.
    """
    rng = random.Random(f"caption:{seed}:{index}")
    lang = "zh" if rng.random() < zh_share else "en"
    table = ZH_TEMPLATES if lang == "zh" else EN_TEMPLATES
    layout = rendered.layout if rendered.layout in table else "single"
    lines = rendered.lines or rendered.text.split("\n")
    if layout == "title_subtitle" and len(lines) < 2:
        layout = "single"
    template = rng.choice(tuple(table[layout]))
    fields = {
        "text": " ".join(lines),
        "title": lines[0],
        "subtitle": " ".join(lines[1:]),
        "n": len(lines),
        "font": font_description(rendered.font, lang),
        "color": color_name(rendered.text_color, lang),
        "bg": _background_description(rendered, lang),
    }
    out = template.format(**fields)
    return out[0].upper() + out[1:] if lang == "en" else out
