"""Aesthetic plumbing with a tiny random CLIP and a random real-architecture head: offline, end to end.

The scores mean nothing here; what is checked is loading (local files only, tensors only),
preprocessing, batching, determinism and the messages that name a missing file.
"""

from __future__ import annotations

import json
import math
import pickle
import socket
import time
from pathlib import Path

import pytest
from conftest import PHOTOS
from tiny_models import TINY_CLIP_CONFIG, aesthetic_head_state, tiny_aesthetic_params, write_aesthetic_head

from tasks.decode import ImageSample
from tasks.signals import registry
from tasks.signals.aesthetic import Aesthetic, AestheticParams, load_mlp
from tasks.signals.base import Sample

torch = pytest.importorskip("torch")


class Payload:
    """Any non-tensor object: weights_only loading must refuse to rebuild it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return tiny_aesthetic_params(tmp_path_factory.mktemp("tiny_aesthetic"))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """No hub and no sockets; torch's thread count restored (setup sets it process-wide)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def samples(signal: Aesthetic, paths: list[Path] = PHOTOS) -> list[Sample]:
    side = signal.pixel_side()
    return [
        Sample(p.name, None, ImageSample(p.read_bytes(), max_pixels=10**8, max_file_bytes=10**8, decode_side=side))
        for p in paths
    ]


def scores(signal: Aesthetic, batch: list[Sample]) -> list[float]:
    return [r["aesthetic"] for r in signal.compute_batch(batch)]


def test_end_to_end_finite_deterministic_distinct(tiny, capsys):
    signal = Aesthetic(AestheticParams(**tiny, batch_size=4))
    assert registry()["aesthetic"] is Aesthetic and signal.cost == 300
    assert signal.unavailable() is None
    assert signal.pixel_side() == TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    batch = samples(signal)
    first = scores(signal, batch)
    t0 = time.perf_counter()
    second = scores(signal, batch)
    ms = (time.perf_counter() - t0) * 1000 / len(batch)
    assert all(math.isfinite(s) for s in first)
    assert first == second
    assert len({round(s, 6) for s in first}) == len(first)  # every photo scores differently
    one_by_one = [scores(signal, [s])[0] for s in batch]  # batching (chunks of 4) changes nothing
    assert one_by_one == pytest.approx(first, abs=1e-5)
    with capsys.disabled():
        print(f"\naesthetic, tiny CLIP ({signal.pixel_side()} px), {torch.get_num_threads()} thread(s): "
              f"{ms:.1f} ms/image")


def test_pth_head_loads_like_safetensors(tiny, tmp_path):
    pth = write_aesthetic_head(tmp_path / "head.pth")
    a = Aesthetic(AestheticParams(**tiny))
    b = Aesthetic(AestheticParams(**(tiny | {"mlp_weights": str(pth)})))
    batch = samples(a, PHOTOS[:3])
    assert scores(a, batch) == scores(b, batch)


def test_pickled_object_in_head_is_refused(tiny, tmp_path):
    evil = tmp_path / "head.pth"
    torch.save(aesthetic_head_state() | {"extra": Payload()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_mlp(str(evil))
    signal = Aesthetic(AestheticParams(**(tiny | {"mlp_weights": str(evil)})))
    with pytest.raises(pickle.UnpicklingError):
        signal.compute_batch(samples(signal, PHOTOS[:1]))


def test_unavailable_names_the_missing_file(tiny, tmp_path):
    assert Aesthetic().unavailable() == "aesthetic: clip_weights not set; mlp_weights not set"
    missing = tmp_path / "nope" / "head.pth"
    message = Aesthetic(AestheticParams(**(tiny | {"mlp_weights": str(missing)}))).unavailable()
    assert message == f"aesthetic: mlp_weights file not found: {missing}"
    message = Aesthetic(AestheticParams(**(tiny | {"clip_model": str(tmp_path / "gone.json")}))).unavailable()
    assert message == f"aesthetic: clip_model config not found: {tmp_path / 'gone.json'}"
    signal = Aesthetic(AestheticParams(**(tiny | {"clip_weights": str(tmp_path / "w.safetensors")})))
    with pytest.raises(FileNotFoundError, match="clip_weights file not found"):
        signal.setup()


def test_params_refuse_hub_and_unsafe_formats(tiny):
    for bad in ({"clip_model": "hf-hub:laion/CLIP-ViT-L-14"}, {"clip_model": "local-dir:/x"},
                {"mlp_weights": "/x/head.bin"}, {"pretrained": "openai"}):
        with pytest.raises(ValueError):
            AestheticParams(**bad)
    relative = AestheticParams(clip_weights="w.safetensors", mlp_weights="h.pth")
    assert Path(relative.clip_weights).is_absolute() and Path(relative.mlp_weights).is_absolute()


def test_configs_that_would_reach_a_hub_or_shadow_a_builtin_are_refused(tiny, tmp_path):
    hf_text = tmp_path / "t2i-hf-text.json"
    hf_text.write_text(json.dumps(TINY_CLIP_CONFIG | {"text_cfg": {"hf_model_name": "bert-base-uncased"}}))
    with pytest.raises(ValueError, match="Hugging Face text tower"):
        Aesthetic(AestheticParams(**(tiny | {"clip_model": str(hf_text)}))).setup()
    clash = tmp_path / "ViT-L-14-quickgelu.json"
    clash.write_text(json.dumps(TINY_CLIP_CONFIG))
    with pytest.raises(ValueError, match="clashes"):
        Aesthetic(AestheticParams(**(tiny | {"clip_model": str(clash)}))).setup()
