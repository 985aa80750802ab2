"""The handler as the runpod SDK runs it, and `python handler.py` as a user runs it: startup, its
timeline, and what a worker whose startup failed does (it answers every job with the reason)."""

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runpod.serverless.modules.rp_handler import is_generator
from runpod.serverless.modules.rp_job import run_job_generator

from worker_transformers.serving.handlers import failed_init_handler, make_handler
from worker_transformers.startup import readahead, record_readahead
from worker_transformers.worker import start_worker

ROOT = Path(__file__).resolve().parents[1]


def sdk_run(handler, job_input):
    """Run one job the way the SDK's job loop does for a generator handler (rp_job.handle_job): its own
    run_job_generator, the first error ends the job, outputs are aggregated (return_aggregate_stream)."""

    async def run():
        result = {"output": []}
        async for item in run_job_generator(handler, {"id": "test-job", "input": job_input}):
            output = item.get("output")
            if isinstance(output, dict) and output.get("error"):
                item = {"error": str(output["error"])}
            if item.get("error"):
                return item
            result["output"].append(output)
        return result

    return asyncio.run(run())


def test_the_handler_is_one_the_sdk_streams_from(tiny_engine, tiny_settings):
    assert is_generator(make_handler(tiny_engine, tiny_settings))


def test_a_valid_job_returns_one_output(tiny_engine, tiny_settings):
    result = sdk_run(make_handler(tiny_engine, tiny_settings), {"prompt": "Hello", "max_new_tokens": 3})
    assert "error" not in result
    [output] = result["output"]
    assert output["usage"]["completion_tokens"] <= 3


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
        async for _ in handler({"input": {"prompt": "Hello", "max_new_tokens": 48, "temperature": 0}}):
            pass
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
def test_test_input_with_a_good_job_exits_0_after_logging_the_startup_timeline(tiny_model_dir):
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 2}})
    proc = run_handler("--test_input", job, env={"MODEL_NAME": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = proc.stdout.splitlines()
    assert json.loads(line)["usage"]["completion_tokens"] <= 2
    assert "job local_test completed" in proc.stderr
    timeline = proc.stderr[proc.stderr.index("startup timeline, RUNPOD_INIT_TIMEOUT=420 s:") :]
    phases = [line.split()[0] for line in timeline.splitlines()[2:] if line.startswith("  ")]
    # The readahead comes first where a manifest was recorded (readahead.py); this checkout may have none.
    assert [p for p in phases if p != "readahead"][:1] == ["resolve"] and phases[-1] == "ready"
    assert {"imports", "prefetch", "tokenizer", "model", "weights", "warm-up"} <= set(phases)


@pytest.mark.slow
def test_test_input_prints_a_streaming_job_chunk_by_chunk(tiny_model_dir):
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 6, "temperature": 0, "stream": True}})
    proc = run_handler("--test_input", job, env={"MODEL_NAME": str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    chunks = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(chunks) > 1
    assert chunks[-1]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(set(c) == {"text"} for c in chunks[:-1])


@pytest.mark.slow
def test_test_input_that_is_not_json_exits_1(tiny_model_dir):
    proc = run_handler("--test_input", "{not json", env={"MODEL_NAME": str(tiny_model_dir)})
    assert proc.returncode == 1
    assert "--test_input: not valid JSON" in proc.stderr


def test_a_worker_whose_startup_failed_answers_every_job_with_the_reason():
    handler = failed_init_handler("MODEL_NAME: no such model; fix it")
    assert sdk_run(handler, {"prompt": "Hello"}) == {"error": "MODEL_NAME: no such model; fix it"}
    assert sdk_run(handler, {"anything": 1}) == {"error": "MODEL_NAME: no such model; fix it"}


def test_a_bad_setting_fails_each_job_with_one_line_naming_it():
    proc = run_handler("--test_input", '{"input": {"prompt": "x"}}', env={"DTYPE": "fp8"})
    assert proc.returncode == 1
    message = "DTYPE='fp8' is not allowed; use one of auto, bfloat16, float16, float32"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr  # the startup error, then the job's
    assert message in lines[0] and f"job local_test failed: {message}" in lines[1]
    assert json.loads(proc.stdout) == {"error": message}


def test_a_missing_model_fails_each_job_listing_what_was_tried(tmp_path):
    env = {
        "MODEL_NAME": "nobody/nothing",
        "MODEL_SOURCE": "cached",
        "RUNPOD_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = run_handler("--test_input", '{"input": {"prompt": "x"}}', env=env)
    assert proc.returncode == 1
    error = json.loads(proc.stdout.splitlines()[-1])["error"]
    assert error.startswith("model nobody/nothing@main not found")
    assert f"{tmp_path / 'cache'}/models--nobody--nothing" in error
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_refused_openai_request_fails_the_job_with_an_openai_error_body(tiny_engine, tiny_settings):
    job_input = {"openai_route": "/v1/chat/completions", "openai_input": {"model": "x", "messages": []}}
    result = sdk_run(make_handler(tiny_engine, tiny_settings), job_input)
    assert set(result) == {"error"}
    assert json.loads(result["error"])["error"]["type"] == "invalid_request_error"


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.mark.slow
def test_truncated_weights_fail_each_job_with_the_file_and_the_fix(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    proc = run_handler("--test_input", '{"input": {"prompt": "x"}}', env={"MODEL_NAME": str(folder)})
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert error.startswith(f"{folder}: {weights} is truncated")
    assert "delete it and fetch the model again" in error
    assert "Traceback" not in proc.stdout + proc.stderr


def test_startup_returns_a_working_handler_and_logs_the_timeline(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO):
        started = start_worker({"MODEL_NAME": str(tiny_model_dir), "MAX_NEW_TOKENS": "8"})
    try:
        assert "startup timeline" in caplog.text
        result = sdk_run(started.handler, {"prompt": "Hello", "max_new_tokens": 2})
        [output] = result["output"]
        assert output["usage"]["completion_tokens"] <= 2
    finally:
        started.close()


def test_the_readahead_started_by_the_entry_point_joins_the_startup_timeline(tiny_model_dir, tmp_path, caplog):
    library = tmp_path / "lib.so"
    with open(library, "wb") as f:
        f.write(b"x" * 8192)
        f.flush()
        os.fsync(f.fileno())  # written back now: a dirty page would survive the eviction (a global sync can lag)
    (tmp_path / "readahead.txt").write_text(f"0 8192 {library}\n")
    # Out of the page cache, so there is something to read ahead. Rarely the kernel serves the readahead's probe
    # from a page mincore no longer shows (1 in 200 here, more under a loaded suite): then evict and start again.
    for _ in range(3):
        for _ in range(50):
            record_readahead.evict(library)
            if not record_readahead.resident_ranges(str(library)):
                break
            time.sleep(0.1)
        caplog.clear()
        reading = readahead.start(tmp_path / "readahead.txt")
        with caplog.at_level(logging.INFO):
            # A day of init budget: the budget counts from the process's start, and a long test run is old.
            started = start_worker(
                {"MODEL_NAME": str(tiny_model_dir), "RUNPOD_INIT_TIMEOUT": "86400"}, reading_ahead=reading
            )
        started.close()
        if not reading.already_cached:
            break
    assert "read ahead 8.2 kB of library pages for the imports" in caplog.text
    timeline = caplog.text[caplog.text.index("startup timeline") :].splitlines()[2:]
    assert [line.split()[0] for line in timeline[:2]] == ["readahead", "resolve"]


def test_an_unexpected_startup_fault_is_logged_with_its_traceback_and_answered(tiny_model_dir, tmp_path, caplog):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": "four"}))  # valid JSON, nonsense
    with caplog.at_level(logging.ERROR):
        handler = start_worker({"MODEL_NAME": str(folder)}).handler
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.getMessage().startswith("startup failed unexpectedly after")
    error = sdk_run(handler, {"prompt": "Hello"})["error"]
    assert error.startswith("startup failed unexpectedly (") and "num_attention_heads" in error
    assert error.endswith("the worker log has the traceback")


def test_runpod_is_imported_without_its_processor_probe_and_still_names_the_processor():
    code = (
        "import cpuinfo; probe = cpuinfo.get_cpu_info\n"
        "from worker_transformers.startup.sdk import import_runpod, processor_name\n"
        "import_runpod()\n"
        "from runpod.serverless.utils import rp_debugger\n"
        "assert cpuinfo.get_cpu_info is probe, 'the probe was not put back'\n"
        "print(rp_debugger.PROCESSOR == processor_name() != 'unknown')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.slow
def test_sigterm_during_startup_ends_the_worker_at_once(default_model_path):
    """As a container's PID 1 a process gets only the signals it handles; exiting with 143 (128 + SIGTERM)
    rather than dying of the signal shows the worker handles SIGTERM from its first moments."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "x"}}'],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    for line in proc.stdout:  # wait until startup is under way
        if "found:" in line:
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 143
    assert time.monotonic() - started < 10


def test_a_chat_template_that_cannot_render_fails_startup_naming_the_setting(tiny_model_dir):
    started = start_worker({"MODEL_NAME": str(tiny_model_dir), "CHAT_TEMPLATE": "{{ messages[0].nope() }}"})
    [output] = asyncio.run(_collect(started.handler))
    assert output["error"].startswith("CHAT_TEMPLATE: the template cannot render a one-message chat")


async def _collect(handler):
    return [item async for item in handler({"id": "t", "input": {"prompt": "x"}})]
