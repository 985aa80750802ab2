"""A stand-in for the Hugging Face Hub on 127.0.0.1: the few HTTP routes huggingface_hub's snapshot_download
uses (repo info, file tree, file metadata and bytes), serving one repo from a local folder, with the bytes
of weight files sent at a chosen rate. The real huggingface_hub client talks to it over real HTTP."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(
        self, repo_id: str, folder: Path, weights_bytes_per_s: float | None = None, fail_files_with: int | None = None
    ) -> None:
        self.repo_id = repo_id
        # When set, every file download answers this HTTP status, with the request's Authorization header
        # echoed in the body, as a careless server or proxy might: the worker must never repeat it.
        self.fail_files_with = fail_files_with
        self.files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        self.rate = weights_bytes_per_s
        self.requests: list[str] = []
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
        repo = f"/api/models/{self.repo_id}"
        if path.startswith(f"{repo}/revision/"):
            siblings = [{"rfilename": name} for name in self.files]
            return self._json(request, {"id": self.repo_id, "sha": COMMIT, "siblings": siblings}, body)
        if path.startswith(f"{repo}/tree/"):
            return self._json(request, [self._tree_entry(name) for name in self.files], body)
        prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix) :].split("/", 1)[1]
            if name in self.files and self.fail_files_with is not None:
                return self._echo_failure(request, body)
            if name in self.files:
                return self._file(request, self.files[name], body)
        request.send_response(404)
        request.send_header("X-Error-Code", "EntryNotFound")
        request.send_header("Content-Length", "0")
        request.end_headers()

    def _echo_failure(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        data = f"refused: {request.headers.get('Authorization', '')}".encode()
        request.send_response(self.fail_files_with)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("X-Error-Message", f"refused: {request.headers.get('Authorization', '')}")
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _tree_entry(self, name: str) -> dict:
        data = self.files[name].read_bytes()
        entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, request: BaseHTTPRequestHandler, payload: object, body: bool) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def _file(self, request: BaseHTTPRequestHandler, path: Path, body: bool) -> None:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest() if path.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        request.send_response(200)
        request.send_header("Content-Length", str(len(data)))
        request.send_header("ETag", f'"{digest}"')
        request.send_header("X-Repo-Commit", COMMIT)
        if path.suffix == ".safetensors":
            request.send_header("X-Linked-Etag", f'"{digest}"')
            request.send_header("X-Linked-Size", str(len(data)))
        request.end_headers()
        if not body:
            return
        throttled = self.rate is not None and path.suffix == ".safetensors"
        step = max(1024, int(self.rate / 20)) if throttled else len(data)
        try:
            for start in range(0, len(data), step):
                request.wfile.write(data[start : start + step])
                if throttled:
                    time.sleep(step / self.rate)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped the download
