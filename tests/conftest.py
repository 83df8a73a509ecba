"""Shared fixtures: the real test photos, corpus writers, one Ray runtime per session."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(p for p in DATA.iterdir() if p.suffix in (".jpg", ".png"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def photo(name: str) -> bytes:
    return (DATA / name).read_bytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(path: Path, samples: Iterable[tuple[str, bytes | None, bytes | str | None, str]]) -> Path:
    """samples: (key, image bytes or None, caption (str or raw bytes) or None, image extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption, ext in samples:
            if image is not None:
                add_member(tar, f"{key}.{ext}", image)
            if caption is not None:
                add_member(tar, f"{key}.txt", caption.encode() if isinstance(caption, str) else caption)
            add_member(tar, f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
    return path


def photo_samples(prefix: str = "") -> Iterator[tuple[str, bytes, str, str]]:
    for i, p in enumerate(PHOTOS):
        yield f"{prefix}{i:09d}", p.read_bytes(), f"a photo called {p.stem}", p.suffix.lstrip(".")


@pytest.fixture(scope="session")
def ray_runtime():
    """One local Ray for the session (about 3 s); ``address="local"`` ignores stale clusters.
    Four logical CPUs on two cores: two for shard tasks, two for model actors, as
    ``tasks.runner.ensure_ray`` would size it."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,  # tests' own modules too:
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """One Prefect server and process worker (``t2i up``) for every module that runs deployments
    (tests/test_prefect_flow.py, tests/test_prefect_caption.py): starting them costs ~25 s."""
    from s3_server import _free_ports

    state = tmp_path_factory.mktemp("t2i-state")
    os.environ["T2I_STATE_DIR"] = str(state)
    from pipelines import stack as stack_mod

    started = stack_mod.up(port=_free_ports(1)[0])
    env = stack_mod.prefect_env(started.api_url)
    yield stack_mod, started, env
    stack_mod.down()
    os.environ.pop("T2I_STATE_DIR", None)
