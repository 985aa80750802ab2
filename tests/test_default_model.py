"""The real default model, found in the Hugging Face cache by the same resolver that serves RunPod's cache,
and the real runpod local API server in front of it."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from worker_transformers.config import DEFAULT_MODEL, Settings

ROOT = Path(__file__).resolve().parents[1]
TEST_INPUT = json.loads((ROOT / "test_input.json").read_text())

pytestmark = pytest.mark.slow


def test_the_default_model_knows_the_capital_of_france(default_model_path):
    from worker_transformers.schema import parse_request
    from worker_transformers.worker import setup

    settings = Settings.from_env({**os.environ, "MODEL_NAME": DEFAULT_MODEL, "MODEL_SOURCE": "auto"})
    engine = setup(settings)
    out = engine.generate(parse_request(TEST_INPUT["input"], settings.max_new_tokens))
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert out["model"] == DEFAULT_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def api_server(default_model_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, "MODEL_NAME": DEFAULT_MODEL},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the API server exited with {proc.returncode} before it answered")
            try:
                requests.get(f"{url}/docs", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail("the API server did not answer within 180 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_runsync_on_the_local_api_server_answers_paris(api_server):
    reply = requests.post(f"{api_server}/runsync", json=TEST_INPUT, timeout=120)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "COMPLETED", body
    assert "Paris" in body["output"]["text"]


def test_runsync_with_a_bad_job_reports_the_field(api_server):
    reply = requests.post(f"{api_server}/runsync", json={"input": {"prompt": "x", "seed": "abc"}}, timeout=60)
    body = reply.json()
    assert body["status"] == "FAILED"
    assert body["error"] == "seed: Input should be a valid integer"
