"""Training data: the selected rows of curated and synthetic shards, streamed in bucketed batches.

``RowIndex`` (trainer/row_index.py) is what a stage selects: file, row, size and bucket per row,
never image bytes. Images are read in the DataLoader's worker, as batches need them, by
``ShardReader`` (trainer/shard_reader.py), so memory is bounded whatever the shards' size.
A batch is one PlannedBatch of the sampler (trainer/buckets_sampler.py) turned into tensors.

An image that fails to decode at train time is logged once per key and its slot in the batch
is taken by another row of the same batch (same bucket), so batches keep their size; if every
row of a batch fails, rows of the same bucket drawn by (seed, epoch, position) stand in.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader, Dataset, get_worker_info

from schemas.config import Bounds
from trainer.buckets_sampler import BucketBatchSampler, PlannedBatch
from trainer.captions import CaptionConfig, choose_caption, uniform
from trainer.row_index import RowIndex
from trainer.shard_reader import ShardReader, ShardRow
from trainer.transforms import cover_crop

__all__ = ["CaptionConfig", "DataConfig", "RowIndex", "loader_throughput", "make_loader", "make_sampler"]

log = logging.getLogger(__name__)

class DataConfig(BaseModel):
    """What a training stage reads and how it batches it."""

    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(default_factory=list)  # curate output dirs, dirs of *.parquet, files or globs
    select: dict[str, Bounds] = Field(default_factory=dict)  # column -> inclusive min/max
    min_short_side: int | None = Field(None, ge=1)
    resolution: int = Field(1024, ge=8, multiple_of=8)  # bucket base side (stage 1: 512)
    bucketed: bool = True
    random_crop: bool = False  # False: centre crop
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    caption: CaptionConfig = Field(default_factory=CaptionConfig)

    @model_validator(mode="after")
    def _bucket_side(self) -> DataConfig:
        if self.bucketed and self.resolution % 64:
            raise ValueError(f"bucketed resolution must be a multiple of 64, not {self.resolution}")
        return self


@dataclass
class _Item:
    pixels: np.ndarray
    time_ids: tuple[int, ...]
    prompt: str
    key: str


class BucketDataset(Dataset):
    """Map-style dataset whose index is a PlannedBatch and whose item is the whole batch (the
    DataLoader runs with batch_size=None and the sampler as its sampler)."""

    def __init__(self, index: RowIndex, sampler: BucketBatchSampler, cfg: DataConfig):
        self.index, self.sampler, self.cfg = index, sampler, cfg
        self._reader: ShardReader | None = None
        self._pid = -1
        self._due: tuple[int, np.ndarray] | None = None
        self._warned: set[str] = set()

    def _prepare(self, epoch: int) -> tuple[ShardReader, np.ndarray]:
        if self._reader is None or self._pid != os.getpid():  # open files after a fork, never share
            self._reader, self._pid, self._due = ShardReader(self.index, self.cfg.caption), os.getpid(), None
        if self._due is None or self._due[0] != epoch:
            due = np.full(len(self.index), -1, dtype=np.int32)
            for k, rows in enumerate(self.sampler.rank_batches(epoch)):
                due[rows] = k
            self._due = (epoch, due)
            self._reader.reset()
        return self._reader, self._due[1]

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        info = get_worker_info()
        reader, due = self._prepare(batch.epoch)
        rows = reader.fetch(batch.rows, due, batch.position, info.num_workers if info else 1)
        items = [self._item(rows[int(p)], batch) for p in batch.rows]
        good = [i for i, item in enumerate(items) if item is not None]
        if not good:
            items = self._stand_ins(batch, reader, due, len(items))
        else:
            items = [item if item is not None else items[min(good, key=lambda j: (j - i) % len(items))]
                     for i, item in enumerate(items)]
        pixels = torch.from_numpy(np.stack([it.pixels for it in items]))
        return {
            "pixel_values": pixels.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0),  # uint8 moves
            "prompts": [it.prompt for it in items],
            "time_ids": torch.tensor([it.time_ids for it in items], dtype=torch.float32),
            "keys": [it.key for it in items],
            "epoch": batch.epoch,
            "position": batch.position,
        }

    def _item(self, row: ShardRow, batch: PlannedBatch) -> _Item | None:
        cfg, key = self.cfg, row.key
        crop = ((uniform(cfg.seed, batch.epoch, key, "crop-top"), uniform(cfg.seed, batch.epoch, key, "crop-left"))
                if cfg.random_crop else None)
        try:
            pixels, time_ids = cover_crop(row.image, batch.size, crop, original=row.original_size)
        except Exception as exc:  # any decode failure: the run goes on
            if key not in self._warned:
                self._warned.add(key)
                log.warning("training skips %s: its image does not decode (%s)", key, exc)
            return None
        prompt = choose_caption(cfg.caption, cfg.seed, batch.epoch, key, row.original, row.machine, row.synthetic)
        return _Item(pixels, time_ids, prompt, key)

    def _stand_ins(self, batch: PlannedBatch, reader: ShardReader, due: np.ndarray, size: int) -> list[_Item]:
        """Every row of ``batch`` failed: rows of the same bucket, drawn by (seed, epoch, position)."""
        same = np.flatnonzero(self.sampler.bucket_of == self.sampler.bucket_of[batch.rows[0]])
        rng = np.random.default_rng([self.cfg.seed, batch.epoch, batch.position])
        found: list[_Item] = []
        for p in rng.permutation(same)[:4 * size]:
            item = self._item(reader.fetch(np.array([p]), due, batch.position, 1)[int(p)], batch)
            if item is not None:
                found.append(item)
            if len(found) == size:
                break
        if not found:
            raise RuntimeError(f"no image of bucket {batch.size} decodes (batch {batch.position} and "
                               f"{4 * size} stand-ins tried): the shards look broken")
        return [found[i % len(found)] for i in range(size)]


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def make_sampler(index: RowIndex, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> BucketBatchSampler:
    return BucketBatchSampler(index, cfg.batch_size, resolution=cfg.resolution, bucketed=cfg.bucketed,
                              seed=cfg.seed, rank=rank, world_size=world_size)


def make_loader(index: RowIndex, sampler: BucketBatchSampler, cfg: DataConfig) -> DataLoader:
    """Batches from ``sampler.position`` on, each made whole in one worker; workers are started per
    iterator (not persistent) so each new iterator sees the sampler's current epoch and position."""
    return DataLoader(BucketDataset(index, sampler, cfg), sampler=sampler, batch_size=None, collate_fn=_as_is,
                      num_workers=cfg.num_workers, prefetch_factor=2 if cfg.num_workers else None)


def loader_throughput(index: RowIndex, cfg: DataConfig, batches: int) -> float:
    """Samples per second over ``batches`` batches of a fresh sampler and loader (worker start-up
    included; epochs wrap)."""
    sampler = make_sampler(index, cfg)
    if len(sampler) == 0:
        raise ValueError("the selection is too small for one batch")
    loader = make_loader(index, sampler, cfg)
    done = samples = 0
    start = time.perf_counter()
    while done < batches:
        for batch in loader:
            samples, done = samples + len(batch["keys"]), done + 1
            sampler.record(batch)
            if done == batches:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    return samples / (time.perf_counter() - start)
