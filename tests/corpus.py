"""A corpus of broken samples mixed with good ones, in img2dataset's webdataset layout."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import photo, write_webdataset
from PIL import Image
from test_decode import png_bomb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _odd_but_good() -> dict[str, tuple[bytes, str]]:
    """Images in awkward encodings that must still be kept."""
    cat = Image.open(io.BytesIO(photo("cat.jpg"))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    grey16 = Image.fromarray(__import__("numpy").asarray(cat.convert("L"), dtype="uint16") * 257)
    frames = [cat, cat.rotate(10)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return {
        "good_cmyk": (_encode(cat.convert("CMYK"), "JPEG", quality=90), "jpg"),
        "good_png16": (_encode(grey16, "PNG"), "png"),
        "good_palette_alpha": (_encode(cat.quantize(64), "PNG", transparency=0), "png"),
        "good_animated": (gif.getvalue(), "gif"),
        "good_exif_rotated": (_encode(cat, "JPEG", quality=90, exif=exif.tobytes()), "jpg"),
        "good_rgba_webp": (_encode(cat.convert("RGBA"), "WEBP", quality=90), "webp"),
    }


GOOD_PHOTOS = ["cat.jpg", "lena.jpg", "img9.jpg", "img2.jpg", "blip.jpg"]
UNDECODABLE = {"bad_zero_bytes": "undecodable", "bad_truncated": "undecodable", "bad_not_image": "undecodable",
               "bad_bomb": "decompression_bomb"}


def build(root: Path) -> dict[str, str | None]:
    """Writes the corpus; returns key -> expected reject reason (None: must be kept)."""
    expected: dict[str, str | None] = {}
    samples = []

    def add(key, image, caption, ext, reason):
        samples.append((key, image, caption, ext))
        expected.setdefault(key, reason)

    for i, name in enumerate(GOOD_PHOTOS):
        add(f"good_photo_{i}", photo(name), f"a photo: {name}", name.rsplit(".", 1)[1], None)
    for key, (data, ext) in _odd_but_good().items():
        add(key, data, f"an awkward encoding: {key}", ext, None)
    add("good_empty_caption", photo("img10.jpg"), "", "jpg", None)
    add("good_no_caption_file", photo("img3.jpg"), None, "jpg", None)
    add("good_chinese_caption", photo("img1.png"), "一张舒适的床", "png", None)
    add("bad_zero_bytes", b"", "zero bytes", "jpg", "undecodable")
    truncated = photo("img9.jpg")
    add("bad_truncated", truncated[: len(truncated) // 2], "cut in half", "jpg", "undecodable")
    add("bad_not_image", b"<html>404 not found</html>", "an error page", "jpg", "undecodable")
    add("bad_bomb", png_bomb(60_000, 60_000), "a bomb", "png", "decompression_bomb")
    add("caption_huge", photo("img_pair_1.jpg"), "x" * 1_000_000, "jpg", "caption_chars_above_max")
    add("bad_caption_bytes", photo("img_pair_2.jpg"), b"\xff\xfe broken \xc3\x28", "jpg", "caption_not_utf8")
    add("good_photo_0", photo("lena-face.jpg"), "the same key again", "jpg", None)  # duplicate key
    add("dup_after_bad", b"garbage", "a bad first copy", "jpg", "undecodable")
    add("good_between", photo("img10.jpg"), "webdataset groups adjacent members by key", "jpg", None)
    add("dup_after_bad", photo("lena.jpg"), "a good second copy", "jpg", None)  # the good copy is kept
    write_webdataset(root / "00000.tar", samples[: len(samples) // 2])
    write_webdataset(root / "00001.tar", samples[len(samples) // 2 :])
    corrupt = write_webdataset(root / "00002.tar", [(f"tail_{i}", photo("cat.jpg"), "c", "jpg") for i in range(6)])
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: len(data) * 2 // 3] + b"\x13" * 5000)
    return expected
