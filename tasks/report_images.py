"""Images for the report's tiles (tasks/report.py): kept rows' bytes from the committed parts, reading only
the row groups that hold the sampled rows; rejects' bytes read again from their source shards; and the
thumbnails, decoded with curation's own limits."""

from __future__ import annotations

import base64
import io
from collections import defaultdict
from pathlib import PurePosixPath

import pyarrow.parquet as pq

from schemas.config import DecodeConfig, SourceConfig, StorageConfig
from tasks.decode import ImageSample
from tasks.storage import Store

THUMB_SIDE = 160  # long side of a thumbnail, px


def thumbnail(data: bytes, decode: DecodeConfig) -> str:
    """A JPEG data URI, long side <= THUMB_SIDE; decoded with curation's bomb and size limits
    (``DecodeError`` when it will not decode)."""
    sample = ImageSample(data, max_pixels=decode.max_pixels, max_file_bytes=decode.max_file_bytes,
                         decode_side=THUMB_SIDE)
    img = sample.pixels().copy()
    img.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=70, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def part_images(store: Store, wanted: list[tuple[str, int]]) -> dict[tuple[str, int], bytes | str]:
    """(part file, row number) -> image bytes, reading only the row groups that hold them."""
    by_file: dict[str, set[int]] = defaultdict(set)
    for name, row in wanted:
        by_file[name].add(row)
    found: dict[tuple[str, int], bytes | str] = {}
    root = store.url()
    for name, rows in by_file.items():
        rel = name[len(root) + 1:] if name.startswith(root + "/") else name
        try:
            with store.open_input_file(rel) as fh:
                part = pq.ParquetFile(fh)
                start = 0
                for g in range(part.num_row_groups):
                    n = part.metadata.row_group(g).num_rows
                    here = sorted(r for r in rows if start <= r < start + n)
                    if here:
                        images = part.read_row_group(g, columns=["image"]).column("image")
                        for r in here:
                            found[(name, r)] = images[r - start].as_py()
                    start += n
        except OSError as exc:
            for r in rows:
                found.setdefault((name, r), f"part unreadable: {exc}")
    return found


def source_images(source: str, keys: set[str], run_source: str, source_cfg: SourceConfig,
                  decode: DecodeConfig, storage: StorageConfig | None = None) -> dict[str, bytes | str]:
    """key -> image bytes for ``keys`` of one source shard (``source``, as a reject row names it), or
    the text saying why there are none. A tar or Parquet file is read with the source's own reader
    until every key is found; a folder source's row names its image file, read as it is."""
    from tasks.sources import SourceShard, read_shard, synth
    from tasks.sources.base import IMAGE_EXTENSIONS, first_line, open_stream, shard_id_of, stat, too_large

    if source.startswith(synth.SCHEME):  # rendered again from the run's own settings: the same bytes
        if source_cfg.synth is None:
            return dict.fromkeys(keys, "the run's stamp has no source.synth settings")
        return synth.render_keys(keys, source_cfg.synth, storage)
    name = PurePosixPath(source).name
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    limit = decode.max_file_bytes
    if suffix in IMAGE_EXTENSIONS:  # a folder source: the row's source is its image file
        key = next(iter(keys))
        try:
            size = stat(source, storage)[0]
            if size > limit:
                return dict.fromkeys(keys, too_large(size, limit, name))
            with open_stream(source, storage) as fh:
                return dict.fromkeys(keys, fh.read(limit + 1))
        except OSError as exc:
            return {key: f"source unreadable: {first_line(exc)}" for key in keys}
    if suffix == "tar":
        shard = SourceShard(shard_id_of(name), "webdataset", source)
    elif suffix == "parquet":  # the member below the source root makes the keys of a file without a key column
        rel = source[len(run_source) + 1:] if source.startswith(run_source.rstrip("/") + "/") else name
        shard = SourceShard(shard_id_of(rel), "parquet", source, (rel,))
    else:
        return dict.fromkeys(keys, f"source {source} cannot be read again")
    found: dict[str, bytes | str] = {}
    batches = read_shard(shard, source_cfg, limit, storage)
    try:
        for batch in batches:
            for key, image, error in zip(batch.column("key").to_pylist(), batch.column("image").to_pylist(),
                                         batch.column("source_error").to_pylist(), strict=True):
                if key in keys and key not in found:
                    found[key] = image if image is not None else (error or "no image in the source")
            if len(found) == len(keys):
                break
    except Exception as exc:  # a source gone or broken since: the tiles say so
        return {**{k: f"source unreadable: {first_line(exc)}" for k in keys}, **found}
    finally:
        batches.close()
    return {**dict.fromkeys(keys, "not found in its source (changed since curation?)"), **found}
