"""Which selected rows form which batch, in which order: one bucket per batch, reproducible, resumable.

The epoch plan is a pure function of (seed, epoch, selection, layout), so every rank and every
DataLoader worker computes the same plan on its own and a killed run resumes at the exact batch.
The delivered order does not depend on ``num_workers``: the sampler runs in the main process and
the DataLoader hands its batches to workers in turn and returns them in order.

Order is shuffled in two levels so that reading stays sequential inside row groups (curated parts
have 256-row groups; other Parquet files may have much larger ones): row groups are visited in a
seeded random order, ``interleave`` of them open at once, slices of rows taken from a random open
one, each row group front to back; then rows are shuffled inside windows of ``shuffle_rows``.
Rows go to their bucket and a batch is emitted when its bucket fills, so the rows a reader has
read ahead but not yet used stay about ``shuffle_rows`` + buckets x (batch_size - 1).

Ranks take contiguous blocks of the plan, so no two ranks stream the same stretch of row groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from schemas.config import BucketConfig
from tasks.buckets import BucketAssigner

if TYPE_CHECKING:
    from trainer.row_index import RowIndex

SLICE_ROWS = 16  # rows taken from one open row group before the next random pick


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of this rank: ``rows`` are positions in the RowIndex, all of bucket ``size`` (w, h)."""

    epoch: int
    position: int  # index in this rank's batches for the epoch
    rows: np.ndarray
    size: tuple[int, int]


def bucket_table(resolution: int, bucketed: bool, min_side: int | None = None,
                 max_side: int | None = None) -> tuple[BucketAssigner | None, tuple[tuple[int, int], ...]]:
    """Equal-area buckets at ``resolution`` (sides resolution/4 .. 2x by default, as curation's
    256..2048 at 1024), or the one square when not bucketed."""
    if not bucketed:
        return None, ((resolution, resolution),)
    cfg = BucketConfig(base_side=resolution, min_side=min_side or max(64, resolution // 4),
                       max_side=max_side or resolution * 2)
    assigner = BucketAssigner(cfg)
    return assigner, assigner.buckets


class BucketBatchSampler:
    """Batches (PlannedBatch) of row positions for one rank, every batch from one bucket.

    The training loop calls ``set_epoch(e)`` before each epoch (it keeps the position when ``e`` is
    the epoch in progress, so a resumed run continues mid-epoch), ``record(batch)`` after each step
    it commits, and saves ``state_dict()`` with its checkpoint. Iteration starts at the recorded
    position, so a DataLoader iterator made after ``load_state_dict`` delivers exactly the batches
    an uninterrupted run would have delivered next. Partial batches are dropped (``drop_last``):
    each epoch's leftovers are different rows, as the shuffle differs.
    """

    def __init__(self, index: RowIndex, batch_size: int, *, resolution: int = 1024, bucketed: bool = True,
                 bucket_min_side: int | None = None, bucket_max_side: int | None = None, seed: int = 0,
                 drop_last: bool = True, interleave: int = 8, shuffle_rows: int = 512, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.index, self.batch_size, self.seed, self.drop_last = index, batch_size, seed, drop_last
        self.interleave, self.shuffle_rows = interleave, shuffle_rows
        self.rank, self.world_size = rank, world_size
        assigner, self.buckets = bucket_table(resolution, bucketed, bucket_min_side, bucket_max_side)
        self.bucket_of = self._assign(assigner)
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[np.ndarray]] | None = None

    def _assign(self, assigner: BucketAssigner | None) -> np.ndarray:
        """Bucket id per row: the bucket curation recorded when it is one of ours (same base side),
        else the nearest by log aspect ratio of the upright size. Each distinct size is looked up once."""
        if assigner is None or len(self.index) == 0:
            return np.zeros(len(self.index), dtype=np.int16)
        ix = self.index
        sizes = np.stack([ix.width, ix.height, ix.bucket_width, ix.bucket_height], axis=1)
        unique, inverse = np.unique(sizes, axis=0, return_inverse=True)
        ids = {wh: i for i, wh in enumerate(self.buckets)}
        per_size = np.array([ids.get((int(bw), int(bh)), ids[assigner.assign(int(w), int(h))])
                             for w, h, bw, bh in unique], dtype=np.int16)
        return per_size[inverse.reshape(-1)]

    # -- the plan ---------------------------------------------------------------------------------

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        """Row positions in read order: random row groups, ``interleave`` open at once, random slices."""
        bounds = self.index.group_bounds
        order = rng.permutation(len(bounds) - 1)
        lanes: list[list[int]] = []
        pieces: list[np.ndarray] = []
        nxt = 0
        while lanes or nxt < len(order):
            while len(lanes) < self.interleave and nxt < len(order):
                g = order[nxt]
                lanes.append([int(bounds[g]), int(bounds[g + 1])])
                nxt += 1
            j = int(rng.integers(len(lanes)))
            start, end = lanes[j]
            stop = min(end, start + SLICE_ROWS)
            pieces.append(np.arange(start, stop, dtype=np.int64))
            lanes[j][0] = stop
            if stop == end:
                lanes.pop(j)
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        for lo in range(0, len(stream), self.shuffle_rows):
            stream[lo:lo + self.shuffle_rows] = rng.permutation(stream[lo:lo + self.shuffle_rows])
        return stream

    def plan(self, epoch: int) -> list[np.ndarray]:
        """Every rank's batches of ``epoch`` in emission order: a batch is emitted when its bucket
        fills (ordered by the stream position of its last row); partial batches, if kept, come last."""
        stream = self._stream(np.random.default_rng([self.seed, epoch]))
        bucket = self.bucket_of[stream]
        by_bucket = np.argsort(bucket, kind="stable")  # stream positions, grouped by bucket, in order
        full: list[tuple[int, np.ndarray]] = []
        partial: list[tuple[int, np.ndarray]] = []
        lo = 0
        for count in np.bincount(bucket, minlength=len(self.buckets)):
            group, lo = by_bucket[lo:lo + count], lo + count
            n_full = count // self.batch_size
            for chunk in group[:n_full * self.batch_size].reshape(n_full, self.batch_size):
                full.append((int(chunk[-1]), stream[chunk]))
            if count % self.batch_size and not self.drop_last:
                tail = group[n_full * self.batch_size:]
                partial.append((int(tail[-1]), stream[tail]))
        batches = [rows for _, rows in sorted(full, key=lambda t: t[0])]
        return batches + [rows for _, rows in sorted(partial, key=lambda t: t[0])]

    def rank_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's contiguous block; every rank gets the same count (the plan's tail is cut)."""
        if self._cached is None or self._cached[0] != epoch:
            batches = self.plan(epoch)
            per = len(batches) // self.world_size
            self._cached = (epoch, batches[self.rank * per:(self.rank + 1) * per])
        return self._cached[1]

    def batch(self, epoch: int, position: int) -> PlannedBatch:
        rows = self.rank_batches(epoch)[position]
        return PlannedBatch(epoch, position, rows, self.buckets[int(self.bucket_of[rows[0]])])

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))

    def __iter__(self) -> Iterator[PlannedBatch]:
        """The rest of the current epoch, from the recorded position (fixed when iteration starts)."""
        epoch, start = self.epoch, self.position
        return (self.batch(epoch, k) for k in range(start, len(self.rank_batches(epoch))))

    # -- progress ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at position 0, unless it is the epoch already in progress (a resume)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def record(self, batch: PlannedBatch | dict[str, Any]) -> None:
        """Mark ``batch`` (a PlannedBatch or a loader batch dict) and all before it as consumed."""
        epoch = batch.epoch if isinstance(batch, PlannedBatch) else int(batch["epoch"])
        position = batch.position if isinstance(batch, PlannedBatch) else int(batch["position"])
        self.epoch, self.position = epoch, position + 1

    def _layout(self) -> dict[str, Any]:
        """Everything the order depends on besides (epoch, position)."""
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "interleave": self.interleave, "shuffle_rows": self.shuffle_rows,
                "rows": len(self.index), "selection": self.index.fingerprint(),
                "buckets": [list(b) for b in self.buckets]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable progress plus the layout it is valid for."""
        return {"epoch": self.epoch, "position": self.position, **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped; a changed seed, layout or selection would silently
        reorder the data, so it is an error."""
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume the data order, these changed (saved, now): {changed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
