"""`make demo`: build a small img2dataset-style sample from photos that registry packages
ship, curate it and recaption it (tiny random models, built offline), and print the stats.
Nothing is downloaded."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import yaml

SAMPLES_PER_TAR = 10


def _package_dir(package: str) -> Path:
    if package == "skimage":
        return Path(str(resources.files("skimage") / "data"))
    if package == "matplotlib":
        return Path(str(resources.files("matplotlib") / "mpl-data" / "sample_data"))
    raise ValueError(f"unknown package {package!r} in demo_captions.yaml")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def build_sample(dest: Path) -> Path:
    """Write the demo sample as webdataset tars (KEY.ext + KEY.txt + KEY.json); idempotent."""
    entries = yaml.safe_load((Path(__file__).parent / "demo_captions.yaml").read_text(encoding="utf-8"))
    dest.mkdir(parents=True, exist_ok=True)
    for shard in range(0, len(entries), SAMPLES_PER_TAR):
        path = dest / f"{shard // SAMPLES_PER_TAR:05d}.tar"
        if path.exists():
            continue
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for i, entry in enumerate(entries[shard : shard + SAMPLES_PER_TAR]):
                key = f"{shard // SAMPLES_PER_TAR:05d}{i:04d}"
                data = (_package_dir(entry["package"]) / entry["file"]).read_bytes()
                _add(tar, f"{key}.{entry['file'].rsplit('.', 1)[1]}", data)
                _add(tar, f"{key}.txt", entry["caption"].encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps({"key": key, "file": entry["file"]}).encode())
        tmp.rename(path)
    return dest


def tiny_caption_config(root: Path) -> Path:
    """configs/recaption-tiny.yaml with its models built under ``root`` and named by absolute path."""
    from captioners.tiny import build_tiny_models

    models = build_tiny_models(root / "tiny-models")
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "recaption-tiny.yaml").read_text())
    cfg["captioner"]["path"] = str(models["qwen2-vl"])
    cfg["translator"]["path"] = str(models["marian-ct2"])
    path = root / "recaption-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """Start the local stack, run `prefect deployment run curate/laion` on the sample (curation,
    then machine captions with the tiny models), wait, print the stats; the server stays up so the
    run can be looked at in the UI."""
    from pipelines.stack import prefect_env, up
    from t2i.cli import main as t2i

    root = Path(argv[0] if argv else "demo-out").resolve()
    source = build_sample(root / "source")
    print(f"demo sample: {source}")
    stack = up()
    out = root / "curated"
    captions = tiny_caption_config(root)
    cmd = [str(Path(sys.executable).with_name("prefect")), "deployment", "run", "curate/laion",
           "--param", f"source={source}", "--param", f"out={out}", "--param", f"caption_config={captions}",
           "--watch", "--watch-timeout", "900"]
    print("$", " ".join(cmd[1:]))
    code = subprocess.run(cmd, env=prefect_env(stack.api_url), stdout=subprocess.DEVNULL).returncode
    print(f"flow run {'completed' if code == 0 else 'FAILED'}\n")
    t2i(["stats", str(out)])
    print(f"\nPrefect UI (server left running; `t2i down` stops it): {stack.ui_url}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
