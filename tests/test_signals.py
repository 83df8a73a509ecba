"""The cheap signals on real photos, and Data-Juicer's size and aspect expectations."""

from __future__ import annotations

import io

import numpy as np
from conftest import photo
from PIL import Image, ImageFilter

from schemas.config import Bounds
from tasks.decode import ImageSample
from tasks.rules import first_failure
from tasks.signals import Sample, build_signals
from tasks.signals.phash import hamming
from tasks.signals.sharpness import laplacian_variance


def run(data: bytes, caption: str = "a caption") -> dict:
    signals = build_signals({"resolution": {}, "caption": {}, "sharpness": {}, "phash": {}})
    image = ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=512)
    values: dict = {}
    for s in signals:
        values.update(s.compute(Sample("k", caption, image)))
    assert image.decodes <= 1
    return values


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_sizes_match_data_juicer():
    sizes = {n: (run(photo(n))["width"], run(photo(n))["height"]) for n in
             ("cat.jpg", "lena.jpg", "lena-face.jpg", "img8.jpg", "img1.png", "img2.jpg", "img3.jpg")}
    assert sizes == {"cat.jpg": (640, 480), "lena.jpg": (512, 512), "lena-face.jpg": (200, 200),
                     "img8.jpg": (855, 1083), "img1.png": (336, 336), "img2.jpg": (640, 480), "img3.jpg": (342, 500)}


def kept(names, rules) -> set[str]:
    return {n for n in names if first_failure(run(photo(n)), {k: Bounds(**v) for k, v in rules.items()}) is None}


def test_shape_and_aspect_filters_match_data_juicer():
    names = ("img1.png", "img2.jpg", "img3.jpg")
    assert kept(names, {"width": {"min": 400}, "height": {"min": 400}}) == {"img2.jpg"}
    assert kept(names, {"width": {"max": 500}, "height": {"max": 500}}) == {"img1.png", "img3.jpg"}
    assert kept(names, {"aspect_ratio": {"min": 0.8, "max": 1.2}}) == {"img1.png"}
    assert kept(names, {"aspect_ratio": {"min": 0.8}}) == {"img1.png", "img2.jpg"}
    assert kept(names, {"aspect_ratio": {"max": 1.2}}) == {"img1.png", "img3.jpg"}


def test_sharpness_is_normalised_for_scale():
    big = Image.open(io.BytesIO(photo("blip.jpg"))).convert("RGB")
    small = big.resize((1024, 683), Image.Resampling.LANCZOS)
    a, b = run(jpeg(big))["sharpness"], run(jpeg(small))["sharpness"]
    assert 0.75 < a / b < 1.33
    raw_big = laplacian_variance(np.asarray(big.convert("L")))
    raw_small = laplacian_variance(np.asarray(small.convert("L")))
    assert raw_small / raw_big > 1.5  # the effect normalisation removes


def test_blur_lowers_sharpness():
    img = Image.open(io.BytesIO(photo("img9.jpg"))).convert("RGB")
    sharp = run(jpeg(img))["sharpness"]
    blurred = run(jpeg(img.filter(ImageFilter.GaussianBlur(4))))["sharpness"]
    assert blurred < sharp / 5


def test_phash_finds_the_near_pair():
    h = {n: run(photo(n))["phash"] for n in ("img_pair_1.jpg", "img_pair_2.jpg", "cat.jpg", "img9.jpg", "lena.jpg")}
    pair = hamming(h["img_pair_1.jpg"], h["img_pair_2.jpg"])
    others = [hamming(h[a], h[b]) for a in h for b in h if a < b and {a, b} != {"img_pair_1.jpg", "img_pair_2.jpg"}]
    assert pair <= 10 < min(others)


def test_phash_survives_reencoding_and_resizing():
    img = Image.open(io.BytesIO(photo("cat.jpg"))).convert("RGB")
    a = run(jpeg(img))["phash"]
    b = run(jpeg(img.resize((320, 240))))["phash"]
    assert hamming(a, b) <= 4


def test_caption_length():
    v = run(photo("cat.jpg"), caption="  两只猫 on a sofa  ")
    assert v["caption_chars"] == 13 and v["caption_words"] == 4
    assert run(photo("cat.jpg"), caption=None)["caption_chars"] == 0
