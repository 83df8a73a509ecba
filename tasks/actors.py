"""Models in Ray actor pools: each model loaded once per actor, fed in batches.

The driver starts one pool per model signal (curation) or model stage (a pass over shards), sized
from its ``PoolSpec`` (actors, CPUs and GPUs per actor, model batch), and hands the actor handles
to every shard or part task; an actor merges the requests of many tasks into model batches. A shard
task decodes and prepares its images (``ModelSignal.prepare``) and sends batches to the
pool, so the image is decoded once, in the task, and the model never is loaded twice.

Faults are told apart by what they say about the row. A model that raises on an input is
that input's error (``ItemError``, with the model's own text). An actor that dies is, by
default, no fault of the row: it was OOM-killed, its node was preempted, someone killed it,
or another shard's input crashed it. Ray reports all of these alike (``ActorUnavailableError``
for the calls it was serving), so the batch is sent again once, then its inputs one at a
time, each only after an actor of the pool answers ``ready``. Only an input whose lone call
kills a live actor twice is rejected for it. Actors restart without limit (a finite budget
would be spent by that many poison images over a long run); a pool none of whose actors
comes back fails the shard (``PoolUnavailable``), so a later run redoes it.

Deadlines. Every model call may run ``deadline_s`` plus ``deadline_per_row_s`` per row in it
(a signal's params, a stage's resources; ``Deadline``). The actor times its own model calls,
not the caller: only the actor knows when a call starts (a request may wait behind other
tasks' batches), and a call must end even when the task that sent it is gone. Past the
deadline faulthandler's watchdog, a C thread that needs no GIL (a model stuck in C code holding
it is caught too), writes every thread's stack to the actor's log (where the model hung) and
ends the process; Ray restarts the actor and its calls are handled as any actor death above,
so an input that hangs every time is rejected with a reason naming the deadline. Without Ray
(``--no-ray``, ``ModelSignal.compute_batch``, ``tasks.sidecar.infer_here``) there is no process
to end but the run's own: there a hung model hangs the run, which is for tests and debugging.

Blame. An actor's death is charged only to the lone input it was running, not to lone inputs
of other tasks waiting behind it on that actor (a poison row of one shard must not get an
innocent row of another rejected). The actor's own record dies with it, so before a lone call
runs the actor records its token in the pool's ``Ledger``, a small actor beside the pools,
and waits for the write; a caller whose lone call died asks the ledger whether it had started
and how long it ran. One that never started is sent again, uncharged (at most
``UNSTARTED_DEATHS`` times, then the pool counts as unavailable). A ledger that does not answer
the caller charges the death, as if there were none; one that missed a start (it was restarting
after its node was lost) leaves that death uncharged, within the same bound.
"""

from __future__ import annotations

import faulthandler
import functools
import itertools
import logging
import math
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray

from schemas.config import DEADLINE_PER_ROW_S, DEADLINE_S, ConfigError
from tasks.signals import Signal
from tasks.signals.base import ModelSignal

log = logging.getLogger(__name__)

# How long a dead actor may take to come back (reload its model) before its pool counts as gone.
RESTART_TIMEOUT_S = 600.0
# Deaths of a live actor, each on one input sent alone, that make the input the cause.
DEATHS_TO_BLAME = 2
# Requests one actor holds at once (from many shard or part tasks), merged into model batches.
ACTOR_CONCURRENCY = 16
# Deaths of a lone call before it ran (other inputs killed the actor) after which the pool counts as
# unavailable: a bound on retries, far above what a few poison inputs cost a waiting row (two each).
UNSTARTED_DEATHS = 10
# Lone calls whose start the ledger keeps: a caller asks about its own right after the death.
LEDGER_ENTRIES = 10_000
# How long an actor or a caller waits on the ledger before going on without it.
LEDGER_TIMEOUT_S = 30.0
# faulthandler takes no longer timeout (a deadline of days is none).
MAX_WATCH_S = 1e9


@dataclass(frozen=True)
class ItemError:
    """One input the model could not take: the text of the model's own error."""

    error: str


class PoolUnavailable(RuntimeError):
    """No actor of a pool answers: the shard fails (and is redone later), rows are not blamed."""


class ModelFailing(RuntimeError):
    """A model failed on most rows: a broken model or setup, not bad rows. The run or pass stops
    rather than writing a pool's worth of errors and calling it done."""


# A model must fail on at least this many rows of a unit of work (a shard, a part), and on more than
# run.max_signal_error_fraction of those it ran on, before the unit fails for it: one poison image in a
# small shard is that image's error, not a broken model. Mid-unit it must also have run on at least
# MIN_TRIED_TO_FAIL rows (a few odd images left after cheap rules removed most of a shard are not a
# broken model); at the end of a unit whatever it ran on counts, so small units cannot hide one.
MIN_ERRORS_TO_FAIL = 3
MIN_TRIED_TO_FAIL = 10


class ErrorRate:
    """Per model (a signal, a stage): the rows it ran on and failed on in one unit of work."""

    def __init__(self, kind: str, unit: str, error: type[ModelFailing] = ModelFailing):
        self.kind, self.unit, self.error = kind, unit, error
        self.tried: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def fail(self, name: str, error: str) -> None:
        self.failed[name] += 1
        self.first.setdefault(name, error)

    def check(self, limit: float, *, whole: bool = False) -> None:
        """Raise ``self.error`` for the first model over the limit (``whole``: the unit is done)."""
        for name, failed in self.failed.items():
            tried = self.tried[name]
            enough = whole or tried >= MIN_TRIED_TO_FAIL
            if failed >= MIN_ERRORS_TO_FAIL and enough and failed > limit * tried:
                raise self.error(
                    f"{self.kind} {name} failed on {failed} of the {tried} rows it ran on so far in this {self.unit} "
                    f"(more than run.max_signal_error_fraction {limit:g}); its first error: {self.first[name]}")


@dataclass(frozen=True)
class Deadline:
    """How long one model call may run: ``seconds`` plus ``per_row_s`` for each row in it (the
    config's ``deadline_s`` and ``deadline_per_row_s``)."""

    seconds: float = DEADLINE_S
    per_row_s: float = DEADLINE_PER_ROW_S

    def limit(self, rows: int) -> float:
        return self.seconds + self.per_row_s * rows


@dataclass(frozen=True)
class Resources:
    """What one actor of a pool asks Ray for, how many actors the pool has, and how long one of
    its model calls may run."""

    cpus: float = 1.0
    gpus: float = 0.0
    actors: int = 1
    deadline: Deadline = Deadline()


@dataclass(frozen=True)
class PoolSpec:
    """One model pool: ``cls(cls.Params.model_validate(params))`` is built in each actor, loaded
    once (``ensure_setup``), then fed lists of prepared inputs (``infer``). Model signals and the
    caption pass's stages are both such classes: one pool mechanism for both."""

    name: str
    cls: type
    params: dict[str, Any]
    resources: Resources
    batch_size: int  # the model's own batch: requests are merged up to this many rows


class Batcher:
    """Merges the requests that arrive at one actor at once into model batches.

    The actor serves up to ``ACTOR_CONCURRENCY`` calls in threads; each call queues its inputs.
    Whichever call finds the model idle runs it on the queued requests, taken in arrival order up
    to ``batch_size`` rows (a larger request is cut into model batches), so requests from many
    parts share a batch and a GPU does not wait on one part's preparation. A merged batch that
    raises is run again request by request, so each caller gets its own outcome; an out-of-memory
    error splits the batch in two and retries each half.
    """

    def __init__(self, fn: Callable[[list[Any]], list[Any]], batch_size: int):
        self.fn, self.batch_size = fn, batch_size
        self.cond = threading.Condition()
        self.queue: deque[_Request] = deque()
        self.busy = False
        self.batches = 0  # model calls made: for tests and the benchmark
        self.merged = 0  # of them, batches holding more than one request

    def run(self, inputs: list[Any], alone: bool = False, started: Callable[[], None] | None = None) -> list[Any]:
        """``alone``: never merged with other requests (an input sent by itself to find out whether it
        is what kills the actor must be the only one in its model call). ``started``: called (it must
        not raise) just before the first model call on these inputs, once they left the queue."""
        request = _Request(list(inputs), alone=alone, started=started)
        with self.cond:
            self.queue.append(request)
            while not request.done:
                if self.busy:
                    self.cond.wait()
                    continue
                self.busy, taken = True, self._take()
                self.cond.release()
                try:
                    self._serve(taken)
                finally:
                    self.cond.acquire()
                    self.busy = False
                    self.cond.notify_all()
        return request.outcome()

    def _take(self) -> list[_Request]:
        taken = [self.queue.popleft()]
        if taken[0].alone:
            return taken
        rows = len(taken[0].inputs)
        while self.queue and not self.queue[0].alone and rows + len(self.queue[0].inputs) <= self.batch_size:
            rows += len(self.queue[0].inputs)
            taken.append(self.queue.popleft())
        return taken

    def _serve(self, taken: list[_Request]) -> None:
        try:
            for r in taken:
                if r.started is not None:
                    r.started()
            out = self._call([x for r in taken for x in r.inputs])
            self.merged += len(taken) > 1
            at = 0
            for r in taken:
                r.result, at = out[at : at + len(r.inputs)], at + len(r.inputs)
        except Exception as exc:
            if len(taken) == 1:
                taken[0].error = exc
            else:  # whose input raised? each request alone
                for r in taken:
                    try:
                        r.result = self._call(r.inputs)
                    except Exception as one:
                        r.error = one
        except BaseException as exc:  # the actor is going down: no caller waits forever
            for r in taken:
                r.error = r.error or exc
            raise
        finally:
            for r in taken:
                r.done = True

    def _call(self, rows: list[Any]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(rows), self.batch_size):
            out += call_splitting_on_oom(self._counted, rows[i : i + self.batch_size])
        return out

    def _counted(self, rows: list[Any]) -> list[Any]:
        self.batches += 1
        out = self.fn(rows)
        if len(out) != len(rows):
            raise RuntimeError(f"the model returned {len(out)} results for {len(rows)} inputs")
        return out


@dataclass
class _Request:
    inputs: list[Any]
    alone: bool = False
    started: Callable[[], None] | None = None
    result: list[Any] | None = None
    error: BaseException | None = None
    done: bool = False

    def outcome(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return self.result or []


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or another framework's error saying so."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def call_splitting_on_oom(fn: Callable[[list[Any]], list[Any]], rows: list[Any]) -> list[Any]:
    """``fn(rows)``; on out-of-memory, free what the allocator caches and do each half alone, down to
    one row (whose OOM is then its own error)."""
    try:
        return fn(rows)
    except Exception as exc:
        if not is_out_of_memory(exc) or len(rows) < 2:
            raise
    log.warning("out of memory on a batch of %d; splitting it in two", len(rows))
    _free_cached_memory()
    half = len(rows) // 2
    return call_splitting_on_oom(fn, rows[:half]) + call_splitting_on_oom(fn, rows[half:])


def _free_cached_memory() -> None:
    import sys

    torch = sys.modules.get("torch")  # only a model that uses torch can have run out of its memory
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def deadline_watch(limit_s: float) -> Iterator[None]:
    """End this process if the block runs past ``limit_s``, after writing every thread's stack to
    stderr (an actor's log: where the model hung). For actors only: Ray restarts one; anywhere else
    it would end the run. One watch per process at a time, as a Batcher runs one model call."""
    faulthandler.dump_traceback_later(min(limit_s, MAX_WATCH_S), exit=True, file=_stderr())
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _stderr() -> Any:
    """stderr as faulthandler needs it (with a file descriptor), else /dev/null: the end matters,
    the stack is a bonus."""
    for f in (sys.stderr, sys.__stderr__):
        try:
            f.fileno()
            return f
        except (AttributeError, ValueError, OSError):
            continue
    return _devnull()


@functools.cache
def _devnull() -> Any:
    return open(os.devnull, "w")  # kept open: faulthandler writes to it at any later watch


# max_restarts=-1: a finite budget is spent by that many poison images over a long run, and then
# every later shard fails. max_task_retries=0: Ray would rerun a killing batch on the restarted
# actor, only to die again; infer_on_pool retries (item by item) itself.
@ray.remote(max_restarts=-1, max_task_retries=0)
class ModelActor:
    """Holds one loaded model (a model signal or a pass's stage) and batches what it is sent."""

    def __init__(self, cls: type, params: dict[str, Any], batch_size: int, deadline: Deadline = Deadline(),
                 ledger: Any = None):
        """``cls`` itself, not its name, so a class the driver registered (a test's) loads too."""
        from tasks.alloc import keep_large_allocations

        keep_large_allocations()  # model inputs of a few MB each reuse the heap (tasks/alloc.py)
        self.model = cls(cls.Params.model_validate(params))
        self.model.ensure_setup()
        self.deadline, self.ledger = deadline, ledger
        self.batcher = Batcher(self._infer_in_time, batch_size)

    def _infer_in_time(self, rows: list[Any]) -> list[Any]:
        with deadline_watch(self.deadline.limit(len(rows))):
            return self.model.infer(rows)

    def infer(self, inputs: list[Any], alone: bool = False, token: str | None = None) -> list[Any]:
        """``token`` (a lone call's): written to the ledger just before the model runs on ``inputs``."""
        started = None if token is None or self.ledger is None else lambda: self._record(token, len(inputs))
        return self.batcher.run(inputs, alone, started)

    def _record(self, token: str, rows: int) -> None:
        try:
            ray.get(self.ledger.start.remote(token, self.deadline.limit(rows)), timeout=LEDGER_TIMEOUT_S)
        except ray.exceptions.RayError as exc:  # run anyway: a death now is charged to no input
            log.warning("the pool's ledger did not answer (%s); running the input unrecorded", _cause_text(exc))

    def ready(self) -> bool:
        return True

    def batch_counts(self) -> tuple[int, int]:
        """(model batches run, of them merged from several requests)."""
        return self.batcher.batches, self.batcher.merged

    def pid(self) -> int:
        """For tests and operators who kill an actor on purpose."""
        return os.getpid()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Ledger:
    """The lone calls of a run's pools that started running: what outlives the actor that ran them."""

    def __init__(self) -> None:
        self.runs: OrderedDict[str, tuple[float, float]] = OrderedDict()  # token -> (start, deadline)

    def start(self, token: str, limit_s: float) -> None:
        self.runs[token] = (time.monotonic(), limit_s)
        while len(self.runs) > LEDGER_ENTRIES:
            self.runs.popitem(last=False)

    def ran(self, token: str) -> tuple[float, float] | None:
        """(seconds since the call started, its deadline), or None: it never started."""
        run = self.runs.pop(token, None)
        return None if run is None else (time.monotonic() - run[0], run[1])


class Pool(list):
    """One pool's actor handles (a list, as tasks use them) and the ledger its actors write to;
    a plain list of handles works too, with every death of a lone call charged."""

    ledger: Any = None


Pools = dict[str, Pool]  # pool name -> actor handles


def pool_specs(signals: Sequence[Signal]) -> list[PoolSpec]:
    """The pools of the model signals among ``signals``."""
    return [PoolSpec(s.name, type(s), s.params.model_dump(),
                     Resources(s.params.cpus_per_actor, s.params.gpus_per_actor, s.params.actors,
                               Deadline(s.params.deadline_s, s.params.deadline_per_row_s)), s.params.batch_size)
            for s in signals if isinstance(s, ModelSignal)]


def pool_resources(specs: Sequence[PoolSpec]) -> tuple[float, float]:
    """(CPUs, GPUs) that these pools reserve."""
    return (sum(p.resources.actors * p.resources.cpus for p in specs),
            sum(p.resources.actors * p.resources.gpus for p in specs))


def start_pools(specs: Sequence[PoolSpec], timeout_s: float = 900.0) -> Pools:
    """Start every pool's actors (and one ledger for them all) and wait until each has loaded its
    model, so a missing weight file fails the run at start, not hours in; never wait forever."""
    pools: Pools = {}
    ledger = Ledger.remote() if specs else None
    for spec in specs:
        r = spec.resources
        pools[spec.name] = Pool(
            ModelActor.options(num_cpus=r.cpus, num_gpus=r.gpus, max_concurrency=ACTOR_CONCURRENCY).remote(
                spec.cls, spec.params, spec.batch_size, r.deadline, ledger)
            for _ in range(r.actors)
        )
        pools[spec.name].ledger = ledger
    try:
        ray.get([h.ready.remote() for handles in pools.values() for h in handles], timeout=timeout_s)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
        stop_pools(pools)  # a model that does not load is the config's (weights, setup), not a bug here
        raise ConfigError(f"the model pools of {', '.join(pools)} did not start within {timeout_s:g} s: "
                          f"{_cause_text(exc)}") from exc
    return pools


def stop_pools(pools: Pools) -> None:
    ledgers = []
    for handles in pools.values():
        for h in handles:
            ray.kill(h)
        ledger = getattr(handles, "ledger", None)
        if ledger is not None and ledger not in ledgers:
            ledgers.append(ledger)
    for ledger in ledgers:
        ray.kill(ledger)


Result = dict[str, Any] | ItemError


def infer_on_pool(handles: list[Any], inputs: list[Any], batch_size: int) -> list[Result]:
    """Spread batches over the pool from a random actor; one value dict, or an ``ItemError``,
    per input. A batch that fails is sent again whole once (its actor was killed from outside,
    say, or ended at the deadline), then one input at a time (see the module docstring)."""
    if not inputs:
        return []
    start = random.randrange(len(handles))
    actors = itertools.cycle(handles[start:] + handles[:start])
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    refs = [next(actors).infer.remote(b) for b in batches]
    out: list[Result] = []
    for batch, ref in zip(batches, refs, strict=True):
        try:
            out += ray.get(ref)
            continue
        except ray.exceptions.RayTaskError as exc:  # the model raised: find the input(s), keep the rest
            log.warning("the model raised on a batch (%s); retrying its inputs one by one", _cause_text(exc))
        except ray.exceptions.RayError:  # the actor died: likely no fault of this batch, send it again
            log.warning("a model actor died during a batch (or ran past its deadline); sending the batch again")
            try:
                out += ray.get(_ready_actor(handles).infer.remote(batch))
                continue
            except ray.exceptions.RayError:
                log.warning("the batch failed again; retrying its inputs one by one")
        out += [_infer_one(handles, item) for item in batch]
    return out


def _infer_one(handles: list[Any], item: Any) -> Result:
    """One input alone, on an actor that has just answered ``ready``. Only deaths of calls that had
    started running it count against it; one that died waiting (another input killed the actor)
    is sent again."""
    deaths = late = waited = 0
    while True:
        token = uuid.uuid4().hex
        try:
            return ray.get(_ready_actor(handles).infer.remote([item], alone=True, token=token))[0]
        except ray.exceptions.RayTaskError as exc:
            return ItemError(_cause_text(exc))
        except ray.exceptions.RayError as exc:
            ran = _ran(handles, token)
            if ran is None:
                waited += 1
                if waited >= UNSTARTED_DEATHS:
                    raise PoolUnavailable(f"the model actors died {waited} times while one input waited to run "
                                          "(other inputs killing them, or something outside)") from exc
                log.warning("a model actor died before it ran an input sent alone; sending the input again")
                continue
            deaths += 1
            seconds, limit = ran
            late += seconds >= limit  # the actor ends itself at its deadline: one that ran so long was ended by it
            if deaths >= DEATHS_TO_BLAME:
                return ItemError(_blame(deaths, late, limit, exc))
            log.warning("a model actor died on one input sent alone; trying it once more")


def _ran(handles: list[Any], token: str) -> tuple[float, float] | None:
    """The ledger's answer for a lone call that died: (seconds since it started, its deadline), or
    None when it never started. Without a ledger, or when it does not answer, the call counts as
    started (charged) and not late."""
    ledger = getattr(handles, "ledger", None)
    if ledger is None:
        return 0.0, math.inf
    try:
        return ray.get(ledger.ran.remote(token), timeout=LEDGER_TIMEOUT_S)
    except ray.exceptions.RayError as exc:
        log.warning("the pool's ledger did not answer (%s); charging the death to the input", _cause_text(exc))
        return 0.0, math.inf


def _blame(deaths: int, late: int, limit_s: float, exc: Exception) -> str:
    """Why an input is rejected for killing its actor: the deadline named where it was passed."""
    if late == deaths:
        return (f"the model ran past its deadline of {limit_s:g} s (deadline_s + deadline_per_row_s per row) "
                f"on this input alone {deaths} times; its actor was ended each time")
    if late:
        return (f"the model's actor died {deaths} times on this input alone, {late} of them past its "
                f"{limit_s:g} s deadline")
    return f"the model's actor died {deaths} times on this input alone: {_cause_text(exc)}"


def _cause_text(exc: Exception) -> str:
    """The model's own error (``ValueError: ...``), not Ray's traceback wrapper; for an actor whose
    start failed, the last line of the traceback Ray kept (the error its constructor raised); the
    first line of anything else."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "creation task" in lines[0] and len(lines) > 1:
        return lines[-1].strip()
    return lines[0]


def _ready_actor(handles: list[Any], timeout_s: float | None = None) -> Any:
    """The first actor of the pool to answer ``ready`` (it has loaded its model), waiting
    through restarts. Raises ``PoolUnavailable`` when every actor is dead for good (killed
    with ``ray.kill``) or none answers within ``timeout_s``."""
    timeout_s = RESTART_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    live = list(handles)
    while live and time.monotonic() < deadline:
        pending = {h.ready.remote(): h for h in live}
        while pending and time.monotonic() < deadline:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, max(0.0, deadline - time.monotonic())))
            for ref in done:
                handle = pending.pop(ref)
                try:
                    ray.get(ref)
                    return handle
                except ray.exceptions.RayError:
                    if _dead_for_good(handle):
                        live.remove(handle)
        time.sleep(0.2)
    raise PoolUnavailable("a model actor died and did not come back" if not live else
                          f"no model actor answered within {timeout_s:.0f} s")


def _dead_for_good(handle: Any) -> bool:
    """DEAD (not RESTARTING) in the cluster's actor table: killed with ``ray.kill``, or out of restarts."""
    try:
        from ray._private.state import state

        return state.actor_table(handle._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # an API that moved: keep waiting until the deadline instead
        return False

