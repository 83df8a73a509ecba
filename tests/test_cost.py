"""Issue 15's cost work: the chain's own accounting of where the time goes, and the previous
versions the bench keeps beside the new ones (bench/previous.py) still being what they were."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from conftest import PHOTOS
from PIL import Image

from bench.previous import previous_brisque_score, previous_chain
from schemas.config import CurateConfig
from tasks.chain import Chain
from tasks.decode import ImageSample

CHEAP = {"resolution": {}, "sharpness": {}, "phash": {}}


def _batch(images: dict[str, bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([
        {"key": k, "source": "t", "caption": "a photo", "meta": None, "image": v, "source_error": None}
        for k, v in images.items()])


def _tiny_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (90, 120, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_chain_counts_core_time_and_rows_per_step():
    """A row the resolution rule drops reaches no pixel signal and costs no decode."""
    chain = Chain(CurateConfig(signals=CHEAP))
    images = {p.name: p.read_bytes() for p in PHOTOS[:3]} | {"tiny": _tiny_jpeg()}
    result = chain.score_batch(_batch(images), set())
    assert result.rejects.column("reason").to_pylist() == ["short_side_below_min"]
    assert chain.rows_in == {"resolution": 4, "sharpness": 3, "phash": 3}
    assert chain.core_s["decode"] > 0 and chain.core_s["sharpness"] > 0 and chain.core_s["phash"] > 0
    assert set(chain.core_s) <= {"decode", "resolution", "sharpness", "phash"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's own float(array) calls
def test_previous_brisque_is_the_package():
    """The bench's previous BRISQUE (scipy blur, masked sums, root search) is the package's score."""
    from brisque import BRISQUE

    reference = BRISQUE(url=False)
    for path in PHOTOS[:4]:
        rgb = np.asarray(ImageSample(path.read_bytes(), max_pixels=10**8, max_file_bytes=10**8,
                                     decode_side=512).pixels(512))
        assert previous_brisque_score(rgb) == pytest.approx(float(reference.score(rgb)), abs=1e-6)


def test_grey_views_keep_the_previous_sharpness_and_phash():
    """With colour signals on (a 640 px decode, as the default config has), sharpness and pHash
    from the grey views stay within rounding of the previous RGB views; OCR's det_side goes back
    to 320 in the previous chain only."""
    cfg = CurateConfig(signals={**CHEAP, "faces": {"side": 640}}, rules={})
    batch = _batch({p.name: p.read_bytes() for p in PHOTOS})
    rows = {}
    for name, chain in (("now", Chain(cfg)), ("previous", previous_chain(cfg))):
        assert chain.decode_side == 640 and chain.color  # sharpness: 640 then 512
        rows[name] = {r["key"]: r for r in chain.score_batch(batch, set()).kept.to_pylist()}
    for key, now in rows["now"].items():
        before = rows["previous"][key]
        assert now["sharpness"] == pytest.approx(before["sharpness"], rel=0.02), key
        assert bin((now["phash"] ^ before["phash"]) & (2**64 - 1)).count("1") <= 2, key
        assert now["face_count"] == before["face_count"], key
    ocr = CurateConfig(signals={"ocr": {}}, rules={})
    assert previous_chain(ocr).signals[0].params.det_side == 320 and Chain(ocr).signals[0].params.det_side == 256


def test_allocator_keeps_large_blocks_on_glibc():
    """On glibc the thresholds are raised (mallopt answers 1); elsewhere it is a no-op that says so."""
    import platform

    from tasks.alloc import keep_large_allocations

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_large_allocations() is glibc
    assert keep_large_allocations() is glibc  # once per process; a second call changes nothing
