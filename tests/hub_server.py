"""A local Hugging Face Hub for tests: an HTTP server on 127.0.0.1 (an ephemeral port) that speaks the
Hub's file protocol as `huggingface_hub` 2.x uses it, for model repositories built in the test.

What it answers (the subset `hf_hub_download`, `snapshot_download` and transformers' `from_pretrained` use):

- `HEAD|GET /{repo}/resolve/{revision}/{path}`: the file, with `X-Repo-Commit` (the commit hash),
  `ETag` (quoted sha256 of the bytes), `Content-Length`; `revision` is `main` or the commit hash.
- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{revision}`: `{"id", "sha", "siblings"}`.
- `GET /api/models/{repo}/tree/{revision}[/{folder}]`: the folder's entries (`type`, `path`, `size`, `oid`),
  not recursive (transformers lists `additional_chat_templates/` this way).
- errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or
  `EntryNotFound`; a gated repo without its token: 401 with `X-Error-Code: GatedRepo`.

Every request path is recorded in `HubServer.requests`. Not a mock of lightning-lora: it stands for
the Hub, so that downloads are tested offline.

Example:
    >>> with HubServer({"org/tiny": "/path/to/model_dir"}) as hub:     # doctest: +SKIP
    ...     hub.url
    'http://127.0.0.1:40123'
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """Serves `repos` (repo id -> local directory) at `url`; `gated` maps a repo id to the token it needs.

    Example:
        >>> hub = HubServer({"org/tiny": "model_dir"}).start()   # doctest: +SKIP
        >>> hub.stop()                                            # doctest: +SKIP
    """

    def __init__(self, repos: dict[str, str | Path], gated: dict[str, str] | None = None) -> None:
        self.repos = {repo: Path(directory) for repo, directory in repos.items()}
        self.gated = dict(gated or {})
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10  # a stuck client cannot hold a thread forever

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol
    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _find_repo(self, path: str) -> tuple[str | None, str]:
        """(repo id, rest of the path) for `org/name/rest` (or `name/rest`)."""
        for repo in sorted(self.repos, key=len, reverse=True):
            if path == repo or path.startswith(repo + "/"):
                return repo, path[len(repo) + 1:]
        return None, path

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(handler.path.split("?", 1)[0]).lstrip("/")
        self.requests.append(f"{handler.command} /{path}")
        api = path.startswith("api/models/")
        repo, rest = self._find_repo(path.removeprefix("api/models/"))
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        if repo in self.gated and handler.headers.get("Authorization") != f"Bearer {self.gated[repo]}":
            return self._error(handler, 401, "GatedRepo", "Access to this model is restricted")
        if api and rest.startswith("tree/"):
            revision, _, folder = rest.removeprefix("tree/").partition("/")
            if revision not in ("main", COMMIT):
                return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            return self._tree(handler, repo, folder.strip("/"), body)
        if api:
            revision = rest.removeprefix("revision/") if rest.startswith("revision/") else "main"
            if revision not in ("main", COMMIT):
                return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "gated": "manual" if repo in self.gated else False,
                    "siblings": [{"rfilename": name} for name in self._files(repo)]}
            return self._send(handler, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
        kind, _, remainder = rest.partition("/")
        revision, _, filename = remainder.partition("/")
        if kind != "resolve" or not filename:
            return self._error(handler, 404, "EntryNotFound", "Entry not found")
        if revision not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        file = self.repos[repo] / filename
        if not file.is_file():
            return self._error(handler, 404, "EntryNotFound", "Entry not found", commit=True)
        data = file.read_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": COMMIT,
                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(handler, 200, data, headers, body)

    def _tree(self, handler: BaseHTTPRequestHandler, repo: str, folder: str, body: bool) -> None:
        directory = self.repos[repo] / folder
        if not directory.is_dir():
            return self._error(handler, 404, "EntryNotFound", f"{folder} does not exist on main", commit=True)
        entries = []
        for item in sorted(directory.iterdir()):
            path = str(item.relative_to(self.repos[repo]))
            oid = hashlib.sha1(path.encode()).hexdigest()
            entries.append({"type": "file", "path": path, "size": item.stat().st_size, "oid": oid} if item.is_file()
                           else {"type": "directory", "path": path, "oid": oid})
        self._send(handler, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str,
               commit: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = COMMIT
        self._send(handler, status, json.dumps({"error": message}).encode(), headers, body=handler.command != "HEAD")

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
