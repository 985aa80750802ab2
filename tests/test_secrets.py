"""The Hugging Face token and the jobs' text stay out of logs and error messages, even when things fail."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub

from worker_transformers.config import Settings
from worker_transformers.model.download import download_from_hub
from worker_transformers.model.errors import ModelNotFound

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_canaryTokenThatMustNeverBeSeen42"
REPO = "Org/Tiny"


@pytest.mark.parametrize("status", [401, 403, 500])
def test_a_failed_download_never_shows_the_token(tiny_model_dir, tmp_path, caplog, status):
    with FakeHub(REPO, tiny_model_dir, fail_files_with=status) as hub:
        settings = Settings.from_env(
            {"MODEL_NAME": REPO, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        )
        # INFO: the level the worker logs at (worker.main). At DEBUG, httpcore traces whole response headers,
        # which here echo the token back; DEBUG is for diagnosing, not for a public endpoint.
        with caplog.at_level(logging.INFO), pytest.raises(ModelNotFound) as caught:
            download_from_hub(settings)
    assert any("/resolve/" in r for r in hub.requests), "the download never asked for a file"
    assert TOKEN not in str(caught.value)
    assert TOKEN not in caplog.text


@pytest.mark.slow
def test_a_worker_whose_download_fails_shows_neither_token_nor_traceback(tiny_model_dir, tmp_path):
    with FakeHub(REPO, tiny_model_dir, fail_files_with=500) as hub:
        env = {
            **os.environ,
            "MODEL_NAME": REPO,
            "MODEL_SOURCE": "hub",
            "HF_HUB_CACHE": str(tmp_path / "cache"),
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
        }
        proc = subprocess.run(
            [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "x"}}'],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"].startswith(f"{REPO}@main could not be downloaded from the Hub")
    assert TOKEN not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def serve_one_job(tiny_model_dir, log_level: str | None) -> tuple[str, str]:
    """Run one job on the real local API server: (the job's answer, everything the server printed)."""
    import requests
    from api_server import api_server

    env = {"MODEL_NAME": str(tiny_model_dir), "RUNPOD_LOG_LEVEL": log_level}
    with api_server(env, capture=True) as server:
        job = {"input": {"prompt": "The capital of France is", "max_new_tokens": 24, "temperature": 0}}
        [answer] = requests.post(f"{server.url}/runsync", json=job, timeout=60).json()["output"]
    return answer["text"], server.output()


@pytest.mark.slow
def test_answers_stay_out_of_the_logs_unless_the_sdk_log_level_is_debug(tiny_model_dir):
    answer, quiet = serve_one_job(tiny_model_dir, None)
    assert len(answer) > 20
    assert answer not in quiet
    answer, loud = serve_one_job(tiny_model_dir, "debug")
    assert answer in loud, "at debug the SDK logs outputs: the check above would have seen a leak"
