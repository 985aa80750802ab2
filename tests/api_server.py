"""Servers for tests: the runpod SDK's real local API server (`python handler.py --rp_serve_api`) in a subprocess,
and the worker's local OpenAI server (serving/openai/server.py) on a thread in front of a handler."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen

    def output(self) -> str:
        """Everything the server printed (only when started with capture=True, and once it has stopped)."""
        return self.proc.stdout.read() if self.proc.stdout else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_server(env: dict[str, str | None], capture: bool = False, start_timeout_s: float = 180) -> Iterator[Server]:
    """Start the server with os.environ plus `env` (None: unset) on a free port of 127.0.0.1, wait until it
    answers, and stop it afterwards. With `capture`, its stdout and stderr are kept for Server.output()."""
    port = free_port()
    full_env = {**os.environ, **env}
    for name in [name for name, value in full_env.items() if value is None]:
        del full_env[name]
    sink = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
        cwd=ROOT, env=full_env, stdout=sink, stderr=subprocess.STDOUT if capture else sink, text=True,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", proc)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the API server exited with {proc.returncode} before it answered")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not answer within {start_timeout_s:.0f} s")
            try:
                requests.get(f"{server.url}/docs", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def openai_server(handler) -> Iterator[str]:
    """The local OpenAI server in front of `handler` on a free port of 127.0.0.1, over real HTTP; yields its base
    URL (the OpenAI base is `<url>/openai/v1`)."""
    import threading

    import uvicorn

    from worker_transformers.serving.openai.server import make_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(handler), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


@dataclass
class ServedModel:
    url: str  # the local server's base (the OpenAI base is `<url>/openai/v1`)
    client: Any  # the real `openai` client, pointed at it
    model: str  # the served model's name
    engine: Any  # the worker's frontend (setup's)


@contextmanager
def served_model(folder: Path | str, **env: str) -> Iterator[ServedModel]:
    """The model in `folder` started as the worker starts it (`env`: its settings; MAX_NEW_TOKENS 32 unless given),
    behind the local OpenAI server, with the real `openai` client pointed at it; stopped afterwards."""
    import openai

    from worker_transformers.config import Settings
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    settings = Settings.from_env({"MODEL_NAME": str(folder), "MAX_NEW_TOKENS": "32", **env})
    engine = setup(settings)
    try:
        with openai_server(make_handler(engine, settings)) as url:
            client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0)
            yield ServedModel(url, client, settings.served_model_name or str(folder), engine)
    finally:
        engine.close()
