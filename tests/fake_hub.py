"""A small local stand-in for the Hugging Face Hub HTTP API, for tests.

The real ``huggingface_hub`` client (``create_repo``, ``upload_folder``, ``create_commit``,
``hf_hub_download``, ``snapshot_download``, ``model_info``, ``list_repo_tree``) and everything built on it
(``PeftModel.push_to_hub`` / ``PeftModel.from_pretrained``) talk to this server over real HTTP on
127.0.0.1. Nothing is patched out of the client: only its endpoint is pointed here.

Endpoints served (enough for huggingface_hub 2.4):

* ``POST /api/repos/create``, ``DELETE /api/repos/delete``
* ``POST /api/{type}s/{repo_id}/preupload/{rev}``: every file is answered ``"regular"`` (base64 inside the
  commit), so no LFS / Xet storage server is needed
* ``POST /api/{type}s/{repo_id}/commit/{rev}``: NDJSON ``header`` / ``file`` / ``deletedFile`` /
  ``deletedFolder`` lines; ``lfsFile`` and ``create_pr`` are refused with a clear 400
* ``POST /api/{type}s/{repo_id}/branch/{branch}``
* ``GET /api/{type}s/{repo_id}[/revision/{rev}]`` (model_info / repo_info), ``GET .../tree/{rev}[/{path}]``
* ``GET``/``HEAD /[{type}s/]{repo_id}/resolve/{rev}/{path}`` with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` (and ``Range`` for resumed downloads)
* ``POST /api/validate-yaml`` (parses the README front matter), ``GET /api/whoami-v2``,
  ``GET /api/agent-harnesses``, ``/api/telemetry/*``

Errors carry the ``X-Error-Code`` header the client maps to its exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``). Writes need ``Authorization: Bearer <hub.token>``; private repos
need it for reads too. Anything else is answered 404 and recorded in ``FakeHub.unhandled``.

Use the ``fake_hub`` fixture (``from fake_hub import fake_hub`` in a test module or in ``conftest.py``): it
starts a server, points ``huggingface_hub`` (module constants included, they are read at import time) at it
with ``HF_TOKEN=fake-token`` and a private ``HF_HOME``, and blocks name resolution of any other host for
the duration of the test, so nothing can reach the real Hub.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

logger = logging.getLogger(__name__)

FAKE_USER = "user"
FAKE_TOKEN = "fake-token"

_TYPE_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}

_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what ``git hash-object`` prints and the Hub uses as ETag of small files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeCommit:
    oid: str
    parent: str | None
    summary: str
    description: str
    files: dict[str, bytes]
    created_at: float = field(default_factory=time.time)


@dataclass
class FakeRepo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, FakeCommit] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Branch name or full commit oid -> commit oid (``None`` if unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """In-memory repositories behind a ``ThreadingHTTPServer`` on 127.0.0.1 (ephemeral port).

    Inspect what the client did with :meth:`files`, :meth:`commits`, :attr:`requests` and :attr:`unhandled`.
    """

    def __init__(self, token: str = FAKE_TOKEN, user: str = FAKE_USER) -> None:
        self.token = token
        self.user = user
        self.requests: list[tuple[str, str]] = []  # (method, path without query), in arrival order
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched
        self.blocked_hosts: list[str] = []  # non-loopback host names the `fake_hub` fixture refused to resolve
        self._repos: dict[tuple[str, str], FakeRepo] = {}
        self._lock = threading.RLock()
        self._commit_counter = 0
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection and seeding (test side) -------------------------------------------------------

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of every file at ``revision``."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(repo.commits[oid].files)

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[FakeCommit]:
        """History of ``revision``, newest first (the repository's initial commit last)."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            out, oid = [], repo.resolve(revision)
            while oid is not None:
                out.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return out

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, files: dict[str, bytes] | None = None
    ) -> FakeRepo:
        """Create a repository directly (server side), optionally with a second commit holding ``files``."""
        with self._lock:
            repo = self._new_repo(repo_type, repo_id, private)
            if files:
                head = repo.commits[repo.branches["main"]]
                self._add_commit(repo, "main", head, "Seed files", "", {**head.files, **files})
            return repo

    # -- internals (server side; call with the lock held) ------------------------------------------

    def _new_repo(self, repo_type: str, repo_id: str, private: bool) -> FakeRepo:
        repo = FakeRepo(repo_type=repo_type, repo_id=repo_id, private=private)
        self._repos[(repo_type, repo_id)] = repo
        self._add_commit(repo, "main", None, "initial commit", "", {".gitattributes": _GITATTRIBUTES})
        return repo

    def _add_commit(
        self, repo: FakeRepo, branch: str, parent: FakeCommit | None, summary: str, description: str, files: dict
    ) -> FakeCommit:
        self._commit_counter += 1
        seed = json.dumps(
            [repo.repo_id, parent.oid if parent else None, summary, self._commit_counter, time.time_ns()]
        ).encode()
        for path in sorted(files):
            seed += path.encode() + git_blob_sha1(files[path]).encode()
        commit = FakeCommit(
            oid=hashlib.sha1(seed).hexdigest(),
            parent=parent.oid if parent else None,
            summary=summary,
            description=description,
            files=files,
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _repo_url(self, repo: FakeRepo) -> str:
        return f"{self.url}/{_TYPE_PREFIX[repo.repo_type]}{repo.repo_id}"


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_TYPES = r"(?P<type>models|datasets|spaces)"


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-server subclass
    server_version = "FakeHub/0.1"

    # (method, compiled path regex, handler name); the first match wins. Paths are matched still URL-quoted
    # (a revision such as refs/pr/1 arrives as refs%2Fpr%2F1), captured groups are unquoted.
    ROUTES = [
        ("POST", r"/api/repos/create", "_create_repo"),
        ("DELETE", r"/api/repos/delete", "_delete_repo"),
        ("POST", r"/api/validate-yaml", "_validate_yaml"),
        ("GET", r"/api/whoami-v2", "_whoami"),
        ("GET", r"/api/agent-harnesses", "_agent_harnesses"),
        ("GET HEAD POST", r"/api/telemetry/.*", "_ok"),
        ("POST", rf"/api/{_TYPES}/{_REPO}/preupload/(?P<rev>[^/]+)", "_preupload"),
        ("POST", rf"/api/{_TYPES}/{_REPO}/commit/(?P<rev>[^/]+)", "_commit"),
        ("POST", rf"/api/{_TYPES}/{_REPO}/branch/(?P<branch>.+)", "_create_branch"),
        ("GET", rf"/api/{_TYPES}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_tree"),
        ("GET", rf"/api/{_TYPES}/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "_info"),
        ("GET HEAD", rf"/(?:(?P<type>datasets|spaces)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    ]
    _COMPILED = [(set(m.split()), re.compile(p + r"/?"), name) for m, p, name in ROUTES]

    # -- plumbing ----------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        logger.debug("fake hub: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        body = self._read_body()
        with self.hub._lock:
            self.hub.requests.append((method, split.path))
        try:
            for methods, regex, name in self._COMPILED:
                match = regex.fullmatch(split.path) if method in methods else None
                if match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    with self.hub._lock:
                        getattr(self, name)(method, body, **groups)
                    return
            with self.hub._lock:
                self.hub.unhandled.append((method, split.path))
            raise _HubError(404, f"fake hub: no route for {method} {split.path}")
        except _HubError as err:
            self._send_json(
                {"error": err.message},
                status=err.status,
                headers={**({"X-Error-Code": err.code} if err.code else {}), "X-Error-Message": err.message, **err.headers},
                head_only=method == "HEAD",
            )

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, data: bytes, headers: dict | None = None, head_only: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head_only:
            self.wfile.write(data)

    def _send_json(self, obj: Any, status: int = 200, headers: dict | None = None, head_only: bool = False) -> None:
        self._send(
            status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}, head_only
        )

    def _json_body(self, body: bytes) -> dict:
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as err:
            raise _HubError(400, f"fake hub: request body is not JSON ({err})") from err

    def _authenticated(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _require_auth(self) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            raise _HubError(401, "fake hub: this endpoint needs 'Authorization: Bearer <token>'")
        if auth != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, plural_or_type: str | None, repo_id: str, *, write: bool = False) -> FakeRepo:
        repo_type = _PLURAL_TO_TYPE.get(plural_or_type or "models", plural_or_type or "model")
        if write:
            self._require_auth()
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authenticated()):
            # The real Hub answers 401 + RepoNotFound for private repos too, to not leak their existence.
            raise _HubError(401 if repo is not None else 404, f"Repository Not Found for {repo_id}.", "RepoNotFound")
        return repo

    def _commit_at(self, repo: FakeRepo, rev: str | None) -> FakeCommit:
        oid = repo.resolve(rev or "main")
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    # -- routes ------------------------------------------------------------------------------------

    def _ok(self, method: str, body: bytes) -> None:
        self._send_json({}, head_only=method == "HEAD")

    def _whoami(self, method: str, body: bytes) -> None:
        self._require_auth()
        self._send_json(
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Fake User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _agent_harnesses(self, method: str, body: bytes) -> None:
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, method: str, body: bytes) -> None:
        content = self._json_body(body).get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "\"metadata\" must be a mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"invalid YAML: {err}"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _create_repo(self, method: str, body: bytes) -> None:
        self._require_auth()
        payload = self._json_body(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_PREFIX:
            raise _HubError(400, f"fake hub: unsupported repo type {repo_type!r}")
        name = payload.get("name")
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise _HubError(400, f"fake hub: invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        if (repo_type, repo_id) in self.hub._repos:
            repo = self.hub._repos[(repo_type, repo_id)]
            self._send_json(
                {"error": "You already created this model repo", "url": self.hub._repo_url(repo)}, status=409
            )
            return
        repo = self.hub._new_repo(repo_type, repo_id, payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send_json({"url": self.hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, method: str, body: bytes) -> None:
        self._require_auth()
        payload = self._json_body(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload.get('name')}"
        if self.hub._repos.pop((repo_type, repo_id), None) is None:
            raise _HubError(404, f"Repository Not Found for {repo_id}.", "RepoNotFound")
        self._send_json({})

    def _create_branch(self, method: str, body: bytes, type: str, repo_id: str, branch: str) -> None:  # noqa: A002
        repo = self._repo(type, repo_id, write=True)
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, self._json_body(body).get("startingPoint"))
        repo.branches[branch] = start.oid
        self._send_json({})

    def _preupload(self, method: str, body: bytes, type: str, repo_id: str, rev: str) -> None:  # noqa: A002
        repo = self._repo(type, repo_id, write=True)
        if self.query.get("create_pr") == "1":
            raise _HubError(400, "fake hub: create_pr is not supported")
        oid = repo.resolve(rev)
        existing = repo.commits[oid].files if oid is not None else {}
        files = []
        for entry in self._json_body(body).get("files", []):
            path = entry["path"]
            files.append(
                {
                    "path": path,
                    # Everything goes inline as base64 in the commit: no LFS / Xet server to stand in for.
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing[path]) if path in existing else None,
                }
            )
        self._send_json({"files": files, "commitOid": oid})

    def _commit(self, method: str, body: bytes, type: str, repo_id: str, rev: str) -> None:  # noqa: A002
        repo = self._repo(type, repo_id, write=True)
        if self.query.get("create_pr") == "1":
            raise _HubError(400, "fake hub: create_pr is not supported")
        if rev not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        head = repo.commits[repo.branches[rev]]
        files = dict(head.files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"fake hub: unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(prefix)}
            elif key == "lfsFile":
                raise _HubError(400, "fake hub: LFS files are not supported (preupload always answers 'regular')")
            else:
                raise _HubError(400, f"fake hub: unknown commit line key {key!r}")
        if not header.get("summary"):
            raise _HubError(400, "fake hub: commit header with a summary is required")
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self.hub._add_commit(repo, rev, head, header["summary"], header.get("description", ""), files)
        self._send_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    def _info(self, method: str, body: bytes, type: str, repo_id: str, rev: str | None) -> None:  # noqa: A002
        repo = self._repo(type, repo_id)
        commit = self._commit_at(repo, rev)
        card_data = _front_matter(commit.files.get("README.md", b""))
        self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": datetime.fromtimestamp(commit.created_at, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": list(card_data.get("tags") or []) if isinstance(card_data, dict) else [],
                "library_name": card_data.get("library_name") if isinstance(card_data, dict) else None,
                "cardData": card_data or None,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }
        )

    def _tree(self, method: str, body: bytes, type: str, repo_id: str, rev: str, path: str | None) -> None:  # noqa: A002
        repo = self._repo(type, repo_id)
        commit = self._commit_at(repo, rev)
        recursive = str(self.query.get("recursive", "false")).lower() in ("1", "true")
        prefix = (path or "").strip("/")
        prefix = prefix + "/" if prefix else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise _HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :].split("/")
            depth = len(rest) if recursive else 1
            for i in range(1, min(depth, len(rest) - 1) + 1):  # intermediate folders
                folder = prefix + "/".join(rest[:i])
                entries.setdefault(
                    folder, {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
                )
            if recursive or len(rest) == 1:
                data = commit.files[file_path]
                entries[file_path] = {"type": "file", "path": file_path, "oid": git_blob_sha1(data), "size": len(data)}
        self._send_json(list(entries.values()))

    def _resolve(self, method: str, body: bytes, type: str | None, repo_id: str, rev: str, path: str) -> None:  # noqa: A002
        repo = self._repo(type, repo_id)
        commit = self._commit_at(repo, rev)
        if path not in commit.files:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        data = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if range_match and method == "GET":
            start = int(range_match.group(1))
            end = int(range_match.group(2)) if range_match.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, head_only=method == "HEAD")


def _front_matter(readme: bytes) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.decode("utf-8", "replace"), flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# -- pointing the client at a server ---------------------------------------------------------------

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "", None}


def point_hf_client_at(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, hf_home: Path, token: str | None = FAKE_TOKEN
) -> None:
    """Make ``huggingface_hub`` (and transformers / peft through it) use ``endpoint`` for this test.

    ``huggingface_hub.constants`` is evaluated at import time, so setting ``HF_ENDPOINT`` alone does not reach
    an already imported client: the module-level names it reads at call time are patched too, as are the
    ``HfApi`` instances created at import (``huggingface_hub.hf_api.api``, behind ``create_repo``,
    ``file_exists``, ...) or cached lazily (``transformers.utils.hub._hf_api``). Environment variables are set
    as well, for subprocesses.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module

    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    patches = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)

    try:  # agent detection fetches a registry from the endpoint once per process; keep it local and empty
        from huggingface_hub.utils import _detect_agent

        monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    except ImportError:
        pass
    try:  # transformers caches one HfApi (with its endpoint) on first use
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None, raising=False)
    except ImportError:
        pass


def block_non_local_hosts(monkeypatch: pytest.MonkeyPatch, blocked: list[str]) -> None:
    """Fail name resolution of every host but the loopback ones (recorded in ``blocked``) for this test."""
    real_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _LOCAL_HOSTS:
            blocked.append(str(name))
            raise socket.gaierror(socket.EAI_NONAME, f"fake_hub: network access to {name!r} is blocked in tests")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running :class:`FakeHub` that ``huggingface_hub`` / transformers / peft talk to for this test.

    Sets ``HF_ENDPOINT`` (and the client's import-time constants), ``HF_TOKEN=fake-token``, ``HF_HOME`` and
    ``HF_HUB_CACHE`` under ``tmp_path``, unsets ``HF_HUB_OFFLINE``, and blocks resolution of non-loopback
    host names (``hub.blocked_hosts`` lists any attempt).
    """
    hub = FakeHub().start()
    try:
        point_hf_client_at(hub.url, monkeypatch, tmp_path / "hf_home", token=hub.token)
        block_non_local_hosts(monkeypatch, hub.blocked_hosts)
        yield hub
    finally:
        hub.stop()
