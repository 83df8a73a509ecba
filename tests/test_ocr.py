"""The OCR signal on real photos with the real PP-OCRv6 models from the rapidocr wheel, with the
network blocked so that any download attempt fails the test."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tasks.decode import ImageSample
from tasks.signals import registry
from tasks.signals.base import Sample
from tasks.signals.ocr import Ocr, OcrParams, caption_with_text, union_area_ratio

DATA = Path(__file__).parent / "data"


def sample(name: str, caption: str | None, side: int | None) -> Sample:
    data = (DATA / name).read_bytes()
    return Sample(name, caption, ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=side))


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError("the OCR signal tried to use the network")


def run_offline(signal: Ocr, samples: list[tuple[str, str | None]]) -> dict[str, dict]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        rows = signal.compute_batch([sample(n, c, signal.pixel_side()) for n, c in samples])
    return {n: r for (n, _), r in zip(samples, rows, strict=True)}


@pytest.fixture(scope="module")
def ocr() -> dict[str, dict]:
    signal = Ocr()
    assert signal.unavailable() is None
    return run_offline(signal, [("img2.jpg", "A bus"), ("cat.jpg", "Two cats."), ("img9.jpg", None)])


def test_registered_with_its_columns() -> None:
    assert registry()["ocr"] is Ocr
    assert Ocr.columns() == ["ocr_area_ratio", "ocr_boxes", "ocr_text", "ocr_confidence", "caption_ocr"]
    assert Ocr.cost == 200


def test_finds_and_reads_the_text_on_the_bus(ocr: dict[str, dict]) -> None:
    row = ocr["img2.jpg"]
    assert row["ocr_boxes"] >= 3
    assert 0.01 < row["ocr_area_ratio"] < 0.5
    assert "PRIVILEGES" in row["ocr_text"]
    assert 0.5 <= row["ocr_confidence"] <= 1.0


def test_caption_ocr_quotes_the_text_after_the_caption(ocr: dict[str, dict]) -> None:
    caption = ocr["img2.jpg"]["caption_ocr"]
    assert caption.startswith('A bus. The image shows the text "')
    assert caption.endswith('"')
    assert "PRIVILEGES" in caption


def test_no_text_on_plain_photos(ocr: dict[str, dict]) -> None:
    # The detector alone paints one box over the whole cat photo; recognition rejects it.
    for name, caption in (("cat.jpg", "Two cats."), ("img9.jpg", None)):
        row = ocr[name]
        assert row["ocr_area_ratio"] < 0.01, name
        assert row["ocr_text"] == "" and row["ocr_confidence"] is None, name
        assert row["caption_ocr"] == caption, name


def test_rows_fit_the_arrow_fields(ocr: dict[str, dict]) -> None:
    table = pa.Table.from_pylist(list(ocr.values()), schema=pa.schema(Ocr.fields))
    assert table.column("ocr_confidence").null_count == 2


def test_detection_only_gives_boxes_and_area() -> None:
    signal = Ocr(OcrParams(recognize=False))
    assert signal.pixel_side() == 320
    rows = run_offline(signal, [("img2.jpg", "A bus"), ("cat.jpg", None)])
    assert rows["img2.jpg"]["ocr_boxes"] >= 3 and rows["img2.jpg"]["ocr_area_ratio"] > 0.01
    assert rows["img2.jpg"]["ocr_text"] is None and rows["img2.jpg"]["caption_ocr"] == "A bus"
    assert rows["cat.jpg"]["ocr_boxes"] == 0 and rows["cat.jpg"]["ocr_area_ratio"] == 0.0


@pytest.mark.parametrize("model_dir", [None, "/nonexistent/paddle-models"])
def test_paddleocr_backend_fails_fast_naming_the_setting(model_dir: str | None) -> None:
    signal = Ocr(OcrParams(backend="paddleocr", paddle_model_dir=model_dir))
    start = time.monotonic()
    assert "paddle_model_dir" in (signal.unavailable() or "")
    with pytest.raises(RuntimeError, match="paddle_model_dir"):
        signal.setup()
    assert time.monotonic() - start < 2.0


def test_caption_with_text() -> None:
    assert caption_with_text("a bus", "TOKYO 123") == 'a bus. The image shows the text "TOKYO 123"'
    assert caption_with_text("a bus!", 'say "hi"') == "a bus! The image shows the text \"say 'hi'\""
    assert caption_with_text(None, "OPEN") == 'The image shows the text "OPEN"'
    assert caption_with_text("a bus", "") == "a bus"
    assert caption_with_text("一张海报", "新年快乐") == "一张海报。图中文字：“新年快乐”"
    assert caption_with_text("春节的街道！", "福") == "春节的街道！图中文字：“福”"
    assert caption_with_text(None, "") is None


def test_union_area_counts_overlaps_once() -> None:
    square = np.array([[0, 0], [49, 0], [49, 49], [0, 49]], np.float32)
    assert union_area_ratio([square, square], 100, 100) == pytest.approx(0.25)
    assert union_area_ratio([square, square + 50], 100, 100) == pytest.approx(0.5)
    assert union_area_ratio([], 100, 100) == 0.0


CJK_FONT = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")  # Debian fonts-noto-cjk (make setup)


def test_reads_chinese_and_english_text_rendered_with_a_real_font() -> None:
    import io

    from PIL import Image, ImageDraw, ImageFont

    assert CJK_FONT.is_file(), f"{CJK_FONT} missing: `make setup` installs fonts-noto-cjk"
    font = ImageFont.truetype(str(CJK_FONT), 72)
    img = Image.new("RGB", (1000, 500), (235, 230, 220))
    draw = ImageDraw.Draw(img)
    draw.text((60, 80), "新年快乐", font=font, fill=(180, 20, 20))
    draw.text((60, 260), "欢迎光临 Welcome", font=font, fill=(20, 20, 20))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    signal = Ocr(OcrParams())
    signal.setup()
    row = signal.compute_batch([Sample("poster", "一张海报", ImageSample(
        buf.getvalue(), max_pixels=10**8, max_file_bytes=10**8, decode_side=signal.pixel_side()))])[0]
    assert row["ocr_boxes"] == 2 and 0.05 < row["ocr_area_ratio"] < 0.4
    assert "新年快乐" in row["ocr_text"] and "欢迎光临" in row["ocr_text"] and "Welcome" in row["ocr_text"]
    assert row["caption_ocr"].startswith("一张海报。图中文字：“") and "新年快乐" in row["caption_ocr"]
