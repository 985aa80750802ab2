"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving one repo from a local folder over real HTTP, for
both Hub clients in this project: the worker's download (huggingface_hub's snapshot_download) and
builder/fetch_model.py (HfApi.model_info with files metadata, then hf_hub_download per file).

Routes (any other path answers 404 with X-Error-Code: EntryNotFound, as the Hub does for a missing repo):
- GET/HEAD /api/models/{repo} and /api/models/{repo}/revision/{rev}: the repo info, commit COMMIT, with each
  file's size and hash as `siblings` (weights as LFS files known by their sha256, the rest by git blob id);
- GET /api/models/{repo}/tree/{rev}: the file listing;
- GET/HEAD /{repo}/resolve/{rev}/{name}: a file's metadata headers (ETag, X-Repo-Commit, X-Linked-*) and bytes.

Faults and records, each a constructor argument and an attribute a test may also set after construction:
- weights_bytes_per_s: send the bytes of .safetensors files at this rate;
- fail_files_with: answer every file request with this HTTP status, echoing the request's Authorization
  header in the body and headers, as a careless server or proxy might (the client must never repeat it);
- fail_first_get: names of files whose first GET answers HTTP 500;
- damaged: names of files whose GET sends zeros of the right length instead of their bytes;
- requests ("METHOD path" of every request), gets (the name of each file GET), authorizations (the
  Authorization headers of the requests about the repo; huggingface_hub also asks things of its own).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(
        self,
        repo_id: str,
        folder: Path,
        weights_bytes_per_s: float | None = None,
        fail_files_with: int | None = None,
        fail_first_get: Iterable[str] = (),
        damaged: Iterable[str] = (),
    ) -> None:
        self.repo_id = repo_id
        self.files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        self.rate = weights_bytes_per_s
        self.fail_files_with = fail_files_with
        self.fail_first_get = set(fail_first_get)
        self.damaged = set(damaged)
        self.requests: list[str] = []
        self.gets: list[str] = []
        self.authorizations: set[str] = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._route(self, body=False)

            def do_GET(self) -> None:
                hub._route(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _route(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append(f"{request.command} {path}")
        if self.repo_id in path:
            self.authorizations.add(request.headers.get("Authorization", ""))
        repo = f"/api/models/{self.repo_id}"
        if path == repo or path.startswith(f"{repo}/revision/"):
            siblings = [self._sibling(name) for name in self.files]
            return self._json(request, {"id": self.repo_id, "sha": COMMIT, "siblings": siblings}, body)
        if path.startswith(f"{repo}/tree/"):
            return self._json(request, [self._tree_entry(name) for name in self.files], body)
        prefix = f"/{self.repo_id}/resolve/"  # then the revision, then the file's name
        name = path[len(prefix) :].partition("/")[2] if path.startswith(prefix) else None
        if name not in self.files:
            return self._send(request, 404, b"", body, {"X-Error-Code": "EntryNotFound"})
        if self.fail_files_with is not None:
            echo = f"refused: {request.headers.get('Authorization', '')}"
            return self._send(request, self.fail_files_with, echo.encode(), body, {"X-Error-Message": echo})
        if body:
            self.gets.append(name)
            if name in self.fail_first_get and self.gets.count(name) == 1:
                return self._send(request, 500, b"try again", body)
        self._file(request, name, body)

    def _hashes(self, name: str) -> tuple[bytes, str, str]:
        """A file's bytes, its sha256 and its git blob id."""
        data = self.files[name].read_bytes()
        blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        return data, hashlib.sha256(data).hexdigest(), blob

    def _sibling(self, name: str) -> dict:
        data, sha256, blob = self._hashes(name)
        entry = {"rfilename": name, "size": len(data), "blobId": blob}
        if name.endswith(".safetensors"):  # weights are LFS files, known by their sha256
            entry["lfs"] = {"sha256": sha256, "size": len(data), "pointerSize": 134}
        return entry

    def _tree_entry(self, name: str) -> dict:
        data, sha256, blob = self._hashes(name)
        entry = {"type": "file", "path": name, "size": len(data), "oid": blob}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, request: BaseHTTPRequestHandler, payload: object, body: bool) -> None:
        self._send(request, 200, json.dumps(payload).encode(), body, {"Content-Type": "application/json"})

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, body: bool, headers: dict | None = None):
        request.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            request.send_header(key, value)
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _file(self, request: BaseHTTPRequestHandler, name: str, body: bool) -> None:
        data, sha256, blob = self._hashes(name)
        weights = name.endswith(".safetensors")
        etag = sha256 if weights else blob
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{etag}"')
        request.send_header("X-Repo-Commit", COMMIT)
        if weights:
            request.send_header("X-Linked-Etag", f'"{etag}"')
            request.send_header("X-Linked-Size", str(len(data)))
        request.end_headers()
        if not body:
            return
        if name in self.damaged:
            data = bytes(len(data))
        throttled = self.rate is not None and weights
        step = max(1024, int(self.rate / 20)) if throttled else len(data)
        try:
            for start in range(0, len(data), step):
                request.wfile.write(data[start : start + step])
                if throttled:
                    time.sleep(step / self.rate)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped the download
