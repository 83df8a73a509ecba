"""The output's dataset card (``README.md``), so ``datasets.load_dataset(OUT)`` loads it as it is.

Without a card, Hugging Face ``datasets`` globs every file below the folder: shards and rejects
(whose columns differ) as one table, and ``_manifest/*.json`` as data. The card's YAML header
names two configs, ``default`` (kept rows, ``shards/*.parquet``) and ``rejects``, each with its
features, ``image`` typed as an HF ``Image`` so rows open as PIL images without a cast (the
column holds the original encoded bytes; ``datasets`` wraps them as ``{bytes, path}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from tasks.shards import committed_files
from tasks.storage import Store, as_store

CARD = "README.md"
_DTYPES = {pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
           pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
           pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool",
           pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
           pa.large_binary(): "large_binary"}


def _feature(field: pa.Field) -> dict[str, Any]:
    if field.name == "image" and pa.types.is_binary(field.type):
        return {"name": field.name, "dtype": "image"}
    if pa.types.is_list(field.type) and field.type.value_type in _DTYPES:
        return {"name": field.name, "sequence": _DTYPES[field.type.value_type]}
    if field.type not in _DTYPES:
        raise ValueError(f"column {field.name}: no Hugging Face dtype for {field.type}")
    return {"name": field.name, "dtype": _DTYPES[field.type]}


def _schema(store: Store, kind: str) -> pa.Schema | None:
    """The union of the kind's part schemas (a resumed output may have parts from before a
    column was added), in first-seen column order."""
    fields: dict[str, pa.Field] = {}
    for url in committed_files(store, kind):
        rel = url[len(store.url()) + 1:]
        for field in pq.read_schema(store.open_input_file(rel)):
            fields.setdefault(field.name, field)
    return pa.schema(list(fields.values())) if fields else None


def write_card(out: Store | str | Path) -> str:
    """Write (or rewrite) ``OUT/README.md`` from the committed parts; returns its text."""
    store = as_store(out)
    configs, infos = [], []
    for name, kind in (("default", "shards"), ("rejects", "rejects")):
        schema = _schema(store, kind)
        if schema is None:
            continue
        configs.append({"config_name": name, "data_files": [{"split": "train", "path": f"{kind}/*.parquet"}]})
        infos.append({"config_name": name, "features": [_feature(f) for f in schema]})
    header = yaml.safe_dump({"configs": configs, "dataset_info": infos}, sort_keys=False, allow_unicode=True)
    text = (f"---\n{header}---\n\n# Curated by t2i-curate\n\n"
            "`default`: the kept rows (`shards/`); `rejects`: every dropped row with its `reason` and `error`.\n\n"
            "```python\nimport datasets\n"
            "kept = datasets.load_dataset(OUT, split=\"train\")            # image: PIL images\n"
            "rejects = datasets.load_dataset(OUT, \"rejects\", split=\"train\")\n```\n")
    store.write_bytes(CARD, text.encode())
    return text
