"""tasks.resample: Pillow's bilinear resize, byte for byte, on the paths the chain takes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks import resample
from tasks.decode import ImageSample, resize_short_side
from tests.corpus import photo


def pillow(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def noise(rng: np.random.Generator, w: int, h: int, mode: str) -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_equal_to_pillow_on_random_sizes_both_pass_orders(mode):
    """Random content and sizes, reductions and enlargements: equal bytes, whichever pass
    Pillow runs first (both orders occur below, and both single-pass cases)."""
    rng = np.random.default_rng(7)
    orders = set()
    for _ in range(120):
        w, h = (int(v) for v in rng.integers(1, 700, 2))
        ow, oh = max(1, int(w * rng.uniform(0.26, 1.4))), max(1, int(h * rng.uniform(0.26, 1.4)))
        img = noise(rng, w, h, mode)
        assert np.array_equal(np.asarray(resample.resize(img, (ow, oh))), pillow(img, (ow, oh))), (w, h, ow, oh)
        orders.add(resample._vertical_first(w, h, ow, oh))
    for size in [(100, 37), (61, 80)]:  # one axis unchanged
        img = noise(rng, 100, 80, mode)
        assert np.array_equal(np.asarray(resample.resize(img, size)), pillow(img, size))
    assert orders == {True, False}


def test_equal_to_pillow_on_photos_at_the_chains_sizes():
    for name in ["blip.jpg", "img2.jpg", "lena.jpg", "cat.jpg"]:
        with Image.open(io.BytesIO(photo(name))) as im:
            rgb = im.convert("RGB")
        for img in (rgb, rgb.convert("L")):
            for side in (512, 448, 300, 64):
                w, h = img.size
                scale = side / min(w, h)
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                assert np.array_equal(np.asarray(resample.resize(img, size)), pillow(img, size)), (name, side)


def test_large_reductions_and_other_modes_go_to_pillow():
    rng = np.random.default_rng(3)
    img = noise(rng, 640, 480, "L")
    assert not resample.served((480, 640), (64, 48))  # Pillow reduces first (reducing_gap)
    assert np.array_equal(np.asarray(resample.resize(img, (64, 48))), pillow(img, (64, 48)))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    assert np.array_equal(np.asarray(resample.resize(rgba, (30, 20))), pillow(rgba, (30, 20)))
    assert resample.resize(img, img.size).tobytes() == img.tobytes()


def test_as_array_shares_pillows_memory_and_equals_asarray():
    rng = np.random.default_rng(5)
    for mode in ("L", "RGB"):
        img = noise(rng, 123, 45, mode)
        a = resample.as_array(img)
        assert a.dtype == np.uint8 and np.array_equal(a, np.asarray(img))
    big = Image.new("RGB", (5000, 4000), (1, 2, 3))  # 80 MB: Pillow keeps it in several blocks
    assert resample.as_array(big).shape == (4000, 5000, 3) and tuple(resample.as_array(big)[-1, -1]) == (1, 2, 3)
    cmyk = noise(rng, 20, 10, "RGB").convert("CMYK")
    assert np.array_equal(resample.as_array(cmyk), np.asarray(cmyk))  # other modes: numpy's copy


def test_views_equal_the_pillow_path_they_replace():
    """The sample's views (decode_side, then side) are the bytes Pillow's resize gave them."""
    data = photo("blip.jpg")
    s = ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=640)
    base = resize_short_side(s.load(), 640)
    assert np.array_equal(s.pixel_array(), pillow(s.load(), base.size))
    want = pillow(Image.fromarray(np.asarray(base)), s.pixels(512).size)
    assert np.array_equal(s.pixel_array(512), want)
    grey_base = pillow(s.load().convert("L"), base.size)
    assert np.array_equal(s.grey_array(512), pillow(Image.fromarray(grey_base), s.pixels(512).size))
