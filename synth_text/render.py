"""Render synthetic Chinese text images: real fonts, varied layouts and backgrounds, guaranteed-legible colours.

Every choice (output size, layout, font, font size, position, rotation, colours, background) comes from a local RNG
seeded with ``(cfg.seed, word, index)``, so :func:`render_sample` called twice gives byte-identical images.

How one image is made:

1. the background is rendered with numpy at the output size (solid, linear/radial gradient, smoothed value noise,
   or a crop of a caller-supplied photo);
2. the text block is laid out with Pillow's font metrics (per-character ink boxes from ``getbbox``), sized to fit the
   image (after rotation) with every glyph at least ``cfg.min_text_px``;
3. the text colour is chosen against the pixels of the background under each line (mean colour for the recorded
   WCAG contrast, 5th/95th luminance percentiles to detect busy backgrounds); when no plain colour reaches
   ``cfg.min_contrast`` everywhere, a contrasting outline (stroke) or a translucent plate is added;
4. only the text's masks are rotated (BICUBIC affine transform of small single-channel layers), then pasted with
   their colours onto the background.
"""

from __future__ import annotations

import colorsys
import functools
import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from synth_text.config import BACKGROUNDS, LAYOUTS, SynthConfig
from synth_text.fonts import Font
from synth_text.words import draw_words, split_lines

__all__ = [
    "BACKGROUNDS",
    "LAYOUTS",
    "RenderError",
    "Rendered",
    "contrast_ratio",
    "encode_jpeg",
    "pil_font",
    "relative_luminance",
    "render_sample",
]

Quad = list[tuple[float, float]]
RGB = tuple[int, int, int]

# styles too thin to stay legible at small sizes: only used when the smallest line is at least this big
THIN_STYLES = frozenset({"thin", "extralight", "ultralight", "hairline"})
THIN_MIN_PX = 64


class RenderError(ValueError):
    """The text cannot be rendered: no font covers it, it cannot fit, or the contrast cannot be reached."""


@dataclass
class Rendered:
    """One synthetic image and everything known about what is drawn on it.

    ``contrast`` is the worst line's WCAG contrast ratio between the text colour and what surrounds its glyphs:
    the mean colour of the actual pixels under the line (background, plate included), or the outline colour when
    the text has an outline. ``background_contrast`` is the same against the bare background, outline ignored.
    """

    image: Image.Image
    text: str
    lines: list[str]
    font: Font
    font_size: int
    layout: str
    background: str
    line_boxes: list[Quad]
    char_boxes: list[Quad]
    contrast: float
    line_sizes: list[int] = field(default_factory=list)
    rotation: float = 0.0
    text_color: RGB = (0, 0, 0)
    background_color: RGB = (255, 255, 255)
    stroke_color: RGB | None = None
    plate_color: RGB | None = None
    background_contrast: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# ---------------------------------------------------------------------------------------------------------------
# colour science (WCAG 2.x)

_SRGB = np.arange(256, dtype=np.float64) / 255.0
_LIN = np.where(_SRGB <= 0.04045, _SRGB / 12.92, ((_SRGB + 0.055) / 1.055) ** 2.4)
_LUM_W = np.array([0.2126, 0.7152, 0.0722])


def _lin(c: float) -> float:
    c = c / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour given as 0..255 channel values (floats allowed: a mean colour)."""
    r, g, b = (_lin(float(v)) for v in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _ratio(l1: float, l2: float) -> float:
    hi, lo = (l1, l2) if l1 >= l2 else (l2, l1)
    return (hi + 0.05) / (lo + 0.05)


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG contrast ratio (1..21) between two sRGB colours."""
    return _ratio(relative_luminance(a), relative_luminance(b))


def _pixel_lum(px: np.ndarray) -> np.ndarray:
    """Relative luminance of uint8 RGB pixels of shape (..., 3)."""
    return _LIN[px] @ _LUM_W


def _color_with_lum(rng: random.Random, dark: bool, bound: float) -> RGB:
    """A random colour with luminance <= bound (dark) or >= bound (light)."""
    sat = rng.uniform(0.0, 0.15) if rng.random() < 0.35 else rng.uniform(0.3, 1.0)
    base = np.array(colorsys.hsv_to_rgb(rng.random(), sat, 1.0)) * 255.0

    def make(t: float) -> RGB:
        c = base * t if dark else base + (255.0 - base) * t
        return tuple(round(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]

    def ok(c: RGB) -> bool:
        lum = relative_luminance(c)
        return lum <= bound if dark else lum >= bound

    lo, hi = 0.0, 1.0
    if dark:  # largest t with lum <= bound (lum increases with t)
        if ok(make(1.0)):
            t = 1.0
        else:
            for _ in range(14):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if ok(make(mid)) else (lo, mid)
            t = lo
        t *= rng.uniform(0.55, 1.0)
    else:  # smallest t with lum >= bound
        if ok(make(0.0)):
            t = 0.0
        else:
            for _ in range(14):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if ok(make(mid)) else (mid, hi)
            t = hi
        t += (1.0 - t) * rng.uniform(0.0, 0.45)
    c = make(t)
    if not ok(c):
        c = (0, 0, 0) if dark else (255, 255, 255)
    return c


# ---------------------------------------------------------------------------------------------------------------
# fonts


@functools.lru_cache(maxsize=768)
def pil_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    """A cached Pillow font (BASIC layout: no shaping is needed for Han text, and it is faster than raqm)."""
    return ImageFont.truetype(path, size, index=index, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=1 << 16)
def _char_metrics(path: str, index: int, size: int, ch: str) -> tuple[float, tuple[int, int, int, int]]:
    """(advance, ink box relative to the left baseline origin) of one character; cached."""
    f = pil_font(path, index, size)
    return f.getlength(ch), f.getbbox(ch, anchor="ls")


def _quantize(size: float) -> int:
    """Floor a font size to a coarse grid above 48 px so the font cache stays small."""
    s = math.floor(size)
    if s >= 192:
        return s - s % 8
    if s >= 48:
        return s - s % 4
    return s


# ---------------------------------------------------------------------------------------------------------------
# backgrounds


class _Background:
    def __init__(self, kind: str, image: Image.Image, arr: np.ndarray | None, solid: RGB | None = None):
        self.kind = kind
        self.image = image
        self.arr = arr  # (H, W, 3) uint8, None for solid backgrounds
        self.solid = solid

    def sample(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        if self.arr is None:
            return np.array([self.solid], dtype=np.uint8)
        return self.arr[ys, xs]


def _random_color(rng: random.Random) -> RGB:
    mode = rng.random()
    if mode < 0.3:  # pale
        h, s, v = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.85, 1.0)
    elif mode < 0.55:  # dark
        h, s, v = rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.05, 0.3)
    else:  # anything
        h, s, v = rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.2, 1.0)
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _near(rng: random.Random, c: RGB, spread: float) -> RGB:
    return tuple(int(np.clip(v + rng.uniform(-spread, spread), 0, 255)) for v in c)  # type: ignore[return-value]


def _palette_map(t: np.ndarray, colors: Sequence[RGB]) -> np.ndarray:
    """Map t in [0, 1] (float, H x W) through a piecewise-linear palette to uint8 RGB (via a 256-entry table)."""
    pal = np.asarray(colors, dtype=np.float32)
    k = len(pal) - 1
    x = np.linspace(0.0, k, 256, dtype=np.float32)
    i = np.minimum(x.astype(np.int32), k - 1)
    f = (x - i)[:, None]
    lut = (pal[i] * (1.0 - f) + pal[i + 1] * f + 0.5).astype(np.uint8)
    idx = (np.clip(t, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return lut[idx]


def _upscale(small: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR))


def _bg_gradient(rng: random.Random, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    sw, sh = max(8, w // 8), max(8, h // 8)
    ys, xs = np.mgrid[0:sh, 0:sw].astype(np.float32)
    xs = (xs + 0.5) / sw
    ys = (ys + 0.5) / sh * (h / w)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        t = xs * math.cos(a) + ys * math.sin(a)
    else:
        cx, cy = rng.uniform(0.0, 1.0), rng.uniform(0.0, h / w)
        t = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c1 = _random_color(rng)
    c2 = _random_color(rng) if rng.random() < 0.5 else _near(rng, c1, 90)
    colors = [c1, c2] if rng.random() < 0.7 else [c1, c2, _near(rng, c1, 40)]
    return _upscale(_palette_map(t, colors), size)


def _bg_noise(rng: random.Random, nrng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    bw, bh = max(16, w // 4), max(16, h // 4)
    acc = np.zeros((bh, bw), dtype=np.float32)
    octaves = rng.randint(3, 5)
    base = rng.choice((2, 3, 4))
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base * 2**o
        grid = nrng.random((cells + 1, cells + 1), dtype=np.float32)
        layer = np.asarray(Image.fromarray(grid, mode="F").resize((bw, bh), Image.Resampling.BICUBIC))
        acc += amp * layer
        total += amp
        amp *= rng.uniform(0.4, 0.65)
    acc /= total
    lo, hi = np.percentile(acc, (1, 99))
    t = (acc - lo) / max(float(hi - lo), 1e-6)
    c1 = _random_color(rng)
    busy = rng.random() < 0.3
    colors = [c1, _random_color(rng) if busy else _near(rng, c1, 60)]
    if rng.random() < 0.4:
        colors.append(_near(rng, colors[rng.randrange(2)], 50))
    out = _upscale(_palette_map(t, colors), size)
    if rng.random() < 0.4:  # fine grain
        grain = nrng.integers(-10, 11, size=(h, w, 1), dtype=np.int16)
        out = np.clip(out.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    return out


def _bg_photo(rng: random.Random, photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    arr = np.asarray(photo)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3 or arr.shape[0] < 8 or arr.shape[1] < 8:
        raise RenderError(f"photo backgrounds must be HxWx3 uint8 arrays, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr[..., :3], dtype=np.uint8)
    ph, pw = arr.shape[:2]
    target = w / h
    cw, ch = (pw, pw / target) if pw / ph < target else (ph * target, ph)
    scale = rng.uniform(0.6, 1.0)
    cw, ch = cw * scale, ch * scale
    x0 = rng.uniform(0, pw - cw)
    y0 = rng.uniform(0, ph - ch)
    img = Image.fromarray(arr).resize(
        size, Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0
    )
    return np.asarray(img)


def _weighted(rng: random.Random, weights: dict[str, float], order: Sequence[str]) -> str:
    names = [n for n in order if weights.get(n, 0) > 0]
    return rng.choices(names, weights=[weights[n] for n in names])[0]


def _make_background(
    rng: random.Random, nseed: int, cfg: SynthConfig, size: tuple[int, int], photos: Sequence
) -> _Background:
    kind = _weighted(rng, cfg.backgrounds, BACKGROUNDS)
    if kind == "photo" and not photos:
        others = {k: v for k, v in cfg.backgrounds.items() if k != "photo" and v > 0}
        kind = _weighted(rng, others, BACKGROUNDS) if others else "gradient"
    if kind == "solid":
        c = _random_color(rng)
        return _Background(kind, Image.new("RGB", size, c), None, c)
    if kind == "gradient":
        arr = _bg_gradient(rng, size)
    elif kind == "noise":
        arr = _bg_noise(rng, np.random.default_rng(nseed), size)
    else:
        arr = _bg_photo(rng, photos[rng.randrange(len(photos))], size)
    return _Background(kind, Image.fromarray(arr), arr)


# ---------------------------------------------------------------------------------------------------------------
# layout geometry


@dataclass
class _Block:
    """Text block geometry in its own (unrotated) coordinates: draw calls, per-line per-char ink boxes."""

    draws: list[tuple[float, float, str, int]]  # (x, baseline y, text, line number) drawn with anchor "ls"
    boxes: list[list[tuple[float, float, float, float]]]  # per line, per char: ink box
    sizes: list[int]

    def bbox(self) -> tuple[float, float, float, float]:
        xs0, ys0, xs1, ys1 = zip(*(b for line in self.boxes for b in line), strict=True)
        return min(xs0), min(ys0), max(xs1), max(ys1)


@dataclass
class _Style:
    align: str  # left / center / right
    line_gap: float  # line pitch as a multiple of the line's font size
    char_gap: float  # vertical: character pitch as a multiple of the font size
    rel: list[float]  # font size of each line relative to the first


def _char_box(x0: float, y0: float, x1: float, y1: float, x: float, y: float, size: int):
    if x1 <= x0 or y1 <= y0:  # no ink (should not happen for Han text): use the em box
        return x, y - 0.88 * size, x + size, y + 0.12 * size
    return x + x0, y + y0, x + x1, y + y1


def _geometry(font: Font, layout: str, lines: list[str], sizes: list[int], style: _Style) -> _Block:
    draws: list[tuple[float, float, str, int]] = []
    boxes: list[list[tuple[float, float, float, float]]] = []
    if layout == "vertical":
        (line,) = lines
        s = sizes[0]
        line_boxes = []
        for j, ch in enumerate(line):
            adv, ink = _char_metrics(font.path, font.index, s, ch)
            x = (s - adv) / 2
            y = j * s * style.char_gap + 0.88 * s
            draws.append((x, y, ch, 0))
            line_boxes.append(_char_box(*ink, x, y, s))
        boxes.append(line_boxes)
        return _Block(draws, boxes, list(sizes))
    # BASIC layout applies no kerning to Han text: a line's advance is the sum of its characters' advances
    metrics = [
        [_char_metrics(font.path, font.index, s, ch) for ch in line] for line, s in zip(lines, sizes, strict=True)
    ]
    widths = [sum(adv for adv, _ in m) for m in metrics]
    maxw = max(widths)
    y = 0.0
    for i, (line, mets, s, wdt) in enumerate(zip(lines, metrics, sizes, widths, strict=True)):
        if i:
            prev = sizes[i - 1]
            y += prev + (style.line_gap - 1.0) * max(prev, s)
        baseline = y + 0.88 * s
        x = {"left": 0.0, "center": (maxw - wdt) / 2, "right": maxw - wdt}[style.align]
        draws.append((x, baseline, line, i))
        line_boxes = []
        cx = x
        for adv, ink in mets:
            line_boxes.append(_char_box(*ink, cx, baseline, s))
            cx += adv
        boxes.append(line_boxes)
    return _Block(draws, boxes, list(sizes))


def _pads(sizes: Sequence[int]) -> tuple[int, int, int]:
    """(stroke width, plate padding, total layer padding) for the given line sizes."""
    small = min(sizes)
    sw = max(2, round(small * 0.07))
    plate = sw + max(4, round(small * 0.3))
    return sw, plate, plate + sw + 2


def _rotated_extent(w: float, h: float, angle: float) -> tuple[float, float]:
    a = math.radians(angle)
    c, s = abs(math.cos(a)), abs(math.sin(a))
    return w * c + h * s, w * s + h * c


def _fit(
    font: Font, layout: str, lines: list[str], style: _Style, angle: float, avail: tuple[float, float],
    cap: float, rng: random.Random, min_px: int, lo_frac: float,
) -> _Block | None:
    """Choose the font size and lay the block out so that it fits ``avail`` after rotation; None if impossible."""
    ref = 100
    rel = style.rel
    block = _geometry(font, layout, lines, [max(1, round(ref * r)) for r in rel], style)
    x0, y0, x1, y1 = block.bbox()
    pad = _pads(block.sizes)[2]
    ew, eh = _rotated_extent(x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, angle)
    s_max = ref * min(avail[0] / ew, avail[1] / eh)
    s_lo = min_px / min(rel)
    if s_max < s_lo:
        return None
    s_hi = max(s_lo, min(s_max, cap))
    s = max(s_lo, s_hi * rng.uniform(lo_frac, 1.0))
    for _ in range(6):
        sizes = [max(min_px, _quantize(s * r)) for r in rel]
        block = _geometry(font, layout, lines, sizes, style)
        x0, y0, x1, y1 = block.bbox()
        pad = _pads(sizes)[2]
        ew, eh = _rotated_extent(x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, angle)
        k = min(avail[0] / ew, avail[1] / eh)
        if k >= 1.0:
            return block
        s = math.floor(s * k * 0.98)
        if s < s_lo:
            return None
    return None


# ---------------------------------------------------------------------------------------------------------------
# the sample


def _is_thin(font: Font) -> bool:
    return font.style.casefold().replace(" ", "") in THIN_STYLES


def _common_char(ch: str) -> bool:
    """In GB2312 level 1: the 3,755 most common simplified characters (jieba's list also ranks traditional and
    mis-encoded forms such as 鍚 or 勫 among its first few thousand words)."""
    try:
        b = ch.encode("gb2312")
    except UnicodeEncodeError:
        return False
    return len(b) == 2 and 0xB0 <= b[0] <= 0xD7


_FILLERS: dict[tuple[int, int, int], tuple[Sequence[str], list[str]]] = {}


def _filler_pool(words: Sequence[str], n: int) -> Sequence[str]:
    """The words subtitles and extra lines are drawn from: of the first ``n``, those made of common characters
    (cached per word list; the whole list when none qualifies, e.g. a caller's tiny list of rare words)."""
    key = (id(words), len(words), n)
    hit = _FILLERS.get(key)
    if hit is None or hit[0] is not words:
        pool = [w for w in words[:n] if all(_common_char(ch) for ch in w)]
        hit = _FILLERS[key] = (words, pool or list(words))
        if len(_FILLERS) > 8:
            _FILLERS.pop(next(iter(_FILLERS)))
    return hit[1]


# a multi-line block needs lines of at least this many characters: stacked lines of one or two characters look
# like columns of vertical text to the detector (merged into one box, read top to bottom, or dropped)
MIN_LINE_CHARS = 3


def _choose_lines(
    layout: str, word: str, rng: random.Random, words: Sequence[str], index: int, fillers: int
) -> list[str]:
    """The lines of a layout: the word itself, plus (subtitle, further lines) filler words drawn from the most
    frequent ``fillers`` words of ``words`` that use common characters only. Fillers are context, the word is what
    an image is for: a rare filler the recogniser does not know would reject the image of a common word."""
    if layout in ("single", "vertical") or not words:
        return [word]
    pool = _filler_pool(words, fillers)
    sub_seed = rng.getrandbits(32)
    n_extra = rng.randint(1, 3)
    extra = draw_words(pool, sub_seed, index, n_extra + 4)  # spares, for lines that come out too short
    if layout == "title_subtitle":
        k = n_extra
        while k < len(extra) and len("".join(extra[:k])) < MIN_LINE_CHARS:
            k += 1
        return [word, "".join(extra[:k])]
    n_lines = rng.randint(2, 3)
    for n in range(n_lines, 1, -1):  # more words before fewer lines
        for k in range(n_extra, len(extra) + 1):
            lines = split_lines([word, *extra[:k]], n)
            if len(lines) == n and min(len(line) for line in lines) >= MIN_LINE_CHARS:
                return lines
    return split_lines([word, *extra[:n_extra]], 2)


def _style_for(layout: str, rng: random.Random, n_lines: int) -> _Style:
    rel = [1.0, rng.uniform(0.45, 0.65)] if layout == "title_subtitle" else [1.0] * n_lines
    align = "center" if layout in ("single", "vertical") else rng.choice(("center", "center", "left", "right"))
    # at a line pitch of 1.2-1.5 sizes, stacked lines often merged into one box at the detector's 320 px (short
    # lines then read as a vertical column, or a line dropped); with 1.5-1.8 and MIN_LINE_CHARS, multiline went
    # from 91% to 99% passing OCR (bench --only synth)
    return _Style(align=align, line_gap=rng.uniform(1.5, 1.8), char_gap=rng.uniform(1.05, 1.25), rel=rel)


# Largest font size (of the first line) as a share of the image's short side, and the smallest share of what fits
# that a size is drawn from. A lone glyph over ~0.3 of the short side (~100 px at the detector's 320) is more often
# not found at all, or read below the confidence floor: of 334 single/vertical samples, 16 failed with a cap of 0.6,
# 11 with 0.3 (8 of those are rare characters the recogniser does not know).
_CAPS = {"single": 0.3, "title_subtitle": 0.3, "multiline": 0.28, "vertical": 0.3}
_LO = {"single": 0.45, "title_subtitle": 0.55, "multiline": 0.6, "vertical": 0.55}


def _sample_grid(box: tuple[float, float, float, float], n_chars: int, vertical: bool) -> tuple[np.ndarray, np.ndarray]:
    x0, y0, x1, y1 = box
    nu, nv = (8, min(48, 8 * n_chars)) if vertical else (min(48, 8 * n_chars), 8)
    u = x0 + (np.arange(nu) + 0.5) / nu * (x1 - x0)
    v = y0 + (np.arange(nv) + 0.5) / nv * (y1 - y0)
    uu, vv = np.meshgrid(u, v)
    return uu.ravel(), vv.ravel()


def render_sample(
    word: str,
    index: int,
    cfg: SynthConfig,
    fonts: list[Font],
    words: list[str],
    photos: Sequence[np.ndarray] = (),
) -> Rendered:
    """Render ``word`` (sample ``index``) as an image; deterministic in ``(cfg.seed, word, index)``.

    ``fonts``: candidate faces (only those covering all of the drawn text are used); ``words``: the word list that
    subtitles and multi-line phrases are drawn from; ``photos``: uint8 RGB arrays for photo backgrounds (without
    them the photo share falls back to the other kinds). Raises RenderError when no font covers the word, when it
    cannot fit the output size with glyphs of at least ``cfg.min_text_px``, or when the contrast cannot be reached.
    """
    if not word or word.strip() != word or any(ch.isspace() for ch in word):
        raise RenderError(f"cannot render {word!r}: the word must be non-empty and have no whitespace")
    if not fonts:
        raise RenderError("no fonts given")
    rng = random.Random(f"{cfg.seed}:{word}:{index}")
    nseed = rng.getrandbits(64)
    W, H = cfg.sizes[rng.randrange(len(cfg.sizes))]
    layout = _weighted(rng, cfg.layouts, LAYOUTS)
    angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg) if rng.random() < cfg.rotation_prob else 0.0
    margin = min(W, H) * rng.uniform(0.03, 0.07)
    avail = (W - 2 * margin, H - 2 * margin)
    font_pick = rng.random()
    layout_seed = rng.getrandbits(64)

    # layout, then the fonts that cover all of it; fall back to the bare word, then to a plain single line
    block = font = None
    attempts = [layout] if layout == "single" else [layout, "single"]
    tried = []
    for lay in attempts:
        lrng = random.Random(layout_seed)
        lines = _choose_lines(lay, word, lrng, words, index, cfg.filler_words)
        covering = [f for f in fonts if f.covers("".join(lines))]
        if not covering and len(lines) > 1:
            lines = [word]
            covering = [f for f in fonts if f.covers(word)]
        if not covering:
            missing = sorted({ch for ch in word if not any(f.covers(ch) for f in fonts)})
            raise RenderError(
                f"no font covers {word!r} (characters without a glyph in any of {len(fonts)} fonts: "
                f"{' '.join(f'{c} U+{ord(c):04X}' for c in missing) or 'none alone'})"
            )
        if len(lines) == 1 and lay in ("title_subtitle", "multiline"):
            lay = "single"  # no word list, or only the word itself is covered by a font
        style = _style_for(lay, lrng, len(lines))
        font = covering[min(int(font_pick * len(covering)), len(covering) - 1)]
        cap = _CAPS[lay] * min(W, H)
        for ang in (angle, 0.0) if angle else (0.0,):
            block = _fit(font, lay, lines, style, ang, avail, cap, lrng, cfg.min_text_px, _LO[lay])
            if block is not None:
                angle = ang
                break
        if block is not None:
            layout = lay
            break
        tried.append(lay)
    if block is None or font is None:
        raise RenderError(
            f"cannot fit {word!r} ({len(word)} characters) into {W}x{H} with glyphs of at least "
            f"{cfg.min_text_px} px (layouts tried: {', '.join(tried)})"
        )
    if _is_thin(font) and min(block.sizes) < THIN_MIN_PX:
        sturdier = [f for f in covering if not _is_thin(f) and f.family == font.family]
        sturdier = sturdier or [f for f in covering if not _is_thin(f)]
        if sturdier:
            thin = font, block
            font = sturdier[min(int(font_pick * len(sturdier)), len(sturdier) - 1)]
            block = _geometry(font, layout, lines, block.sizes, style)
            # metrics of CJK faces are near-identical; re-check the fit, keep the thin face (which fits) if needed
            x0, y0, x1, y1 = block.bbox()
            pad = _pads(block.sizes)[2]
            ew, eh = _rotated_extent(x1 - x0 + 2 * pad, y1 - y0 + 2 * pad, angle)
            if ew > avail[0] or eh > avail[1]:
                font, block = thin

    # --- background
    bg = _make_background(rng, nseed, cfg, (W, H), photos)

    # --- layer geometry: block coords -> layer coords (padding) -> rotated layer -> image
    sw, plate_pad, pad = _pads(block.sizes)
    bx0, by0, bx1, by1 = block.bbox()
    lw, lh = math.ceil(bx1 - bx0 + 2 * pad), math.ceil(by1 - by0 + 2 * pad)
    sx, sy = pad - bx0, pad - by0
    if angle:
        ew, eh = _rotated_extent(lw, lh, angle)
        ow, oh = math.ceil(ew), math.ceil(eh)
    else:
        ow, oh = lw, lh
    ow, oh = min(ow, W), min(oh, H)
    m = int(margin)
    centred = rng.random() < (0.5 if layout == "single" else 0.6)
    ox = (W - ow) // 2 if centred or W - m - ow <= m else rng.randint(m, W - m - ow)
    oy = (H - oh) // 2 if centred or H - m - oh <= m else rng.randint(m, H - m - oh)
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    clx, cly = lw / 2, lh / 2
    cox, coy = ow / 2, oh / 2

    def fwd(x: np.ndarray | float, y: np.ndarray | float):
        """Block coordinates -> image coordinates (counter-clockwise rotation by ``angle`` on screen)."""
        dx, dy = x + sx - clx, y + sy - cly
        return ox + cox + ca * dx + sa * dy, oy + coy - sa * dx + ca * dy

    def quad(b: tuple[float, float, float, float], grow: float = 0.0) -> Quad:
        x0, y0, x1, y1 = b[0] - grow, b[1] - grow, b[2] + grow, b[3] + grow
        pts = []
        for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
            qx, qy = fwd(x, y)
            pts.append((min(max(float(qx), 0.0), float(W)), min(max(float(qy), 0.0), float(H))))
        return pts

    line_rects = []
    for lb in block.boxes:
        xs0, ys0, xs1, ys1 = zip(*lb, strict=True)
        line_rects.append((min(xs0), min(ys0), max(xs1), max(ys1)))

    # --- pixels under each line
    vertical = layout == "vertical"
    grids = []
    for rect, line in zip(line_rects, lines, strict=True):
        gu, gv = _sample_grid(rect, len(line), vertical)
        qx, qy = fwd(gu, gv)
        grids.append(
            (np.clip(qx.astype(np.int64), 0, W - 1), np.clip(qy.astype(np.int64), 0, H - 1))
        )
    samples = [bg.sample(xs, ys) for xs, ys in grids]

    def stats(pxs: list[np.ndarray]):
        out = []
        for px in pxs:
            lum = _pixel_lum(px.reshape(-1, 3))
            lo, hi = (float(lum[0]), float(lum[0])) if lum.size == 1 else map(float, np.percentile(lum, (5, 95)))
            out.append((px.reshape(-1, 3).mean(axis=0), lo, hi))
        return out

    st = stats(samples)
    T = cfg.min_contrast

    def bounds(t: float) -> tuple[float, float]:
        dark_max = min((lo + 0.05) / t - 0.05 for _, lo, _ in st)
        light_min = max(t * (hi + 0.05) - 0.05 for _, _, hi in st)
        return dark_max, light_min

    text_color: RGB | None = None
    stroke_color: RGB | None = None
    plate_color: RGB | None = None
    plate_alpha = 0
    for t in (min(21.0, T * 1.2), T):
        dark_max, light_min = bounds(t)
        options = [d for d, okd in ((True, dark_max >= 0.0), (False, light_min <= 1.0)) if okd]
        if options:
            dark = options[0] if len(options) == 1 else rng.random() < 0.5
            text_color = _color_with_lum(rng, dark, dark_max if dark else light_min)
            break
    if text_color is None:  # busy background: outline or plate
        mean_lum = float(np.mean([relative_luminance(m_) for m_, _, _ in st]))
        dark = mean_lum > 0.18
        strong = max(T * 1.3, 7.0)
        text_color = _color_with_lum(rng, dark, 0.04 if dark else 0.75)
        lt = relative_luminance(text_color)
        opp = strong * (lt + 0.05) - 0.05 if dark else (lt + 0.05) / strong - 0.05
        opp_color = _color_with_lum(rng, not dark, min(1.0, opp) if dark else max(0.0, opp))
        if rng.random() < 0.5 and min(block.sizes) >= 16:
            stroke_color = opp_color
        else:
            plate_color = opp_color
            pc = np.asarray(plate_color, dtype=np.float32)
            for alpha in (0.8, 0.88, 0.95, 1.0):
                worst = min(
                    _ratio(relative_luminance(text_color), float(lu))
                    for px in samples
                    for lu in np.percentile(
                        _pixel_lum((alpha * pc + (1 - alpha) * px.reshape(-1, 3)).round().astype(np.uint8)),
                        (5, 95),
                    )
                )
                if worst >= T * 1.1 or alpha == 1.0:
                    plate_alpha = round(alpha * 255)
                    break

    # --- masks
    def new_mask() -> tuple[Image.Image, ImageDraw.ImageDraw]:
        mk = Image.new("L", (lw, lh), 0)
        return mk, ImageDraw.Draw(mk)

    def draw_text(d: ImageDraw.ImageDraw, stroke: int) -> None:
        for x, y, txt, li in block.draws:
            f = pil_font(font.path, font.index, block.sizes[li])
            d.text((x + sx, y + sy), txt, fill=255, font=f, anchor="ls", stroke_width=stroke, stroke_fill=255)

    masks: list[tuple[RGB, Image.Image]] = []
    if plate_color is not None:
        pm, pd = new_mask()
        radius = rng.choice((0, plate_pad // 2, plate_pad))
        pd.rounded_rectangle(
            (sx + bx0 - plate_pad, sy + by0 - plate_pad, sx + bx1 + plate_pad, sy + by1 + plate_pad),
            radius=radius,
            fill=plate_alpha,
        )
        masks.append((plate_color, pm))
    if stroke_color is not None:
        sm, sd = new_mask()
        draw_text(sd, sw)
        masks.append((stroke_color, sm))
    fm, fd = new_mask()
    draw_text(fd, 0)
    masks.append((text_color, fm))

    if angle:
        inv = (ca, -sa, clx - ca * cox + sa * coy, sa, ca, cly - sa * cox - ca * coy)
        colors = [c for c, _ in masks]
        bands = [mk for _, mk in masks]
        # one BICUBIC pass over all masks at once (a multi-band image costs about as much as one band)
        if len(bands) == 1:
            rotated = [bands[0].transform((ow, oh), Image.Transform.AFFINE, inv, resample=Image.Resampling.BICUBIC)]
        else:
            while len(bands) < 3:
                bands.append(bands[-1])
            merged = Image.merge("RGB", bands[:3])
            rotated = list(
                merged.transform((ow, oh), Image.Transform.AFFINE, inv, resample=Image.Resampling.BICUBIC).split()
            )
        masks = list(zip(colors, rotated, strict=False))
    else:
        masks = [(c, mk.crop((0, 0, ow, oh)) if (ow, oh) != (lw, lh) else mk) for c, mk in masks]

    img = bg.image
    box = (ox, oy, ox + ow, oy + oh)
    # plate first, then measure what is actually under the text, then outline and text
    if plate_color is not None:
        img.paste(plate_color, box, masks[0][1])
        under = [np.asarray(img)[ys, xs] for xs, ys in grids]
    else:
        under = samples
    for c, mk in masks[1 if plate_color is not None else 0 :]:
        img.paste(c, box, mk)

    lt = relative_luminance(text_color)
    bg_means = [px.reshape(-1, 3).mean(axis=0) for px in samples]
    under_means = [px.reshape(-1, 3).mean(axis=0) for px in under]
    bg_contrast = min(_ratio(lt, relative_luminance(mc)) for mc in bg_means)
    if stroke_color is not None:
        contrast = contrast_ratio(text_color, stroke_color)
    else:
        contrast = min(_ratio(lt, relative_luminance(mc)) for mc in under_means)
    if contrast < T - 1e-6:
        raise RenderError(
            f"cannot reach contrast {T} for {word!r} on the {bg.kind} background (best {contrast:.2f})"
        )

    line_boxes = [quad(r, sw if stroke_color is not None else 0.0) for r in line_rects]
    char_boxes = [quad(b, sw if stroke_color is not None else 0.0) for lb in block.boxes for b in lb]
    mean_all = np.mean(np.stack(bg_means), axis=0)
    return Rendered(
        image=img,
        text="\n".join(lines),
        lines=list(lines),
        font=font,
        font_size=max(block.sizes),
        layout=layout,
        background=bg.kind,
        line_boxes=line_boxes,
        char_boxes=char_boxes,
        contrast=float(contrast),
        line_sizes=list(block.sizes),
        rotation=float(angle),
        text_color=text_color,
        background_color=tuple(round(v) for v in mean_all),  # type: ignore[arg-type]
        stroke_color=stroke_color,
        plate_color=plate_color,
        background_contrast=float(bg_contrast),
    )


def encode_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    """JPEG bytes of ``img`` (RGB; baseline, 4:2:0 chroma subsampling as Pillow does by default)."""
    buf = io.BytesIO()
    (img if img.mode == "RGB" else img.convert("RGB")).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
