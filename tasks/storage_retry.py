"""Riding out object-store outages: which storage errors are worth another try, and the tries.

Object stores answer ``503 SlowDown``, reset connections and, for a minute now and then, refuse
them altogether (a restarted server, a failing-over load balancer). pyarrow's own S3 client
retries a request a few times within seconds, which a one-minute outage outlasts. So every call
of a ``tasks.storage.Store`` on an object store goes through ``retrying``: a transient error
(connection refused or reset, a timeout, HTTP 5xx, throttling) is tried again after an
exponential backoff with jitter, until ``storage.retry_s`` has passed since the first try; then
``StoreUnavailable`` is raised, which tells the dispatcher (tasks/dispatch.py) that the store is
down rather than this unit broken. An error retrying cannot help (access denied, no such bucket,
a wrong key, no such object) is raised at once.

What cannot be retried call by call, a multipart upload part-way through, fails its unit, and
the unit's retry (``run.task_retries``) starts it again, its first calls waiting out the outage.

Retries are counted in the innermost ``retry_tally`` block of the calling thread: a unit counts its
own (returned in its result), a driver its own, and a unit run in the driver's process
(``--no-ray``) is not counted twice.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.5  # the first wait; each next one doubles, up to MAX_DELAY_S
MAX_DELAY_S = 10.0

# What an object store answers when no retry can help: the keys, the bucket, the policy (pyarrow's
# AWS error names, and S3's own codes as botocore reports them).
REFUSALS = ("ACCESS_DENIED", "NO_SUCH_BUCKET", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
            "AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch")

# What a store, or the way to it, answers when it may answer otherwise a little later. pyarrow:
# "AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to
# server", "AWS Error SLOW_DOWN ...", "AWS Error UNKNOWN (HTTP status 503) ..."; botocore: "Could not
# connect to the endpoint URL", "An error occurred (SlowDown) ...", "An error occurred (503) ...";
# GCS (google-cloud-cpp): "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED".
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|SLOW_DOWN|SlowDown|THROTTL|Throttl|TooManyRequests|Too Many Requests|SERVICE_UNAVAILABLE"
    r"|ServiceUnavailable|INTERNAL_FAILURE|InternalError|REQUEST_TIMEOUT|RequestTimeout|HTTP status 5\d\d"
    r"|\((?:5\d\d|429)\)|connection (?:refused|reset|was closed|aborted)|could(?: not|n't) connect|timed out"
    r"|timeout|broken pipe|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED",
    re.IGNORECASE)


class StoreUnavailable(OSError):
    """A storage call still failed with a transient error when ``storage.retry_s`` had passed:
    the store is down (or cut off), not this unit broken."""


def transient(exc: BaseException) -> bool:
    """Whether trying ``exc``'s call again may succeed. The causes of a re-raised error are looked
    at too (``tasks.lease`` re-raises botocore's errors as ``StorageError``)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        text = str(seen)
        if isinstance(seen, FileNotFoundError | PermissionError | StoreUnavailable) or any(
                code in text for code in REFUSALS):
            return False
        if (isinstance(seen, ConnectionError | TimeoutError) or getattr(seen, "transient", False) is True
                or _TRANSIENT.search(text)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# When a call of this process last gave up (by ``retrying``'s clock); None once a call succeeded since.
_gave_up_at: float | None = None


def retrying(op: Callable[[], T], what: str, budget_s: float, *, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep, jitter: Callable[[], float] = random.random) -> T:
    """``op()``, tried again after each transient error until ``budget_s`` has passed since the
    first try. The waits double from ``FIRST_DELAY_S`` up to ``MAX_DELAY_S``, each drawn from the
    upper half of its span (so the workers an outage hit at once do not come back in step), and
    none runs past the budget. ``what`` names the call in the error (``reading s3://b/k``).

    Once a call of this process has given up, the store is known to be down: calls waiting then
    give up at their next failure, and calls started within ``budget_s`` of it are tried once, so
    a unit's clean-up after the failure (its parts deleted, its record renewed) does not wait out
    the budget once per call. The first call that succeeds ends that."""
    global _gave_up_at
    started = clock()
    recent = _gave_up_at is not None and started - _gave_up_at < budget_s
    deadline = started if recent else started + budget_s
    delay = FIRST_DELAY_S
    while True:
        try:
            result = op()
        except Exception as exc:
            if not transient(exc):
                raise
            now, gave_up = clock(), _gave_up_at
            if now >= deadline or (gave_up is not None and gave_up >= started):
                _gave_up_at = now
                raise StoreUnavailable(f"the object store did not answer for {budget_s:g} s (storage.retry_s), "
                                       f"{what}: {brief(exc)}") from exc
            wait = min(deadline - now, delay * (0.5 + jitter() / 2))
            _count()
            log.info("%s: %s; trying again in %.1f s", what, first_line(exc), wait)
            sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)
        else:
            _gave_up_at = None
            return result


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def brief(exc: BaseException) -> str:
    """The error without what the message it ends up in says already: pyarrow's ``When reading
    key 'k' in bucket 'b': `` before and curl's ``; Details: ...`` after."""
    text = first_line(exc)
    if (at := text.find("AWS Error ")) > 0:
        text = text[at:]
    return text.split("; Details: ", 1)[0]


@dataclass
class Tally:
    retries: int = 0


_TALLY: ContextVar[Tally | None] = ContextVar("t2i_storage_retries", default=None)


@contextmanager
def retry_tally() -> Iterator[Tally]:
    """Count the retries made in the block (in this thread), but not those of a tally nested in it."""
    tally = Tally()
    token = _TALLY.set(tally)
    try:
        yield tally
    finally:
        _TALLY.reset(token)


def retries_counted() -> int:
    """The retries the innermost tally counted so far (0 outside one)."""
    tally = _TALLY.get()
    return tally.retries if tally is not None else 0


def _count() -> None:
    tally = _TALLY.get()
    if tally is not None:
        tally.retries += 1


class RetryingReads:
    """A file object over a pyarrow S3 input file (or stream) whose reads are retried. Each read is
    one ranged GET, and one that fails leaves the position where it was (checked against SeaweedFS
    killed mid-stream), so the same read again returns the same bytes. Wrapped in ``pa.PythonFile``
    it is what Parquet readers, ``tarfile`` and ``pa.BufferedInputStream`` take."""

    def __init__(self, raw: Any, retry: Callable[[Callable[[], Any]], Any]):
        self.raw, self._retry = raw, retry

    def read(self, nbytes: int | None = None) -> bytes:
        return self._retry(lambda: self.raw.read(nbytes))

    def read_buffer(self, nbytes: int | None = None) -> Any:
        """What ``pa.PythonFile`` calls when it can: no copy of the bytes."""
        return self._retry(lambda: self.raw.read_buffer(nbytes))

    def seek(self, position: int, whence: int = 0) -> int:
        return self.raw.seek(position, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self.raw.size()

    def seekable(self) -> bool:
        return self.raw.seekable()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.raw.close()

    @property
    def closed(self) -> bool:
        return self.raw.closed
