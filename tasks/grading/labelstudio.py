"""A small client for Label Studio's REST API (checked against label-studio 1.23): enough to grade a
workspace there and bring the grades back.

    ls = LabelStudio("http://127.0.0.1:8080", token)
    project = ls.create_grading_project(GDIR, "Kolors grades, round 1")   # config.xml + tasks.json
    ...  graders rate the images in Label Studio  ...
    ls.export(project, "export.json")                                    # then: t2i grade import GDIR export.json

Authentication is a legacy API token (``Authorization: Token <token>``, Account & Settings in the UI); a new
organization has them off in 1.23 unless the server starts with ``--enable-legacy-api-token`` (or
``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``), or an admin turns them on in the organization's settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from tasks.grading import LABEL_STUDIO


class LabelStudioError(RuntimeError):
    """Label Studio answered with an error (status, method, path and what it said are in the message)."""

    def __init__(self, status: int, method: str, path: str, text: str):
        super().__init__(f"Label Studio: {method} {path} -> HTTP {status}: {text[:500]}")
        self.status = status


def server_name(url: str) -> str:
    """The server as graders' names carry it: host[:port][/path] of its URL, lower-case host, without the
    scheme, credentials, query or a trailing slash ("http://LS.example.com:8080/" -> "ls.example.com:8080")."""
    parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
    if not parts.hostname:
        raise ValueError(f"{url!r} is not a Label Studio URL (http://host:port)")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname.lower()}{port}{parts.path.rstrip('/')}"


class LabelStudio:
    def __init__(self, url: str, token: str, *, timeout: float = 120.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        r = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        if r.status_code >= 400:
            raise LabelStudioError(r.status_code, method, path, r.text)
        return r

    def whoami(self) -> dict:
        return self.request("GET", "/api/current-user/whoami").json()

    def create_project(self, title: str, label_config: str, **fields: Any) -> int:
        """A new project (title: 3 to 50 characters); its id."""
        return self.request("POST", "/api/projects/", json={"title": title, "label_config": label_config,
                                                            **fields}).json()["id"]

    def import_tasks(self, project: int, tasks: Sequence[dict]) -> int:
        """Tasks (``{"data": {...}}``) added to the project at once; how many it took."""
        return self.request("POST", f"/api/projects/{project}/import", json=list(tasks)).json()["task_count"]

    def create_grading_project(self, gdir: str | Path, title: str, votes: int = 3) -> int:
        """A project with the workspace's GDIR/labelstudio/config.xml and its tasks.json imported, each task
        open to ``votes`` annotators (Label Studio's default, 1, would take an image out of everyone's
        queue once a single grader has rated it)."""
        folder = Path(gdir) / LABEL_STUDIO
        project = self.create_project(title, (folder / "config.xml").read_text(), maximum_annotations=votes)
        self.import_tasks(project, json.loads((folder / "tasks.json").read_text()))
        return project

    def tasks(self, project: int, page_size: int = 100) -> list[dict]:
        """Every task of the project (its id, data, annotations...), page by page."""
        found: list[dict] = []
        for page in range(1, 1_000_000):
            r = self.request("GET", "/api/tasks", params={"project": project, "page": page, "page_size": page_size})
            body = r.json()
            found += body["tasks"]
            if not body["tasks"] or len(found) >= body["total"]:
                return found
        return found

    def task(self, task: int) -> dict:
        """One task (its project, data, annotations...)."""
        return self.request("GET", f"/api/tasks/{task}").json()

    def create_user(self, email: str, **fields: Any) -> int:
        """A user in the current user's organization (no password: can be named as an annotation's
        ``completed_by``, or set a password and log in); its id."""
        return self.request("POST", "/api/users/", json={"email": email, **fields}).json()["id"]

    def users(self) -> dict[int, str]:
        """The organization's users: id -> email (a removed member's reads "Deleted")."""
        return {u["id"]: u["email"] for u in self.request("GET", "/api/users/").json()}

    def annotate(self, task: int, rating: int, *, completed_by: int | None = None, from_name: str = "quality",
                 to_name: str = "image") -> dict:
        """Submit a 1-5 rating for a task, as the token's user or on behalf of ``completed_by`` (a user id)."""
        body: dict[str, Any] = {"result": [{"from_name": from_name, "to_name": to_name, "type": "rating",
                                            "value": {"rating": rating}}]}
        if completed_by is not None:
            body["completed_by"] = completed_by
        return self.request("POST", f"/api/tasks/{task}/annotations/", json=body).json()

    def export(self, project: int, out: str | Path | None = None, *, emails: bool = True,
               all_tasks: bool = False) -> list[dict]:
        """The project's JSON export (a list of tasks with their annotations), also written to ``out``.

        ``emails``: an export snapshot whose annotations name their annotator as ``{"id", "email", ...}``
        (``t2i grade import`` then names graders ``labelstudio:<email>`` by itself); else the plain
        ``GET /api/projects/{id}/export?exportType=JSON`` (what the UI's Export button gives), where
        ``completed_by`` is a user id (the import needs the server's users or name to name them).
        ``all_tasks``: tasks nobody annotated too (plain export only)."""
        if emails:
            options = {"annotations__completed_by": {"only_id": False}}
            snap = self.request("POST", f"/api/projects/{project}/exports/",
                                json={"title": "t2i grade export", "serialization_options": options}).json()
            deadline = time.monotonic() + self.timeout
            while snap["status"] not in ("completed", "failed") and time.monotonic() < deadline:
                time.sleep(0.5)  # a server with Redis workers builds it in the background
                snap = self.request("GET", f"/api/projects/{project}/exports/{snap['id']}").json()
            if snap["status"] != "completed":
                raise LabelStudioError(500, "GET", f"/api/projects/{project}/exports/{snap['id']}",
                                       f"export snapshot {snap['status']}")
            r = self.request("GET", f"/api/projects/{project}/exports/{snap['id']}/download",
                             params={"exportType": "JSON"})
        else:
            r = self.request("GET", f"/api/projects/{project}/export",
                             params={"exportType": "JSON", "download_all_tasks": str(all_tasks).lower()})
        if out is not None:
            Path(out).write_bytes(r.content)
        return json.loads(r.content)
