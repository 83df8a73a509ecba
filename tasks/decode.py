"""Bytes to an upright RGB image, decoded once and shared by every signal.

The header (size, orientation, format) is read without decoding pixels, so resolution
rules reject an image before it costs a decode. Pixels are decoded at most once, at the
smallest size that serves every enabled signal (JPEG's DCT scaling via ``draft`` makes that
2-8x cheaper than a full decode); smaller views are resized from that one decode.
Truncated files fail: a half-grey image is bad training data.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Pillow's own bomb check is a second line behind ours; its warnings become errors.
warnings.simplefilter("error", Image.DecompressionBombWarning)
Image.LOAD_TRUNCATED_IMAGES = False

_ORIENTATION_TAG = 0x0112
SWAPS_AXES = {5, 6, 7, 8}


# Pillow names the file it could not read by its repr, and a BytesIO's repr is its memory
# address (``<_io.BytesIO object at 0x7f...>``): different in every run, so two runs over the
# same data would write different rejects. Reprs like that, and bare addresses, are rewritten.
_ADDRESS_REPR = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")
_BARE_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{9,}\b")  # 9+ digits: pointers, not format markers like 0xFFD8
# The only BytesIO a decoder is handed here wraps a row's image bytes: say so, not its type.
_NAMED_REPRS = {"_io.BytesIO object": "(the image bytes)"}


def stable_text(text: str) -> str:
    """``text`` with memory addresses removed: a repr showing one becomes a fixed description
    (or the repr without its address), so the same failure reads the same in every run."""
    text = _ADDRESS_REPR.sub(lambda m: _NAMED_REPRS.get(m.group(1), f"<{m.group(1)}>"), text)
    return _BARE_ADDRESS.sub("0x...", text)


def describe(exc: BaseException) -> str:
    """Reject error text for an exception: its type and message, stable across runs."""
    return f"{type(exc).__name__}: {stable_text(str(exc))}"


class DecodeError(Exception):
    """An image that cannot become training pixels; ``reason`` is the reject reason. The
    detail is made stable here, so every raiser (the trainer's decode too) gets that."""

    def __init__(self, reason: str, detail: str):
        detail = stable_text(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Header:
    width: int  # upright, after EXIF orientation
    height: int
    format: str
    mode: str
    file_bytes: int
    orientation: int
    frames: int


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_short_side(img: Image.Image, side: int) -> Image.Image:
    """Scale so the short side is ``side``; never upscale."""
    w, h = img.size
    short = min(w, h)
    if short <= side:
        return img
    scale = side / short
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


# Formats web image-text data comes in (JPEG covers MPO, what many cameras write). Pillow opens
# many more (EPS runs Ghostscript when it is installed; FITS, HDF5, GRIB are science formats):
# bytes from the web never get to choose those.
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000")


def _frame_count(img: Image.Image) -> int:
    """Frames of an animated image. Counting walks every frame, and a file truncated after its first
    frame (common in web scrapes) raises there: the first frame is still a usable image, so 1."""
    try:
        return int(getattr(img, "n_frames", 1) or 1)
    except Exception:
        return 1


class ImageSample:
    """One encoded image: its header now, its pixels on first request, once.

    ``decode_side`` is the short side the pixels are decoded at (None: full size). Every
    ``pixels(side)`` call with ``side <= decode_side`` is served from that one decode.
    ``color=False`` (no enabled signal reads colour) decodes straight to grey: the JPEG
    decoder then skips chroma upsampling and colour conversion, and resizes touch one
    channel instead of three.
    """

    def __init__(self, data: bytes | None, *, max_pixels: int, max_file_bytes: int, decode_side: int | None,
                 color: bool = True):
        if not data:
            raise DecodeError("undecodable", "empty image bytes")
        if len(data) > max_file_bytes:
            raise DecodeError("file_too_large", f"{len(data)} bytes > max_file_bytes {max_file_bytes}")
        self._data = data
        self._decode_side = decode_side
        self._color = color
        self._max_pixels = max_pixels
        self._raw: Image.Image | None = None  # the decode itself, before any resize
        self._base: Image.Image | None = None
        self._views: dict[int | None, Image.Image] = {}
        self._grey: dict[int | None, Image.Image] = {}
        self.decodes = 0
        self.header = self._read_header()

    def _open(self) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self._data), formats=WEB_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError("decompression_bomb", str(exc)) from exc
        except Exception as exc:  # Pillow raises many types for bad input
            raise DecodeError("undecodable", describe(exc)) from exc

    def _read_header(self) -> Header:
        try:
            return self._header_of(self._open())
        except DecodeError:
            raise
        except Exception as exc:  # Pillow raises many types for odd metadata; a bad file is a reject
            raise DecodeError("undecodable", describe(exc)) from exc

    def _header_of(self, img: Image.Image) -> Header:
        try:
            orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
        except Exception:
            orientation = 1
        w, h = img.size
        if orientation in SWAPS_AXES:
            w, h = h, w
        if w * h > self._max_pixels:
            raise DecodeError("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {self._max_pixels}")
        if w < 1 or h < 1:
            raise DecodeError("undecodable", f"empty image {w}x{h}")
        return Header(
            width=w,
            height=h,
            format=img.format or "unknown",
            mode=img.mode,
            file_bytes=len(self._data),
            orientation=orientation,
            frames=_frame_count(img),
        )

    def load(self) -> Image.Image:
        """The decoded image, upright, RGB (or L without ``color``), at the decoder's size (JPEG's
        DCT scaling toward ``decode_side``, else full size): decoded on first call only."""
        if self._raw is not None:
            return self._raw
        img = self._open()
        try:
            if self._decode_side is not None and img.format == "JPEG":
                # A square request keeps both stored axes >= side, whatever the orientation.
                img.draft("RGB" if self._color else "L", (self._decode_side, self._decode_side))
            img.seek(0)  # animated images: the first frame
            img.load()
            if self.header.orientation != 1:  # exif_transpose copies the image even when upright
                img = ImageOps.exif_transpose(img)
            if self._color or img.mode != "L":
                img = to_rgb(img)
                img = img if self._color else img.convert("L")
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError("decompression_bomb", str(exc)) from exc
        except Exception as exc:
            raise DecodeError("undecodable", describe(exc)) from exc
        self.decodes += 1
        self._raw = img
        return img

    def decode(self) -> Image.Image:
        """The upright base image at ``decode_side`` (PIL bilinear from the decode), RGB (or L
        without ``color``)."""
        if self._base is None:
            img = self.load()
            self._base = img if self._decode_side is None else resize_short_side(img, self._decode_side)
        return self._base

    def pixels(self, side: int | None = None) -> Image.Image:
        """Upright RGB with short side ``side`` (or the base size), cached per size."""
        return self._view(self._views, self.decode, side)

    def grey(self, side: int | None = None) -> Image.Image:
        """``pixels(side)`` in grey ("L"), made the same way (the decode, then ``decode_side``,
        then ``side``, PIL bilinear) but from a grey decode: a third of the resize work. The
        figures that read it (sharpness, BRISQUE) move with the resize path, so it is the same
        path; only the rounding of the grey conversion moves (0.6 % of sharpness, on average)."""
        def base() -> Image.Image:
            img = self.load()
            img = img if img.mode == "L" else img.convert("L")
            return img if self._decode_side is None else resize_short_side(img, self._decode_side)

        return self._view(self._grey, base, side)

    def _view(self, cache: dict[int | None, Image.Image], base: Callable[[], Image.Image],
              side: int | None) -> Image.Image:
        """A cached view at ``side``, resized from the smallest cached one still large enough."""
        if side in cache:
            return cache[side]
        best = cache[None] if None in cache else cache.setdefault(None, base())
        if side is not None:
            for view in cache.values():
                if side <= min(view.size) < min(best.size):
                    best = view
            best = resize_short_side(best, side)
        cache[side] = best
        return best

    def release(self) -> None:
        """Drop pixels (the header stays) so a batch does not hold every image at once."""
        self._raw = self._base = None
        for cache in (self._views, self._grey):
            cache.clear()
