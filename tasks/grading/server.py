"""The built-in grading page: a small HTTP server over one grading workspace (tasks/grading/__init__.py).

Routes::

    GET  /                          the page (tasks/grading/page.html: no external script, style or font)
    GET  /api/state?grader=NAME[&key=KEY]
                                    the item to show (KEY, else the next one this grader should grade), with
                                    this grader's grade of it, their progress, history and the five levels
    GET  /api/image/KEY             the image's JPEG bytes from batch.parquet
    POST /api/grade  {key, grader, grade}   stored before the answer; 400 with {"error": ...} when the grade
                                    is not an integer 1-5, the key is not in the batch or the grader is empty
    POST /api/skip   {key, grader}  this grader passes over the image
    GET  /api/agreement             agreement between graders (tasks/grading/votes.py)

It binds 127.0.0.1 unless another address is passed together with ``allow_remote=True`` (the page has no
login: anyone who can reach it can vote under any name).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.grading import BATCH, LEVELS
from tasks.grading.votes import VoteError, VoteStore

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 64 * 1024


class GradingApp:
    """What the routes answer, apart from HTTP: the workspace's batch and votes."""

    def __init__(self, gdir: str | Path, votes_per_image: int = 3):
        self.gdir = Path(gdir)
        if not (self.gdir / BATCH).exists():
            raise FileNotFoundError(f"{self.gdir / BATCH} does not exist: export a sample first (t2i grade export)")
        self.votes_per_image = votes_per_image
        self.store = VoteStore(self.gdir)
        self._captions: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def captions(self) -> dict[str, str]:
        st = (self.gdir / BATCH).stat()
        with self._lock:
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                t = pq.read_table(self.gdir / BATCH, columns=["key", "caption"])
                self._captions = {k: c or "" for k, c in zip(t.column("key").to_pylist(),
                                                             t.column("caption").to_pylist(), strict=True)}
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._captions

    def image(self, key: str) -> bytes | None:
        if not self.store.has(key):
            return None
        t = pq.read_table(self.gdir / BATCH, columns=["key", "image"], filters=pc.field("key") == key)
        return t.column("image")[0].as_py() if t.num_rows else None

    def item(self, key: str, grader: str) -> dict[str, Any]:
        keys = self.store.keys()
        return {"key": key, "caption": self.captions().get(key, ""), "position": keys.index(key) + 1,
                "image": "/api/image/" + urllib.parse.quote(key, safe=""),
                "grade": self.store.grade_of(key, grader) if grader else None,
                "skipped": self.store.skipped(key, grader) if grader else False}

    def state(self, grader: str, key: str | None = None) -> dict[str, Any]:
        grader = grader.strip()
        levels = [{"grade": g, "name": name, "description": text} for g, (name, text) in LEVELS.items()]
        out: dict[str, Any] = {"grader": grader, "levels": levels, "votes_per_image": self.votes_per_image,
                               "total": len(self.store.keys())}
        if not grader:
            return {**out, "item": None, "next": None, "history": [], "progress": None}
        if key is not None and not self.store.has(key):
            raise VoteError(f"unknown key {key!r}: not in this workspace's batch")
        nxt = self.store.next_for(grader, self.votes_per_image)
        shown = key if key is not None else nxt
        return {**out, "item": self.item(shown, grader) if shown else None, "next": nxt,
                "history": self.store.history(grader), "progress": self.store.progress(grader)}


def _handler(app: GradingApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "t2i-grade/1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "private, max-age=3600" if cache else "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

        def _error(self, status: int, message: str) -> None:
            self._json({"error": message}, status)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            try:
                if url.path in ("/", "/index.html"):
                    self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                elif url.path == "/api/state":
                    key = query.get("key", [None])[0]
                    self._json(app.state(query.get("grader", [""])[0], key or None))
                elif url.path.startswith("/api/image/"):
                    key = urllib.parse.unquote(url.path.removeprefix("/api/image/"))
                    data = app.image(key)
                    if data is None:
                        self._error(404, f"unknown key {key!r}: not in this workspace's batch")
                    else:
                        self._send(200, data, "image/jpeg", cache=True)
                elif url.path == "/api/agreement":
                    self._json(app.store.agreement())
                elif url.path == "/favicon.ico":
                    self._send(204, b"", "image/x-icon")
                else:
                    self._error(404, f"no such page: {url.path}")
            except VoteError as exc:
                self._error(400, str(exc))
            except Exception as exc:  # the page shows it; the server goes on
                log.exception("GET %s failed", self.path)
                self._error(500, f"{type(exc).__name__}: {exc}")

        do_HEAD = do_GET

        def _body(self) -> dict[str, Any]:
            # Only JSON, and only for this server's own name: a web page elsewhere in the grader's
            # browser can post text/plain without a preflight, and a rebound DNS name can reach 127.0.0.1.
            if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
                raise VoteError("a vote is posted as application/json")
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            if host not in ("127.0.0.1", "localhost", "[::1]", self.server.server_address[0]):
                raise VoteError(f"this server answers to 127.0.0.1 or localhost, not {host!r}")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise VoteError(f"request body over {MAX_BODY} bytes")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError as exc:
                raise VoteError(f"the body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise VoteError('the body must be a JSON object like {"key": ..., "grader": ..., "grade": 1-5}')
            return body

        def do_POST(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            try:
                if url.path == "/api/grade":
                    body = self._body()
                    vote = app.store.record(body.get("key"), body.get("grader"), body.get("grade"))
                    self._json({"ok": True, "vote": vote, **app.state(vote["grader"])})
                elif url.path == "/api/skip":
                    body = self._body()
                    skip = app.store.skip(body.get("key"), body.get("grader"))
                    self._json({"ok": True, "skip": skip, **app.state(skip["grader"])})
                else:
                    self._error(404, f"no such route: POST {url.path}")
            except VoteError as exc:
                self._error(400, str(exc))
            except Exception as exc:
                log.exception("POST %s failed", self.path)
                self._error(500, f"{type(exc).__name__}: {exc}")

    return Handler


class GradingServer:
    """A running page: ``url``, and ``stop()``."""

    def __init__(self, httpd: ThreadingHTTPServer, app: GradingApp):
        self.httpd, self.app = httpd, app
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
        self._thread: threading.Thread | None = None

    def start(self) -> GradingServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="t2i-grade-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> GradingServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _check_host(host: str, allow_remote: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise ValueError(f"refusing to bind {host}: the grading page has no login; it binds 127.0.0.1 unless "
                         "another address is passed with allow_remote=True")


def make_server(gdir: str | Path, *, host: str = "127.0.0.1", port: int = 0, votes_per_image: int = 3,
                allow_remote: bool = False) -> GradingServer:
    """The server, bound but not yet serving."""
    _check_host(host, allow_remote)
    if votes_per_image < 1:
        raise ValueError(f"votes_per_image must be at least 1, not {votes_per_image}")
    app = GradingApp(gdir, votes_per_image)
    httpd = ThreadingHTTPServer((host, port), _handler(app))
    httpd.daemon_threads = True
    return GradingServer(httpd, app)


def serve(gdir: str | Path, *, host: str = "127.0.0.1", port: int = 0, votes_per_image: int = 3,
          allow_remote: bool = False) -> GradingServer:
    """Serve the page for ``gdir`` in a background thread; port 0 picks a free port (see ``.url``)."""
    return make_server(gdir, host=host, port=port, votes_per_image=votes_per_image,
                       allow_remote=allow_remote).start()


def run_server(gdir: str | Path, *, host: str = "127.0.0.1", port: int = 8765, votes_per_image: int = 3,
               allow_remote: bool = False) -> None:
    """Serve the page until interrupted (Ctrl-C); prints the address to open."""
    server = make_server(gdir, host=host, port=port, votes_per_image=votes_per_image, allow_remote=allow_remote)
    print(f"grading page for {gdir}: {server.url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
