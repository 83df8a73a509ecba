"""The actor's batcher: requests that arrive together share model batches, each caller gets its own
results (or its own error), and an out-of-memory batch is split in two until it fits."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.actors import Batcher, call_splitting_on_oom, is_out_of_memory


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is what the batcher recognises."""


class Model:
    """Doubles numbers; remembers each batch it was given; can be slow, raise on 13, or run out of
    memory above ``fits`` rows."""

    def __init__(self, delay_s: float = 0.0, fits: int = 10**9):
        self.batches: list[list[int]] = []
        self.delay_s, self.fits = delay_s, fits
        self.lock = threading.Lock()

    def __call__(self, rows: list[int]) -> list[int]:
        if len(rows) > self.fits:
            raise OutOfMemoryError(f"CUDA out of memory on {len(rows)} rows")
        if 13 in rows:
            raise ValueError("cannot take 13")
        with self.lock:
            self.batches.append(list(rows))
        time.sleep(self.delay_s)
        return [2 * r for r in rows]


def _concurrently(batcher: Batcher, requests: list[list[int]]) -> list[list[int] | BaseException]:
    out: list[list[int] | BaseException] = [[] for _ in requests]

    def call(i: int) -> None:
        try:
            out[i] = batcher.run(requests[i])
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
        time.sleep(0.01)  # arrive while the first batch is still running
    for t in threads:
        t.join(timeout=30)
    return out


def test_requests_that_arrive_together_share_a_batch_and_each_gets_its_own_rows() -> None:
    model = Model(delay_s=0.2)
    batcher = Batcher(model, batch_size=8)
    requests = [[i * 10 + j for j in range(2)] for i in range(5)]
    results = _concurrently(batcher, requests)
    assert results == [[2 * x for x in r] for r in requests]
    assert batcher.merged >= 1
    assert max(len(b) for b in model.batches) > 2  # rows of several requests in one model call
    assert all(len(b) <= 8 for b in model.batches)
    assert sorted(x for b in model.batches for x in b) == sorted(x for r in requests for x in r)  # each row once


def test_a_request_larger_than_the_model_batch_is_cut_into_model_batches() -> None:
    model = Model()
    assert Batcher(model, batch_size=4).run(list(range(10))) == [2 * x for x in range(10)]
    assert [len(b) for b in model.batches] == [4, 4, 2]


def test_a_raising_row_fails_its_own_request_only() -> None:
    model = Model(delay_s=0.2)
    batcher = Batcher(model, batch_size=16)
    results = _concurrently(batcher, [[1, 2], [12, 13], [3, 4]])
    assert results[0] == [2, 4] and results[2] == [6, 8]
    assert isinstance(results[1], ValueError) and "13" in str(results[1])


def test_out_of_memory_splits_the_batch_until_it_fits() -> None:
    model = Model(fits=3)
    assert Batcher(model, batch_size=16).run(list(range(10))) == [2 * x for x in range(10)]
    assert all(len(b) <= 3 for b in model.batches)
    assert sorted(x for b in model.batches for x in b) == list(range(10))


def test_one_row_that_does_not_fit_is_that_rows_error() -> None:
    with pytest.raises(OutOfMemoryError):
        call_splitting_on_oom(Model(fits=0), [1])


def test_what_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("cannot take 13"))


def test_a_model_returning_the_wrong_number_of_results_is_an_error_not_a_shift() -> None:
    with pytest.raises(RuntimeError, match="2 results for 3 inputs"):
        Batcher(lambda rows: rows[:2], batch_size=8).run([1, 2, 3])


def test_a_request_sent_alone_is_never_merged() -> None:
    """Finding which input kills an actor needs that input alone in its model call."""
    model = Model(delay_s=0.2)
    batcher = Batcher(model, batch_size=16)
    out: dict[int, list[int]] = {}

    def call(i: int, alone: bool) -> None:
        out[i] = batcher.run([i], alone)

    threads = [threading.Thread(target=call, args=(i, i == 2)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(timeout=30)
    assert out == {i: [2 * i] for i in range(5)}
    assert [2] in model.batches  # request 2 ran by itself
    assert batcher.merged >= 1  # while the others still merged


def test_started_is_told_when_a_request_leaves_the_queue_not_when_it_arrives() -> None:
    """What lets a death be charged only to the input in flight: a request waiting behind another
    model call has not started."""
    events: list[str] = []

    def model(rows: list[int]) -> list[int]:
        events.append(f"model {rows}")
        time.sleep(0.3)
        return rows

    batcher = Batcher(model, batch_size=16)
    first = threading.Thread(target=batcher.run, args=([1],), kwargs={"started": lambda: events.append("started 1")})
    first.start()
    time.sleep(0.1)  # the model is on [1]
    assert batcher.run([2], alone=True, started=lambda: events.append("started 2")) == [2]
    first.join(timeout=30)
    assert events == ["started 1", "model [1]", "started 2", "model [2]"]
