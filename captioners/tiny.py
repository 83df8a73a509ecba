"""Every tiny random model of ``configs/recaption-tiny.yaml``, built offline from configs in seconds.

Their captions and translations are random text; everything around them (loading from a local
folder, batching, Ray pools, sidecars, the trainer's mix) is the real path. ``t2i tiny-models DIR``
and ``make demo`` call ``build_tiny_models``; an existing model folder is kept (built once).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from captioners.tiny_translators import write_tiny_ct2, write_tiny_llm, write_tiny_marian
from captioners.tiny_vlms import write_tiny_cogvlm, write_tiny_qwen2vl, write_tiny_smolvlm


def build_tiny_models(root: Path) -> dict[str, Path]:
    """``root/<name>`` for each tiny model, building those not there yet."""
    root = Path(root)
    builders: dict[str, Callable[[Path], Path]] = {
        "qwen2-vl": write_tiny_qwen2vl,
        "smolvlm": write_tiny_smolvlm,
        "cogvlm": write_tiny_cogvlm,
        "marian": write_tiny_marian,
        "llm": write_tiny_llm,
    }
    built = {}
    for name, build in builders.items():
        folder = root / name
        built[name] = folder if (folder / "config.json").exists() else build(folder)
    ct2 = root / "marian-ct2"
    built["marian-ct2"] = ct2 if (ct2 / "model.bin").exists() else write_tiny_ct2(built["marian"], ct2)
    return built
