"""BRISQUE quality: the brisque package's features (faster), worse for damaged photos, offline, and timed."""

from __future__ import annotations

import io
import math
import socket
import time

import numpy as np
import pytest
from conftest import DATA, PHOTOS
from PIL import Image, ImageFilter

from tasks.decode import ImageSample
from tasks.signals import registry
from tasks.signals.base import Sample
from tasks.signals.quality import Quality, QualityParams, brisque_score


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def sample(data: bytes, signal: Quality, key: str = "k") -> Sample:
    image = ImageSample(data, max_pixels=10**8, max_file_bytes=10**8, decode_side=signal.pixel_side())
    return Sample(key, None, image)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_registered_and_available():
    assert registry()["quality"] is Quality
    signal = Quality()
    assert signal.cost == 150 and signal.pixel_side() == 512
    assert signal.unavailable() is None
    with pytest.raises(ValueError):
        QualityParams(side=384)


def test_blur_is_the_packages_convolution():
    """The separable OpenCV blur is scipy's zero-filled 2-D convolution with the package's kernel."""
    from scipy.signal import convolve2d

    from tasks.signals.quality import _blur, _gauss7_1d

    img = np.random.default_rng(0).random((37, 53))
    g = _gauss7_1d()
    assert np.abs(_blur(img) - convolve2d(img, np.outer(g, g), "same")).max() < 1e-12


def test_aggd_fit_equals_masked_sums_and_root_search():
    """The dot-product sums and the alpha table give the package's fit (masked sums, root search)."""
    from scipy.optimize import root

    from tasks.signals.quality import _phi, aggd_fit

    rng = np.random.default_rng(1)
    for x in (rng.standard_normal(5000), rng.laplace(size=(40, 60)) + 0.1, rng.standard_t(3, 3000) ** 3):
        x2, neg = x * x, x < 0
        left, right = np.sum(x2, where=neg) / neg.sum(), np.sum(x2, where=~neg) / (~neg).sum()
        r_hat = np.abs(x).mean() ** 2 / x2.mean()
        g = np.sqrt(left / right)
        big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
        alpha = root(lambda z, r=big_r: _phi(z) - r, [0.2]).x[0]
        fit = aggd_fit(x)
        assert fit[0] == pytest.approx(alpha, rel=1e-5)
        assert fit[2:] == pytest.approx((left, right), rel=1e-9)
    assert all(math.isnan(v) for v in aggd_fit(np.abs(rng.standard_normal(100))))  # one-sided: no fit


def test_fused_sums_equal_stored_products():
    """``aggd.mscn_sums`` (MSCN and its four neighbour products summed in one pass, nothing
    stored) gives the fits numpy's stored products give, on photo texture and on noise."""
    from tasks.signals.aggd import mscn_sums
    from tasks.signals.quality import _C, _blur, aggd_fit, aggd_from_sums, mscn

    photo_grey = np.asarray(Image.open(DATA / "blip.jpg").convert("L").resize((300, 200)))
    rng = np.random.default_rng(2)
    for grey in (photo_grey / 255.0, rng.random((31, 47)), np.full((20, 20), 0.5)):
        m = mscn(grey)
        products = (m, m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:])
        sums = mscn_sums(np.ascontiguousarray(grey), _blur(grey), _blur(grey * grey), _C)
        for (sq, xa, ab, neg, n), p in zip(sums, products, strict=True):
            assert (int(neg), int(n)) == (np.count_nonzero(p < 0), p.size)
            assert (sq, xa, ab) == pytest.approx((np.sum(p * p), np.sum(p * np.abs(p)), np.sum(np.abs(p))), rel=1e-12)
            want, got = aggd_fit(p), aggd_from_sums(float(sq), float(xa), float(ab), int(neg), int(n))
            assert np.allclose(got, want, rtol=1e-9, equal_nan=True)


def test_svm_equals_libsvm_predict():
    """The bundled SVR as a dot product predicts what libsvm predicts (without its spinning threads)."""
    from libsvm import svmutil

    from tasks.signals.quality import _model, svr_predict

    rng = np.random.default_rng(4)
    for _ in range(50):
        x = rng.uniform(-1.2, 1.2, 36)
        nodes, _ = svmutil.gen_svm_nodearray([float(v) for v in x], isKernel=False)
        want = svmutil.libsvm.svm_predict_probability(_model()[0], nodes, (svmutil.c_double * 1)())
        assert svr_predict(x) == pytest.approx(want, abs=1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's own float(array) calls
def test_close_to_brisque_package_and_reports_time(no_network, capsys):
    """On RGB the score is the package's up to the blur's rounding in flat areas; the signal (grey
    from PIL, before the resize) keeps the package's order of the photos."""
    from brisque import BRISQUE
    from scipy.stats import spearmanr

    signal = Quality()
    samples = [sample(p.read_bytes(), signal, p.name) for p in PHOTOS]
    for s in samples:
        s.image.grey(signal.pixel_side())  # decode outside the timed part
    t0 = time.perf_counter()
    ours = [r["quality"] for r in signal.compute_batch(samples)]
    ms = (time.perf_counter() - t0) * 1000 / len(samples)

    reference = BRISQUE(url=False)  # bundled svm.txt + normalize.pickle only; the socket is blocked
    arrays = [np.asarray(s.image.pixels(signal.pixel_side())) for s in samples]
    t0 = time.perf_counter()
    theirs = [float(reference.score(a)) for a in arrays]
    ms_pkg = (time.perf_counter() - t0) * 1000 / len(samples)

    assert all(math.isfinite(q) for q in ours)
    assert [brisque_score(a) for a in arrays] == pytest.approx(theirs, abs=1.5)
    assert spearmanr(ours, theirs).statistic >= 0.95
    with capsys.disabled():
        print(f"\nBRISQUE at short side {signal.pixel_side()}: {ms:.0f} ms/image (brisque package {ms_pkg:.0f})")


@pytest.mark.parametrize("name", ["lena.jpg", "cat.jpg", "blip.jpg", "img9.jpg"])
def test_blur_and_noise_score_worse(name: str):
    signal = Quality()
    original = sample((PHOTOS[0].parent / name).read_bytes(), signal)
    view = original.image.pixels(signal.pixel_side())
    blurred = np.asarray(view.filter(ImageFilter.GaussianBlur(4)))
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(view) + rng.normal(0, 25, (view.height, view.width, 3)), 0, 255).astype(np.uint8)
    base, blur, noise = (r["quality"] for r in signal.compute_batch(
        [original, sample(png(blurred), signal), sample(png(noisy), signal)]))
    assert blur > base + 10, (base, blur)
    assert noise > base + 10, (base, noise)


def test_flat_or_tiny_image_is_missing():
    signal = Quality()
    flat = sample(png(np.full((300, 400, 3), 128, np.uint8)), signal)
    tiny = sample(png(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)), signal)
    assert [r["quality"] for r in signal.compute_batch([flat, tiny])] == [None, None]
    assert brisque_score(np.zeros((64, 64, 3), np.uint8)) is None
