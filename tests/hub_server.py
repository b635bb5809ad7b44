"""A local Hugging Face Hub for tests: an HTTP server on 127.0.0.1 (an ephemeral port) that speaks the
Hub's file protocol as `huggingface_hub` 2.x uses it, for model and dataset repositories built in the test.

What it answers (the subset `hf_hub_download`, `snapshot_download`, transformers' `from_pretrained`,
`HfFileSystem` and `datasets.load_dataset` use); `{kind}` is `models` or `datasets`, and a dataset's file
paths start with `/datasets/`:

- `HEAD|GET /[datasets/]{repo}/resolve/{revision}/{path}`: the file, with `X-Repo-Commit` (the commit hash),
  `ETag` (quoted sha256 of the bytes), `Content-Length`; `revision` is `main` or the commit hash.
- `GET /api/{kind}/{repo}` and `/api/{kind}/{repo}/revision/{revision}`: `{"id", "sha", "siblings"}`.
- `GET /api/{kind}/{repo}/tree/{revision}[/{folder}][?recursive=true]`: the folder's entries (`type`, `path`,
  `size`, `oid`), everything below it with `recursive` (transformers lists `additional_chat_templates/`
  this way, `HfFileSystem` globs data files this way).
- `POST /api/{kind}/{repo}/paths-info/{revision}` (form field `paths`, repeated): the entries of the paths
  that exist (`HfFileSystem.info`).
- `GET /api/agent-harnesses`: an empty registry (huggingface_hub asks for it once a process, for its
  user agent).
- errors as the Hub sends them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or
  `EntryNotFound`; a gated repo without its token: 401 with `X-Error-Code: GatedRepo`.

Every request is recorded in `HubServer.requests` (`"GET /path"`, without the query); a request it does not
understand is answered 400 and also recorded in `HubServer.unknown`, so that a test sees what a client asked
for. Not a mock of lightning-lora: it stands for the Hub, so that downloads are tested offline.

Example:
    >>> with HubServer({"org/tiny": "/path/to/model_dir"}) as hub:     # doctest: +SKIP
    ...     hub.url
    'http://127.0.0.1:40123'
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: the revisions every repository has
REVISIONS = ("main", COMMIT)
#: the largest request body read (a `paths-info` form)
MAX_BODY = 1 << 16


class HubServer:
    """Serves the model repositories `repos` and the dataset repositories `datasets` (repo id -> local
    directory) at `url`; `gated` maps a model repo id to the token it needs.

    Example:
        >>> hub = HubServer({"org/tiny": "model_dir"}, datasets={"org/data": "data_dir"}).start()  # doctest: +SKIP
        >>> hub.stop()                                                                            # doctest: +SKIP
    """

    def __init__(self, repos: dict[str, str | Path], gated: dict[str, str] | None = None,
                 datasets: dict[str, str | Path] | None = None) -> None:
        self.kinds: dict[str, dict[str, Path]] = {
            "models": {repo: Path(directory) for repo, directory in repos.items()},
            "datasets": {repo: Path(directory) for repo, directory in (datasets or {}).items()}}
        self.repos = self.kinds["models"]
        self.gated = dict(gated or {})
        self.requests: list[str] = []
        self.unknown: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self._lock = threading.Lock()

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

            def setup(self) -> None:
                super().setup()
                with hub._lock:
                    hub._connections.add(self.connection)

            def finish(self) -> None:
                with hub._lock:
                    hub._connections.discard(self.connection)
                super().finish()

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_POST(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close the open connections: a client's next request finds no Hub, as after the
        Hub went away (a kept-alive connection would otherwise still be answered)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for connection in self._connections:
                    try:
                        connection.shutdown(socket.SHUT_RDWR)
                    except OSError:  # already closed by the client
                        pass
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ protocol
    def _files(self, root: Path, folder: str = "", recursive: bool = True) -> list[Path]:
        """The files and folders under `root / folder` (only its direct entries unless `recursive`), sorted."""
        directory = root / folder
        return sorted(directory.rglob("*") if recursive else directory.iterdir())

    @staticmethod
    def _entry(root: Path, item: Path) -> dict[str, object]:
        """A tree / paths-info entry as the Hub writes it (`oid`: a stand-in for the git blob or tree id)."""
        path = item.relative_to(root).as_posix()
        oid = hashlib.sha1(path.encode()).hexdigest()
        if item.is_file():
            return {"type": "file", "path": path, "size": item.stat().st_size, "oid": oid}
        return {"type": "directory", "path": path, "oid": oid}

    @staticmethod
    def _find_repo(repos: dict[str, Path], path: str) -> tuple[str | None, str]:
        """(repo id, rest of the path) for `org/name/rest` (or `name/rest`)."""
        for repo in sorted(repos, key=len, reverse=True):
            if path == repo or path.startswith(repo + "/"):
                return repo, path[len(repo) + 1:]
        return None, path

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlsplit(handler.path)
        path = unquote(url.path).lstrip("/")
        self.requests.append(f"{handler.command} /{path}")
        length = int(handler.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            handler.close_connection = True
            return self._unknown(handler)
        form = parse_qs(handler.rfile.read(length).decode()) if length else {}  # read it all: the connection is reused
        api = path.startswith("api/")
        if path == "api/agent-harnesses" and handler.command == "GET":  # huggingface_hub's user-agent registry
            return self._json(handler, {"standardEnvVars": [], "harnesses": {}}, body)
        kind = "models"
        for prefix in ("api/models/", "api/datasets/", "datasets/"):
            if path.startswith(prefix):
                kind = "datasets" if "datasets" in prefix else "models"
                path = path.removeprefix(prefix)
                break
        else:
            if api:
                return self._unknown(handler)
        repo, rest = self._find_repo(self.kinds[kind], path)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        if repo in self.gated and handler.headers.get("Authorization") != f"Bearer {self.gated[repo]}":
            return self._error(handler, 401, "GatedRepo", "Access to this model is restricted")
        root = self.kinds[kind][repo]
        if api:
            return self._api(handler, kind, repo, root, rest, parse_qs(url.query), form, body)
        action, _, remainder = rest.partition("/")
        revision, _, filename = remainder.partition("/")
        if action != "resolve" or not filename or handler.command == "POST":
            return self._unknown(handler)
        if revision not in REVISIONS:
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        file = root / filename
        if not file.is_file():
            return self._error(handler, 404, "EntryNotFound", "Entry not found", commit=True)
        data = file.read_bytes()
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": COMMIT,
                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(handler, 200, data, headers, body)

    def _api(self, handler: BaseHTTPRequestHandler, kind: str, repo: str, root: Path, rest: str,
             query: dict[str, list[str]], form: dict[str, list[str]], body: bool) -> None:
        """`/api/{kind}/{repo}/{rest}`: repo info, tree, paths-info (`query`: the URL's, `form`: a POST's fields)."""
        action, _, remainder = rest.partition("/")
        revision, _, folder = remainder.partition("/")
        if action == "revision":
            revision = remainder  # a revision may hold a slash (refs/convert/parquet)
        elif action == "" and handler.command != "POST":
            action, revision = "revision", "main"
        if action not in ("revision", "tree", "paths-info") or (handler.command == "POST") != (action == "paths-info"):
            return self._unknown(handler)
        if revision not in REVISIONS:
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if action == "revision":
            info = {"id": repo, "sha": COMMIT, "private": False, "gated": "manual" if repo in self.gated else False,
                    "siblings": [{"rfilename": p.relative_to(root).as_posix()}
                                 for p in self._files(root) if p.is_file()]}
            if kind == "models":
                info["modelId"] = repo
            return self._json(handler, info, body)
        if action == "tree":
            folder = folder.strip("/")
            if not (root / folder).is_dir():
                return self._error(handler, 404, "EntryNotFound", f"{folder} does not exist on main", commit=True)
            recursive = query.get("recursive", ["false"])[-1].lower() == "true"
            return self._json(handler, [self._entry(root, p) for p in self._files(root, folder, recursive)], body)
        wanted = [root / p.strip("/") for p in form.get("paths", [])]
        return self._json(handler, [self._entry(root, p) for p in wanted if p.exists()], body)

    def _json(self, handler: BaseHTTPRequestHandler, value: object, body: bool) -> None:
        self._send(handler, 200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

    def _unknown(self, handler: BaseHTTPRequestHandler) -> None:
        """A request this Hub does not speak: recorded in `unknown` (with its query) and answered 400."""
        self.unknown.append(f"{handler.command} {handler.path}")
        self._error(handler, 400, "BadRequest", f"the test Hub does not answer {handler.command} {handler.path}")

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
