"""The output's lock on an object store: a lease, the object ``OUT/_lock``.

An object store has no flock, and nothing there notices that a process died. So a run holds a
lease: it creates ``OUT/_lock`` with a conditional write (of runs racing to create it, exactly one
succeeds) and renews it every ttl/3 from a daemon thread with another write conditional on the
version it wrote last, so a renewal fails, and the holder learns it lost the lease, as soon as
anyone else has written or deleted the object. The body says who holds it (host, pid, start,
command, last renewal, ttl) and a random token of the holder's.

The version is the ETag on S3 (PutObject with ``If-None-Match: *`` to create, ``If-Match: <ETag>``
to replace or delete) and the generation on GCS (its JSON API with ``ifGenerationMatch=0`` to
create, ``ifGenerationMatch=<generation>`` to replace or delete). The semantics are the same.

A lease whose last write is older than its ttl belongs to a dead (or cut off) run and is taken over
with a write conditional on the stale version, so of takers racing, one wins. A run killed with
SIGKILL thus blocks its output for up to ttl (120 s by default) plus one second, not zero as a flock
does; the refusal says how long is left. The age is the object's modification time (S3's
``Last-Modified``, GCS's ``updated``) against the ``Date`` of the same response, both the server's
clock: no host's clock (the holder's or the taker's) is trusted. HTTP dates are whole seconds, hence
the extra second.

Release deletes the object conditional on its own version: a run never deletes a lease another run
took. A holder that cannot renew for a whole ttl (the store unreachable) counts its lease as lost
too: by then another run may have taken it.

The S3 client is built from the same settings as ``tasks.storage`` (``storage:`` first, then the
standard AWS variables and ``~/.aws``); GCS is reached at ``storage.endpoint_url`` or
``STORAGE_EMULATOR_HOST`` (an emulator: anonymous, as ``tasks.storage`` reads it) or else at
storage.googleapis.com with google-auth's default credentials. Both with short timeouts and few
retries so that a renewal cannot hang past its ttl. Keys and tokens never reach the body, a message
or a log line.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from schemas.config import StorageConfig
from tasks.lock import LOCK_NAME, OutputLocked, describe, holder_info, in_use, now_text
from tasks.storage import StorageError, s3_settings

log = logging.getLogger(__name__)

LEASE_TTL_S = 120.0  # above storage.retry_s (90 s): an outage the retries ride out keeps the lease
DATE_STEP_S = 1.0  # Date and Last-Modified are whole seconds
TAKE_ATTEMPTS = 3  # a lease that changes hands this often while we look is busy

_HINTS = {
    "NoSuchBucket": "the bucket does not exist (create it first)",
    "SignatureDoesNotMatch": "wrong secret key",
    "InvalidAccessKeyId": "unknown access key",
    "AccessDenied": "access denied (wrong or missing credentials)",
}


def client(storage: StorageConfig | None = None) -> Any:
    """A boto3 S3 client with ``tasks.storage``'s settings: what ``storage`` leaves out comes from
    AWS_ENDPOINT_URL(_S3), AWS_REGION/AWS_DEFAULT_REGION, the key variables, AWS_PROFILE and ~/.aws.
    Path-style addressing on a custom endpoint (MinIO, SeaweedFS have no virtual hosts)."""
    settings = s3_settings(storage)
    endpoint, region = settings.endpoint, settings.region
    keys: dict[str, str] = {}
    if settings.key and settings.secret:
        keys = {"aws_access_key_id": settings.key, "aws_secret_access_key": settings.secret}
    config = Config(connect_timeout=5, read_timeout=10, retries={"mode": "standard", "total_max_attempts": 3},
                    # S3-compatible stores reject or ignore the newer default checksums
                    request_checksum_calculation="when_required", response_checksum_validation="when_required",
                    s3={"addressing_style": "path"} if endpoint else None,
                    signature_version=UNSIGNED if settings.anonymous else None)
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    core = botocore.session.get_session()  # a session of its own: credentials resolved now, not cached from before
    core.register_component("data_loader", _models())
    return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=endpoint, region_name=region,
                                                               config=config, **keys)


@functools.cache
def _models() -> botocore.loaders.Loader:
    """botocore's service descriptions, read once per process (a fresh session reads them again: 0.2 s)."""
    return botocore.loaders.create_loader()


def why(exc: BaseException) -> str:
    """What went wrong, for a person; botocore's texts name the endpoint and operation, never a key."""
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code") or str(_status(exc))
        return f"{_HINTS.get(code, code)} ({code} during {exc.operation_name})"
    if isinstance(exc, NoCredentialsError):
        return ("no credentials (give storage.access_key_id/secret_access_key, AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws)")
    if isinstance(exc, GcsError):
        return exc.text()
    return f"{type(exc).__name__}: {exc}"


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _conflict(exc: ClientError) -> bool:
    """A precondition failed: someone else wrote or deleted the object since we looked."""
    return _status(exc) in (409, 412) or exc.response.get("Error", {}).get("Code") == "NoSuchKey"


@dataclass(frozen=True)
class Got:
    """The lease object as a store returned it: body, version (ETag or generation), when it was
    last written and the response's Date (None: the server sent none)."""

    body: bytes
    version: str
    modified: datetime
    date: datetime | None


class S3Object:
    """The lease object on S3: PutObject/DeleteObject conditional on the ETag."""

    errors: tuple[type[BaseException], ...] = (ClientError, BotoCoreError)

    def __init__(self, bucket: str, key: str, storage: StorageConfig | None):
        self.bucket, self.key = bucket, key
        self._client = client(storage)

    @staticmethod
    def conflict(exc: BaseException) -> bool:
        return isinstance(exc, ClientError) and _conflict(exc)

    def get(self) -> Got | None:
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                return None
            raise
        date = got["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        return Got(got["Body"].read(), got["ETag"], got["LastModified"], parsedate_to_datetime(date) if date else None)

    def put(self, body: bytes, version: str | None) -> str:
        """Write ``body`` if the object is still at ``version`` (None: only if there is none)."""
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        return self._client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                       ContentType="application/json", **condition)["ETag"]

    def delete(self, version: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)


# -- GCS --------------------------------------------------------------------------------------

GCS_API = "https://storage.googleapis.com"
GCS_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
GCS_TIMEOUT_S = 10.0
GCS_ATTEMPTS = 3  # as the S3 client's total_max_attempts
_GCS_HINTS = {401: "no or expired credentials", 403: "access denied (wrong or missing credentials)",
              429: "too many requests"}


class GcsError(Exception):
    """A JSON API request that failed: status 0 when no answer came, -1 when no credentials let it
    be sent."""

    def __init__(self, operation: str, status: int, reason: str, message: str = ""):
        super().__init__(operation, status, reason, message)
        self.operation, self.status, self.reason, self.message = operation, status, reason, message

    def text(self) -> str:
        if self.status == 404 and (self.operation == "insert" or "bucket" in self.message.lower()):
            hint = "the bucket does not exist (create it first)"
        else:  # GCS's own messages name the principal and the permission, never a token
            hint = self.message or _GCS_HINTS.get(self.status, self.reason)
        answer = f"HTTP {self.status} {self.reason}" if self.status > 0 else self.reason
        return f"{hint} ({answer} during {self.operation})"

    @property
    def transient(self) -> bool:
        return self.status in (0, 408, 429) or self.status >= 500


class _Token:
    """A bearer token from google-auth's default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    application-default login, a metadata server), refreshed when it expires."""

    def __init__(self) -> None:
        try:
            import google.auth
            import google.auth.exceptions
            import google.auth.transport.requests
        except ImportError:
            raise StorageError("an output's lease on gs:// needs google-auth for credentials: pip install "
                               "google-auth (an emulator, storage.endpoint_url or STORAGE_EMULATOR_HOST, "
                               "needs none)") from None
        self._auth, self._credentials = google.auth, None
        self._mutex = threading.Lock()

    def header(self) -> str:
        with self._mutex:
            try:
                if self._credentials is None:
                    self._credentials, _ = self._auth.default(scopes=[GCS_SCOPE])
                if not self._credentials.valid:
                    self._credentials.refresh(self._auth.transport.requests.Request())
            except self._auth.exceptions.DefaultCredentialsError:
                raise GcsError("authentication", -1, "DefaultCredentialsError",
                               "no credentials (set GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth "
                               "application-default login)") from None
            except self._auth.exceptions.GoogleAuthError as exc:  # its texts name the token URL, not a key
                message = (str(exc).splitlines() or [""])[0][:300]
                raise GcsError("authentication", -1, type(exc).__name__, f"no token: {message}") from None
            return f"Bearer {self._credentials.token}"


class GcsObject:
    """The lease object on GCS, through the JSON API: writes conditional on the generation."""

    errors: tuple[type[BaseException], ...] = (GcsError,)

    def __init__(self, bucket: str, key: str, storage: StorageConfig | None):
        storage = storage or StorageConfig()
        self.bucket, self.key = bucket, key
        endpoint = storage.endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint:  # an emulator: anonymous, as tasks.storage's GcsFileSystem is
            self.api, anonymous = (endpoint if "://" in endpoint else f"http://{endpoint}").rstrip("/"), True
        else:
            self.api, anonymous = GCS_API, storage.anonymous
        self._token = None if anonymous else _Token()
        self._path = f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o/{urllib.parse.quote(key, safe='')}"

    @staticmethod
    def conflict(exc: BaseException) -> bool:
        """A generation precondition failed (412), or what was to be deleted is gone already."""
        return isinstance(exc, GcsError) and (exc.status in (409, 412) or
                                              (exc.status == 404 and exc.operation == "delete"))

    def get(self) -> Got | None:
        """The current generation's metadata (its ``updated`` and the response's Date), then that
        generation's body; a generation replaced in between is looked up again."""
        for _ in range(TAKE_ATTEMPTS):
            try:
                meta, headers = self._call("get", "GET", self._path)
            except GcsError as exc:
                if exc.status == 404 and "bucket" not in exc.message.lower():
                    return None
                raise
            info = json.loads(meta)
            try:
                body, _ = self._call("download", "GET", self._path, {"alt": "media", "generation": info["generation"]})
            except GcsError as exc:
                if exc.status == 404:
                    continue  # replaced or deleted since the metadata was read
                raise
            date = headers.get("date")
            return Got(body, str(info["generation"]), datetime.fromisoformat(info["updated"]),
                       parsedate_to_datetime(date) if date else None)
        raise GcsError("get", 409, "conflict", "the lease object kept changing while it was read")

    def put(self, body: bytes, version: str | None) -> str:
        """Write ``body`` if the object is still at generation ``version`` (None: only if there is none)."""
        boundary = secrets.token_hex(16)
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        payload = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{meta}\r\n"
                   f"--{boundary}\r\nContent-Type: application/json\r\n\r\n").encode() + body + \
            f"\r\n--{boundary}--\r\n".encode()
        path = f"/upload/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}/o"
        query = {"uploadType": "multipart", "ifGenerationMatch": version or "0"}
        reply, _ = self._call("insert", "POST", path, query, payload,
                              {"Content-Type": f"multipart/related; boundary={boundary}"})
        return str(json.loads(reply)["generation"])

    def delete(self, version: str) -> None:
        self._call("delete", "DELETE", self._path, {"ifGenerationMatch": version})

    def _call(self, operation: str, method: str, path: str, query: dict[str, str] | None = None,
              body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        """One request, retried on no answer, 408, 429 and 5xx (a write repeated after a lost reply
        fails its precondition, and the caller finds its own token there)."""
        url = self.api + path + ("?" + urllib.parse.urlencode(query) if query else "")
        for attempt in range(GCS_ATTEMPTS):
            try:
                return self._send(operation, method, url, body, dict(headers or {}))
            except GcsError as exc:
                if not exc.transient or attempt == GCS_ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _send(self, operation: str, method: str, url: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        if self._token is not None:
            headers["Authorization"] = self._token.header()
        request = urllib.request.Request(url, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=GCS_TIMEOUT_S) as reply:
                return reply.read(), {k.lower(): v for k, v in reply.getheaders()}
        except urllib.error.HTTPError as exc:
            raise _http_error(operation, exc) from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, refused, timed out, cut off
            raise GcsError(operation, 0, type(exc).__name__, str(getattr(exc, "reason", exc))) from None


def _http_error(operation: str, exc: urllib.error.HTTPError) -> GcsError:
    """The JSON API's error body ({"error": {"message", "errors": [{"reason"}]}}) as a GcsError."""
    try:
        error = json.loads(exc.read() or b"{}").get("error") or {}
    except (ValueError, AttributeError, OSError):
        error = {}
    if not isinstance(error, dict):
        error = {"message": str(error)}
    reasons = [e.get("reason") for e in error.get("errors") or [] if isinstance(e, dict)]
    return GcsError(operation, exc.code, reasons[0] if reasons and reasons[0] else exc.reason or "",
                    str(error.get("message") or ""))


_OBJECTS = {"s3": S3Object, "gs": GcsObject}


def create_once(url: str, body: bytes, storage: StorageConfig | None = None) -> bool:
    """Write the object at ``url`` only if there is none (If-None-Match: * on S3, generation 0 on
    GCS); False if one exists. A reply lost and the write retried also reads False: callers
    compare what stands with what they wrote."""
    parts = urllib.parse.urlsplit(url)
    target = _OBJECTS[parts.scheme](parts.netloc, parts.path.lstrip("/"), storage)
    try:
        target.put(body, None)
    except target.errors as exc:
        if target.conflict(exc):
            return False
        raise StorageError(f"cannot write {url}: {why(exc) if isinstance(exc, ClientError) else exc}") from None
    return True


def object_age_s(url: str, storage: StorageConfig | None = None) -> float | None:
    """Seconds since the object at ``url`` was last written, by the server's clock (its
    Last-Modified or ``updated`` against the same response's Date; no host's clock), plus the
    Date's one-second step; None if there is no object."""
    parts = urllib.parse.urlsplit(url)
    target = _OBJECTS[parts.scheme](parts.netloc, parts.path.lstrip("/"), storage)
    try:
        got = target.get()
    except target.errors as exc:
        raise StorageError(f"cannot read {url}: {why(exc)}") from None
    if got is None:
        return None
    return ((got.date or datetime.now(UTC)) - got.modified).total_seconds() + DATE_STEP_S


@dataclass(frozen=True)
class Seen:
    """The lease object as read: its body, version (ETag, generation) and age by the server's clock."""

    holder: dict[str, Any]
    etag: str
    age_s: float

    def expires_in(self, default_ttl_s: float) -> float:
        """Seconds until it may be taken over (<= 0: now), by the holder's own ttl."""
        try:
            ttl = float(self.holder["ttl_s"])
        except (KeyError, TypeError, ValueError):
            ttl = default_ttl_s
        return ttl + DATE_STEP_S - self.age_s


class Lease:
    """One run's hold on an output on S3 or GCS (see the module docstring). ``acquire`` takes it or raises
    ``OutputLocked``; ``release`` gives it back; ``lost`` turns true (and ``on_lost(reason)`` is
    called from the renewal thread) once another run wrote or deleted it, or it went unrenewed for
    a ttl."""

    def __init__(self, location: str, command: str, storage: StorageConfig | None = None, *,
                 ttl_s: float = LEASE_TTL_S, on_lost: Callable[[str], None] | None = None):
        parts = urllib.parse.urlsplit(str(location))
        if parts.scheme not in _OBJECTS:
            raise StorageError(f"{location}: an output's lease needs s3:// or gs://")
        if not parts.netloc:
            raise StorageError(f"{location}: no bucket named")
        prefix = parts.path.strip("/")
        self.url = f"{parts.scheme}://{parts.netloc}/{prefix}".rstrip("/")
        self.bucket, self.key = parts.netloc, f"{prefix}/{LOCK_NAME}" if prefix else LOCK_NAME
        self.lock_url = f"{parts.scheme}://{self.bucket}/{self.key}"
        self.ttl_s, self.on_lost = float(ttl_s), on_lost
        self.info = holder_info(command) | {"token": secrets.token_hex(16)}  # the token tells our writes apart
        self.previous: dict[str, Any] | None = None  # the dead holder's body, when acquire took a stale lease
        self.lost_reason: str | None = None
        self._object = _OBJECTS[parts.scheme](self.bucket, self.key, storage)
        self._etag: str | None = None  # of our last write; None when not held
        self._renewed = 0.0  # monotonic time our last successful write was sent
        self._mutex = threading.Lock()  # one write at a time: renewal thread, note, release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Lease({self.lock_url!r}, held={self._etag is not None}, lost={self.lost})"

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- taking --------------------------------------------------------------------------------

    def acquire(self) -> Lease:
        """Take the lease (create it, or take over a stale one) and start renewing it. Raises
        ``OutputLocked`` naming a live holder, ``StorageError`` if the store cannot be used (the
        first request is a read: nothing is written then)."""
        if self._etag is not None:
            return self  # held already: one renewal thread per lease
        try:
            self._take()
        except self._object.errors as exc:
            raise StorageError(f"cannot take the lease {self.lock_url}: {why(exc)}") from None
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep, name=f"lease {self.lock_url}", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        sent, taken = time.monotonic(), None
        seen = None
        for _ in range(TAKE_ATTEMPTS):
            seen = self.read()
            if seen is not None and seen.holder.get("token") == self.info["token"]:
                self._etag = seen.etag  # our write went through but its reply was lost (a retry then failed)
                break
            if seen is not None and seen.expires_in(self.ttl_s) > 0:
                raise OutputLocked(self._busy(seen))
            sent, taken = time.monotonic(), seen
            try:
                self._etag = self._put(seen.etag if seen else None)
                break
            except self._object.errors as exc:
                if not self._object.conflict(exc):
                    raise
                # another run created or took it first: look again
        else:
            raise OutputLocked(self._busy(seen))
        self._renewed = sent
        self.previous = taken.holder if taken else None
        if taken:
            log.warning("took over the lease %s of %s: unrenewed for %.0f s", self.lock_url,
                        describe(taken.holder), taken.age_s)

    def _busy(self, seen: Seen | None) -> str:
        if seen is None:
            return in_use(self.url, {}) + " (the lease changed hands while this run looked)"
        left = max(1, math.ceil(seen.expires_in(self.ttl_s)))
        return in_use(self.url, seen.holder) + f" (if that run is dead, its lease expires in {left} s)"

    def read(self) -> Seen | None:
        """The lease object now, or None if there is none."""
        got = self._object.get()
        if got is None:
            return None
        raw = got.body
        try:
            holder = json.loads(raw) if raw.strip() else {}
        except ValueError:
            holder = {}
        now = got.date or datetime.now(UTC)  # a server without Date: our clock
        age_s = (now - got.modified).total_seconds()
        return Seen(holder if isinstance(holder, dict) else {}, got.version, age_s)

    def _put(self, version: str | None) -> str:
        """Write our body if the object is still at ``version`` (None: only if there is none)."""
        body = json.dumps(self.info | {"renewed": now_text(), "ttl_s": self.ttl_s}, indent=1).encode()
        return self._object.put(body, version)

    # -- holding -------------------------------------------------------------------------------

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3) and not self.lost:
            self.renew()

    def renew(self) -> None:
        """Write the lease again, if it is still ours (the renewal thread calls this every ttl/3)."""
        with self._mutex:
            if self._etag is None or self.lost:
                return
            sent = time.monotonic()
            try:
                self._etag = self._put(self._etag)
                self._renewed = sent
                return
            except self._object.errors as exc:
                failure: BaseException | None = None if self._object.conflict(exc) else exc
            if failure is None:
                self._changed()
            elif time.monotonic() - self._renewed > self.ttl_s:
                self._lose(f"not renewed for {self.ttl_s:g} s ({why(failure)}); another run may hold it now")
            else:
                log.warning("could not renew the lease %s, will retry: %s", self.lock_url, why(failure))

    def _changed(self) -> None:
        """A conditional write failed: lost, unless the object is still ours (a write whose reply
        was lost, then retried)."""
        try:
            seen = self.read()
        except self._object.errors as exc:
            log.warning("could not read the lease %s, will retry: %s", self.lock_url, why(exc))
            return
        if seen is not None and seen.holder.get("token") == self.info["token"]:
            self._etag = seen.etag
        else:
            self._lose("deleted by someone else" if seen is None else f"taken by {describe(seen.holder)}")

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        log.error("lost the lease %s: %s; this run must stop (another may be writing the output)",
                  self.lock_url, reason)
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception:
                log.exception("the lease's on_lost callback failed")

    def note(self, **fields: Any) -> None:
        """Add ``fields`` to the lease's body (the local Ray runtime's tag, for the next run) and
        write it now."""
        self.info |= fields
        self.renew()

    # -- giving back ---------------------------------------------------------------------------

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; never raises (a lease left
        behind expires after its ttl)."""
        self._stop.set()
        with self._mutex:
            etag, self._etag = self._etag, None
            if etag is None or self.lost:
                return  # not held, or someone else's now: never delete it
            try:
                self._delete(etag)
            except self._object.errors as exc:
                log.warning("could not delete the lease %s (%s); it expires %g s after its last renewal",
                            self.lock_url, why(exc), self.ttl_s)

    def _delete(self, etag: str) -> None:
        for _ in range(2):
            try:
                self._object.delete(etag)
                return
            except self._object.errors as exc:
                if not self._object.conflict(exc):
                    raise
            seen = self.read()
            if seen is None:
                return
            if seen.holder.get("token") != self.info["token"]:
                self._lose(f"taken by {describe(seen.holder)} before this run released it (left in place)")
                return
            etag = seen.etag  # our renewal went through but its reply was lost
