"""The output loads with the real Hugging Face `datasets` as it is (kept rows, image as PIL, rejects as
a second config). `datasets` needs pyarrow>=24 and numpy 2, which this environment cannot have
(mediapipe needs numpy 1), so it runs from its own venv (`make setup` builds .venv-hf), as a user's
training environment would load the output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import duckdb
from conftest import photo_samples, write_webdataset

from schemas.config import CurateConfig
from tasks.runner import run

HF_PYTHON = Path(__file__).resolve().parent.parent / ".venv-hf" / "bin" / "python"

LOAD = """
import json, sys, datasets, PIL.Image
out = sys.argv[1]
kept = datasets.load_dataset(out, split="train")
rejects = datasets.load_dataset(out, "rejects", split="train")
first = kept[0]["image"]
print(json.dumps({
    "kept_keys": sorted(kept["key"]), "reject_keys": sorted(rejects["key"]),
    "reasons": sorted(set(rejects["reason"])), "image_type": type(kept.features["image"]).__name__,
    "is_pil": isinstance(first, PIL.Image.Image), "size": list(first.size),
    "columns": kept.column_names,
}))
"""


def test_load_dataset_reads_the_output_as_it_is(tmp_path: Path):
    assert HF_PYTHON.exists(), "make setup builds .venv-hf (Hugging Face datasets) for this test"
    write_webdataset(tmp_path / "src" / "00000.tar", photo_samples())
    write_webdataset(tmp_path / "src" / "00001.tar", photo_samples())  # the same keys: duplicate_key rejects
    cfg = CurateConfig.model_validate({"signals": {"resolution": {}, "caption": {}, "sharpness": {}},
                                       "rules": {"sharpness": {"min": 300}}})
    run(tmp_path / "src", tmp_path / "out", cfg, use_ray=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "dtype: image" in card
    result = subprocess.run([str(HF_PYTHON), "-c", LOAD, str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=300, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                              "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    out = tmp_path / "out"
    kept = sorted(k for (k,) in duckdb.sql(f"SELECT key FROM '{out}/shards/*.parquet'").fetchall())
    rejected = sorted(k for (k,) in duckdb.sql(f"SELECT key FROM '{out}/rejects/*.parquet'").fetchall())
    assert got["kept_keys"] == kept and got["reject_keys"] == rejected and kept and rejected
    assert got["reasons"] == ["duplicate_key", "sharpness_below_min"]  # a part left empty by the key pass reads
    assert got["image_type"] == "Image" and got["is_pil"] and min(got["size"]) > 0
    assert "sharpness" in got["columns"] and "reason" not in got["columns"]
