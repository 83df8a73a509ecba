"""Bytes to an upright RGB image, decoded once and shared by every signal.

The header (size, orientation, format) is read without decoding pixels, so resolution
rules reject an image before it costs a decode. Pixels are decoded at most once, at the
smallest size that serves every enabled signal (JPEG's DCT scaling via ``draft`` makes that
2-8x cheaper than a full decode); smaller views are resized from that one decode, as arrays
(``tasks.resample``: Pillow's bilinear, the same bytes, faster), which the signals read.
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

from tasks import resample

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


def short_side_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """(width, height) scaled so the short side is ``side``; None where that would upscale."""
    short = min(width, height)
    if short <= side:
        return None
    scale = side / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_short_side(img: Image.Image, side: int) -> Image.Image:
    """Scale so the short side is ``side`` (Pillow's bilinear, reducing_gap 2); never upscale."""
    size = short_side_size(*img.size, side)
    return img if size is None else resample.resize(img, size)


def _short_side(a: np.ndarray, side: int | None) -> np.ndarray:
    """``resize_short_side`` for a pixel array."""
    size = None if side is None else short_side_size(a.shape[1], a.shape[0], side)
    return a if size is None else resample.resize_array(a, size)


def _read_only(a: np.ndarray) -> np.ndarray:
    """Cached views are shared by every signal: none may write into another's pixels."""
    a.flags.writeable = False
    return a


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
        self._opened: Image.Image | None = None  # the header's parse, until the decode uses it
        self._views: dict[int | None, np.ndarray] = {}
        self._grey: dict[int | None, np.ndarray] = {}
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
            img = self._open()
            header = self._header_of(img)
            # A JPEG's markers cost a tenth of its decode to parse: the decode reuses this parse.
            self._opened = img if header.format == "JPEG" else None
            return header
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
        img, self._opened = self._opened or self._open(), None
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
        """The upright base image at ``decode_side`` (Pillow's bilinear from the decode), RGB
        (or L without ``color``): for code that hands a PIL image on (captioners)."""
        return self.pixels()

    def pixels(self, side: int | None = None) -> Image.Image:
        """``pixel_array(side)`` as a PIL image (a copy): for code that draws or saves it."""
        return Image.fromarray(self.pixel_array(side))

    def grey(self, side: int | None = None) -> Image.Image:
        """``grey_array(side)`` as a PIL image (a copy)."""
        return Image.fromarray(self.grey_array(side))

    def pixel_array(self, side: int | None = None) -> np.ndarray:
        """Upright RGB (h, w, 3), or L (h, w) without ``color``, short side ``side`` (None: the
        base at ``decode_side``): read-only, cached per size. Signals read these."""
        return self._view(self._views, lambda: resample.as_array(self.load()), side)

    def grey_array(self, side: int | None = None) -> np.ndarray:
        """``pixel_array(side)`` in grey, made the same way (the decode, then ``decode_side``,
        then ``side``, Pillow's bilinear) but from a grey decode: a third of the resize work.
        The figures that read it (sharpness, BRISQUE) move with the resize path, so it is the
        same path; only the rounding of the grey conversion moves (0.6 % of sharpness, on average)."""
        def full() -> np.ndarray:
            img = self.load()
            return resample.as_array(img if img.mode == "L" else img.convert("L"))

        return self._view(self._grey, full, side)

    def _view(self, cache: dict[int | None, np.ndarray], full: Callable[[], np.ndarray],
              side: int | None) -> np.ndarray:
        """A cached view at ``side``, resized from the smallest cached one still large enough
        (the base, at ``decode_side``, comes first)."""
        if side in cache:
            return cache[side]
        if None not in cache:
            cache[None] = _read_only(_short_side(full(), self._decode_side))
        best = cache[None]
        if side is not None:
            for view in cache.values():
                if side <= min(view.shape[:2]) < min(best.shape[:2]):
                    best = view
            best = _read_only(_short_side(best, side))
        cache[side] = best
        return best

    def release(self) -> None:
        """Drop pixels (the header stays) so a batch does not hold every image at once."""
        self._raw = self._opened = None
        for cache in (self._views, self._grey):
            cache.clear()
