"""Decode guards: every odd image mode becomes upright 8-bit RGB, bad bytes become a reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from tasks.decode import DecodeError, ImageSample


def sample(data: bytes, side: int | None = 512, max_pixels: int = 10**8) -> ImageSample:
    return ImageSample(data, max_pixels=max_pixels, max_file_bytes=10**8, decode_side=side)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_header_is_read_without_decoding():
    s = sample(photo("blip.jpg"))
    assert (s.header.width, s.header.height) == (2048, 1365)
    assert s.decodes == 0


def test_one_decode_serves_every_view_at_reduced_size():
    s = sample(photo("blip.jpg"), side=512)
    views = [s.pixels(512), s.pixels(64), s.pixels(300), s.pixels(512)]
    assert s.decodes == 1
    assert min(views[0].size) == 512 and min(views[1].size) == 64 and min(views[2].size) == 300
    assert views[0].size == (768, 512)  # aspect kept, upright


def test_reduced_decode_matches_full_decode_closely():
    full = Image.open(io.BytesIO(photo("blip.jpg"))).convert("RGB").resize((768, 512), Image.Resampling.BILINEAR)
    fast = sample(photo("blip.jpg"), side=512).pixels(512)
    diff = np.abs(np.asarray(full, dtype=np.int16) - np.asarray(fast, dtype=np.int16)).mean()
    assert diff < 4.0


def test_exif_orientation_gives_upright_size_and_pixels():
    img = Image.new("RGB", (400, 200), "white")
    img.paste((255, 0, 0), (0, 0, 100, 200))  # red band on the stored left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    s = sample(encode(img, "JPEG", exif=exif.tobytes(), quality=95), side=None)
    assert (s.header.width, s.header.height) == (200, 400)
    upright = np.asarray(s.pixels())
    assert upright.shape == (400, 200, 3)
    assert upright[:50, :, 0].mean() > 200 and upright[:50, :, 1].mean() < 80  # red now on top


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.open(io.BytesIO(photo("cat.jpg"))).convert("CMYK")
    s = sample(encode(cmyk, "JPEG", quality=90))
    assert s.header.mode == "CMYK"
    px = s.pixels(128)
    assert px.mode == "RGB" and np.asarray(px).std() > 10


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256, dtype=np.uint32)[None, :].repeat(64, 0)).astype(np.uint16)
    s = sample(encode(Image.fromarray(ramp), "PNG"), side=None)
    arr = np.asarray(s.pixels())[:, :, 0]
    assert arr[:, 0].max() < 5 and arr[:, -1].min() > 250 and 100 < arr[:, 128].mean() < 156


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    img.paste(1, (0, 0, 32, 64))
    s = sample(encode(img, "PNG", transparency=0), side=None)
    arr = np.asarray(s.pixels())
    assert tuple(arr[10, 50]) == (255, 255, 255)  # transparent black -> white, not black
    assert tuple(arr[10, 10]) == (255, 0, 0)


def test_la_mode_is_composited():
    img = Image.new("LA", (16, 16), (0, 0))
    arr = np.asarray(sample(encode(img, "PNG"), side=None).pixels())
    assert arr.min() == 255


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    s = sample(buf.getvalue(), side=None)
    assert s.header.frames == 2
    r, _, b = np.asarray(s.pixels())[16, 16]
    assert r > 200 and b < 50


def test_truncated_animated_gif_is_a_reject_or_its_first_frame_never_a_crash():
    """Web scrapes hold animated GIFs cut off mid-file: Pillow then raises IndexError, zlib.error, ...
    while counting frames. Every cut must end as a usable first frame or a DecodeError."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    whole = buf.getvalue()
    decoded = rejected = 0
    for cut in range(100, len(whole), 97):
        try:
            s = sample(whole[:cut], side=None)
            assert s.pixels().size == (48, 48)
            decoded += 1
        except DecodeError:
            rejected += 1
    assert decoded and rejected  # cuts after the first frame keep it; earlier cuts are rejects


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "undecodable"),
        (b"this is not an image at all", "undecodable"),
        (png_bomb(50_000, 50_000), "decompression_bomb"),
    ],
)
def test_bad_bytes_are_rejected_at_the_header(data, reason):
    with pytest.raises(DecodeError) as err:
        sample(data)
    assert err.value.reason == reason


def test_bomb_limit_is_the_configured_one():
    data = photo("lena.jpg")  # 512 x 512
    with pytest.raises(DecodeError, match="decompression_bomb"):
        sample(data, max_pixels=512 * 512 - 1)
    assert sample(data, max_pixels=512 * 512).header.width == 512


@pytest.mark.parametrize("side", [64, 512, None])
def test_truncated_jpeg_is_rejected_not_padded(side):
    data = photo("img9.jpg")
    s = sample(data[: len(data) // 2], side=side)  # the header survives the cut
    with pytest.raises(DecodeError) as err:
        s.pixels(side)
    assert err.value.reason == "undecodable" and "truncated" in err.value.detail


def test_file_size_guard():
    with pytest.raises(DecodeError, match="file_too_large"):
        ImageSample(photo("cat.jpg"), max_pixels=10**8, max_file_bytes=1000, decode_side=None)


def test_grey_decode_when_no_signal_reads_colour():
    grey = ImageSample(photo("blip.jpg"), max_pixels=10**8, max_file_bytes=10**8, decode_side=512, color=False)
    rgb = sample(photo("blip.jpg"), side=512)
    assert grey.pixels(512).mode == "L" and grey.pixels(512).size == rgb.pixels(512).size == (768, 512)
    want = np.asarray(rgb.pixels(512).convert("L"), dtype=np.int16)
    diff = np.abs(np.asarray(grey.pixels(512), dtype=np.int16) - want)
    assert diff.mean() < 2.0 and grey.decodes == 1


def test_grey_views_follow_the_rgb_path_in_one_channel():
    """grey(side) is pixels(side) in grey, made the same way (decode, decode_side, side) from a
    grey decode; views are cached, and one decode serves RGB views, grey views and load()."""
    s = sample(photo("blip.jpg"), side=640)
    assert s.grey(512).mode == "L" and s.grey(512).size == s.pixels(512).size
    want = np.asarray(s.pixels(512).convert("L"), dtype=np.int16)
    diff = np.abs(np.asarray(s.grey(512), dtype=np.int16) - want)
    assert diff.max() <= 2 and diff.mean() < 0.6
    assert s.grey_array(512) is s.grey_array(512) and s.grey(64).size[1] == 64  # cached, shared
    assert not s.grey_array(512).flags.writeable and not s.pixel_array(512).flags.writeable
    assert np.array_equal(s.grey_array(512), np.asarray(s.grey(512)))
    assert s.load().size == (1024, 683) and s.decode().size == (960, 640)  # DCT-scaled decode, then decode_side
    assert s.decodes == 1
    s.release()
    assert s.grey(64).size[1] == 64 and s.decodes == 2


def test_grey_decode_of_odd_modes():
    cmyk = Image.open(io.BytesIO(photo("cat.jpg"))).convert("CMYK")
    s = ImageSample(encode(cmyk, "JPEG"), max_pixels=10**8, max_file_bytes=10**8, decode_side=64, color=False)
    assert s.pixels(64).mode == "L" and np.asarray(s.pixels(64)).std() > 10


def test_formats_outside_web_images_are_rejected():
    """An ICO (or EPS, FITS, ...) named .jpg is not web training data; Pillow would open it."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "ICO")
    with pytest.raises(DecodeError) as err:
        sample(buf.getvalue())
    assert err.value.reason == "undecodable"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "WEBP")
    assert sample(buf.getvalue()).header.format == "WEBP"
