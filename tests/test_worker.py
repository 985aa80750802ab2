"""The handler as the runpod SDK runs it, and `python handler.py` as a user runs it."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runpod.serverless.modules.rp_job import run_job

from worker_transformers.worker import make_handler

ROOT = Path(__file__).resolve().parents[1]


def sdk_run(handler, job_input):
    """Run one job through the SDK's own job runner, the code path a deployed worker takes."""
    return asyncio.run(run_job(handler, {"id": "test-job", "input": job_input}))


def test_a_valid_job_returns_output(tiny_engine, tiny_settings):
    result = sdk_run(make_handler(tiny_engine, tiny_settings), {"prompt": "Hello", "max_new_tokens": 3})
    assert "error" not in result
    assert result["output"]["usage"]["completion_tokens"] <= 3


def test_a_bad_job_fails_with_the_field_named_and_no_traceback(tiny_engine, tiny_settings):
    result = sdk_run(make_handler(tiny_engine, tiny_settings), {"prompt": "Hello", "top_p": 7})
    assert result == {"error": "top_p: Input should be less than or equal to 1"}


def test_a_job_over_the_input_cap_fails_with_its_size(tiny_engine, tiny_settings):
    result = sdk_run(make_handler(tiny_engine, tiny_settings), {"prompt": "one two " * 3000})
    assert result["error"].startswith("prompt: ") and "MAX_INPUT_TOKENS=" in result["error"]


def test_the_handler_does_not_block_the_event_loop(tiny_engine, tiny_settings):
    handler = make_handler(tiny_engine, tiny_settings)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        await handler({"input": {"prompt": "Hello", "max_new_tokens": 48, "temperature": 0}})
        task.cancel()
        return ticks

    assert asyncio.run(main()) > 0, "the event loop made no progress while a job ran"


def run_handler(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_test_input_with_a_bad_job_exits_1_with_the_message(tiny_model_dir):
    job = json.dumps({"input": {"prompt": "Hello", "temperature": 9}})
    proc = run_handler("--test_input", job, env={"MODEL_NAME": str(tiny_model_dir)})
    assert proc.returncode == 1
    assert "temperature: Input should be less than or equal to 2" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_test_input_with_a_good_job_exits_0(tiny_model_dir):
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 2}})
    proc = run_handler("--test_input", job, env={"MODEL_NAME": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed successfully" in proc.stdout


def test_a_bad_setting_stops_startup_with_one_line():
    proc = run_handler("--test_input", '{"input": {"prompt": "x"}}', env={"DTYPE": "fp8"})
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "DTYPE='fp8' is not allowed; use one of auto, bfloat16, float16, float32" in lines[0]


def test_a_missing_model_stops_startup_listing_what_was_tried(tmp_path):
    env = {
        "MODEL_NAME": "nobody/nothing",
        "MODEL_SOURCE": "cached",
        "RUNPOD_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = run_handler("--test_input", '{"input": {"prompt": "x"}}', env=env)
    assert proc.returncode == 1
    assert f"{tmp_path / 'cache'}/models--nobody--nothing" in proc.stderr
    assert "Traceback" not in proc.stderr
