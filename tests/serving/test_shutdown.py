"""SIGTERM on a deployed worker, through the real runpod SDK's job loop against a stand-in for RunPod's job
API on 127.0.0.1: jobs running at SIGTERM get SHUTDOWN_GRACE_S to finish, a job still running then is
answered with a message saying the worker was stopped, and the process exits instead of waiting for SIGKILL."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STREAM_POST_S = 0.3  # each streamed chunk's POST is answered this late: a job of many chunks runs for seconds


class Platform:
    """Hands out `jobs` one per job request, then none; records every result posted; slows stream posts."""

    def __init__(self, jobs: list[dict], poll_s: float = 0.5) -> None:
        self.jobs = list(jobs)
        self.results: list[dict] = []
        self.streamed = threading.Event()
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if urlparse(self.path).path.startswith("/take") and platform.jobs:
                    self._answer(200, json.dumps(platform.jobs.pop(0)).encode())
                else:
                    time.sleep(poll_s)  # a long poll with nothing to hand out
                    self._answer(204, b"")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if urlparse(self.path).path.startswith("/stream"):
                    platform.streamed.set()
                    time.sleep(STREAM_POST_S)
                else:
                    platform.results.append(json.loads(body))
                self._answer(200, b"{}")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self) -> dict[str, str]:
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/take/$ID?x=1",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/done/$ID?x=1",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.url}/stream/$ID?x=1",
            "RUNPOD_POD_ID": "test-worker",
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
        }


def worker(platform: Platform, tiny_model_dir, **env) -> subprocess.Popen:
    full_env = {**os.environ, **platform.env(), "MODEL_NAME": str(tiny_model_dir), **env}
    full_env.pop("RUNPOD_WEBHOOK_PING", None)
    return subprocess.Popen(
        [sys.executable, "handler.py"], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def stopped_midway(platform: Platform, tiny_model_dir, grace_s: str, exit_within_s: int) -> tuple[int, str]:
    """Start the worker against `platform`, send it SIGTERM once its job streams, and return its exit code
    (which must come within `exit_within_s`) and its output."""
    proc = worker(platform, tiny_model_dir, SHUTDOWN_GRACE_S=grace_s)
    try:
        assert platform.streamed.wait(120), "the job never started"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=exit_within_s)
    finally:
        proc.kill()
        platform.server.shutdown()
    return code, proc.stdout.read().decode()


# Sampled with a seed: random weights rarely pick the end-of-text token, so it runs all its 60 tokens.
LONG_JOB = {
    "id": "long",
    "input": {"prompt": "Hello", "max_new_tokens": 60, "seed": 1, "temperature": 1.0, "stream": True},
}


def test_a_job_still_running_after_the_grace_period_is_failed_and_the_worker_exits(tiny_model_dir):
    platform = Platform([LONG_JOB])
    code, output = stopped_midway(platform, tiny_model_dir, grace_s="1", exit_within_s=60)
    assert code in (0, 128 + signal.SIGTERM), output  # the SDK's own exit, or this worker's once all is answered
    [result] = platform.results
    assert result["error"] == (
        "the worker was stopped (SIGTERM) before this job finished: it ran past SHUTDOWN_GRACE_S=1 s; send it again"
    ), output


def test_a_job_that_finishes_within_the_grace_period_is_answered_in_full(tiny_model_dir):
    short = {"id": "short", "input": {**LONG_JOB["input"], "max_new_tokens": 4}}
    platform = Platform([short])
    code, output = stopped_midway(platform, tiny_model_dir, grace_s="30", exit_within_s=60)
    assert code in (0, 128 + signal.SIGTERM), output
    [result] = platform.results
    assert "error" not in result and result["output"][-1]["usage"]["completion_tokens"] == 4, result


def test_the_worker_exits_after_its_jobs_even_while_the_sdk_waits_on_a_long_job_request(tiny_model_dir):
    platform = Platform([LONG_JOB], poll_s=50)  # the SDK's own exit would wait for this poll to end
    code, output = stopped_midway(platform, tiny_model_dir, grace_s="1", exit_within_s=30)
    assert code == 128 + signal.SIGTERM and "SIGTERM: exiting" in output, output
    [result] = platform.results
    assert result["error"].startswith("the worker was stopped (SIGTERM) before this job finished"), result


def test_a_guarded_job_that_is_cancelled_leaves_the_batch(tiny_engine, tiny_model_name):
    import asyncio

    from worker_transformers.config import Settings
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.serving.shutdown import Shutdown

    handler = Shutdown(5).guard(make_handler(tiny_engine, Settings.from_env({"MODEL_NAME": tiny_model_name})))

    async def cancel_midway():
        async def consume(first_chunk: asyncio.Event):
            async for _ in handler(LONG_JOB):
                first_chunk.set()

        first_chunk = asyncio.Event()
        job = asyncio.create_task(consume(first_chunk))
        await first_chunk.wait()
        job.cancel()  # as the SDK does when the platform stops a job
        with contextlib.suppress(asyncio.CancelledError):
            await job
        for _ in range(100):
            if tiny_engine.generation.engine.in_flight() == 0:
                return 0
            await asyncio.sleep(0.05)
        return tiny_engine.generation.engine.in_flight()

    assert asyncio.run(cancel_midway()) == 0
