"""Encoded image to a bucket-sized training tensor plus SDXL's micro-conditioning.

The image is scaled to cover the bucket (scale = max(bw/w, bh/h): no padding, no distortion) and
then cropped to it. SDXL conditions on (original size, crop top-left, target size) so that at
sampling time "uncropped, large original" can be asked for; the values must therefore describe
what really happened: the original is the upright full-size image (before any reduction), the
crop offset is in the pixels of the resized image. Where curation recorded the size the image had
before the downloader stored it (``original_width`` / ``original_height``, tasks/signals/resolution.py),
that is the original: a 180x200 photo stored upscaled to 384x427 must be conditioned as small,
else sampling with "large original" would ask for upscaling blur.

Decoding uses the curation guards (tasks/decode.py: file-size and decompression-bomb limits on the
upright header before any pixel, EXIF orientation, every mode to RGB). JPEGs are decoded with
Pillow's ``draft`` at the smallest DCT scale that still covers the bucket, then resized once.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from schemas.config import DecodeConfig
from tasks.decode import SWAPS_AXES, DecodeError, ImageSample, to_rgb

DEFAULT_LIMITS = DecodeConfig()


def cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(w, h) after scaling to cover ``bucket`` (w, h): one side equals the bucket's, the other is
    at least the bucket's."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def crop_offset(resized: tuple[int, int], bucket: tuple[int, int],
                uniforms: tuple[float, float] | None) -> tuple[int, int]:
    """(top, left) of the crop in resized pixels: centred, or placed by two uniforms in [0, 1)."""
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if uniforms is None:
        return spare_h // 2, spare_w // 2
    return int(uniforms[0] * (spare_h + 1)), int(uniforms[1] * (spare_w + 1))


def decode_upright(data: bytes | None, bucket: tuple[int, int] | None = None,
                   limits: DecodeConfig = DEFAULT_LIMITS) -> tuple[Image.Image, tuple[int, int]]:
    """Upright RGB image and its full upright size (w, h). With ``bucket`` a JPEG may be decoded
    reduced, never below the size that covers it. Raises DecodeError for anything unusable."""
    header = ImageSample(data, max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes,
                         decode_side=None).header  # size/bomb guards before any pixel
    try:
        img = Image.open(io.BytesIO(data))  # type: ignore[arg-type]  # ImageSample rejected None
        if bucket is not None and img.format == "JPEG":
            need = cover_size(header.width, header.height, bucket)
            stored = need[::-1] if header.orientation in SWAPS_AXES else need
            img.draft("RGB", stored)
        img.seek(0)  # animated: first frame
        img.load()
        if header.orientation != 1:
            img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("decompression_bomb", str(exc)) from exc
    except Exception as exc:  # Pillow raises many types for bad input
        raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from exc
    return img, (header.width, header.height)


def cover_crop(data: bytes | None, bucket: tuple[int, int], uniforms: tuple[float, float] | None = None,
               limits: DecodeConfig = DEFAULT_LIMITS, original: tuple[int, int] | None = None,
               ) -> tuple[np.ndarray, tuple[int, int, int, int, int, int]]:
    """HxWx3 uint8 pixels of ``bucket`` (w, h) and SDXL's add_time_ids
    (original_h, original_w, crop_top, crop_left, target_h, target_w). ``original`` (w, h): the
    size the source recorded before storing the image; None: the stored image's upright size."""
    img, (width, height) = decode_upright(data, bucket, limits)
    orig_w, orig_h = original if original is not None else (width, height)
    resized = cover_size(width, height, bucket)
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0)  # PNGs: box-reduce first
    top, left = crop_offset(resized, bucket, uniforms)
    pixels = np.asarray(img.crop((left, top, left + bucket[0], top + bucket[1])))
    return pixels, (orig_h, orig_w, top, left, bucket[1], bucket[0])
