"""Chat templates are code that ships with the model: one that loops, always or on some content, is stopped
after TEMPLATE_TIMEOUT_S with a message naming it, the worker goes on serving other jobs, and SIGTERM still
stops it. Real model folders whose chat_template.jinja was replaced, started through the real entry point."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CHATML
from startup_faults import copy_model, run, startup_error

from worker_transformers.serving.prompt import TEMPLATE_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
# Ten billion empty steps: minutes of Jinja, whenever a message says "loop".
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
LOOPS_ON_WORD = "{% if 'loop' in messages[-1]['content'] %}" + LOOP + "{% endif %}" + CHATML
REFUSES_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System messages are not supported') }}{% endif %}"
    + CHATML
)


def with_template(tiny_model_dir, tmp_path, template: str) -> Path:
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    (folder / "chat_template.jinja").write_text(template)
    return folder


def chat(text: str, role: str = "user") -> dict:
    return {"messages": [{"role": role, "content": text}], "max_new_tokens": 3, "temperature": 0}


def test_a_template_that_loops_on_some_content_fails_that_job_and_others_are_served(tiny_model_dir, tmp_path):
    from worker_transformers.worker import start_worker

    folder = with_template(tiny_model_dir, tmp_path, LOOPS_ON_WORD)
    started = start_worker({"MODEL_NAME": str(folder), "MAX_CONCURRENCY": "2"})

    async def side_by_side():
        async def collect(job_input):
            return [item async for item in started.handler({"id": "j", "input": job_input})]

        looping = asyncio.create_task(collect(chat("please loop")))
        await asyncio.sleep(0.5)  # the looping render has begun
        others = [await collect(chat(f"Hello {n}")) for n in range(3)]  # answered while it loops
        return await looping, others

    try:
        [failed], others = asyncio.run(side_by_side())
        [after] = run(started.handler, chat("Hello again"))
    finally:
        started.close()
    assert failed == {
        "error": f"messages: the chat template of {folder} did not finish rendering them within "
        f"{TEMPLATE_TIMEOUT_S:.0f} s and was stopped; the template loops on this input: fix the model's chat "
        "template (chat_template.jinja or tokenizer_config.json), or send prompt instead"
    }
    assert all(answer[-1]["usage"]["completion_tokens"] == 3 for answer in others), others
    assert after["usage"]["completion_tokens"] == 3


def test_a_template_that_always_loops_stops_startup_at_the_warm_up_naming_it(tiny_model_dir, tmp_path):
    folder = with_template(tiny_model_dir, tmp_path, LOOP + CHATML)
    assert startup_error({"MODEL_NAME": str(folder)}) == (
        f"warm-up failed: the chat template of {folder} did not finish rendering them within "
        f"{TEMPLATE_TIMEOUT_S:.0f} s and was stopped; the template loops on this input: fix the model's chat "
        "template (chat_template.jinja or tokenizer_config.json), or send prompt instead"
    )


def test_a_template_that_loops_on_tools_starts_and_serves_chats_and_refuses_tools(tiny_model_dir, tmp_path, caplog):
    """Startup's probes of what the template does with tools (serving/tools/) render as jobs' chats do, bounded:
    a template that loops on them is stopped after TEMPLATE_TIMEOUT_S, then tools are refused and chats served."""
    from worker_transformers.worker import start_worker

    folder = with_template(tiny_model_dir, tmp_path, "{% if tools %}" + LOOP + "{% endif %}" + CHATML)
    with caplog.at_level("WARNING"):
        started = start_worker({"MODEL_NAME": str(folder)})
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    try:
        [refused] = run(started.handler, {**chat("Weather?"), "tools": [tool]})
        [answered] = run(started.handler, chat("Hello"))
    finally:
        started.close()
    assert refused["error"].startswith("tools: this model's chat template does not show tools")
    assert answered["usage"]["completion_tokens"] == 3
    assert "could not render a chat with tools (messages: the chat template" in caplog.text
    assert f"did not finish rendering them within {TEMPLATE_TIMEOUT_S:.0f} s" in caplog.text


def test_a_template_s_own_refusal_is_the_job_s_error(tiny_model_dir, tmp_path):
    from worker_transformers.worker import start_worker

    folder = with_template(tiny_model_dir, tmp_path, REFUSES_SYSTEM)
    started = start_worker({"MODEL_NAME": str(folder)})
    try:
        [refused] = run(started.handler, chat("Be brief.", role="system"))
        [answered] = run(started.handler, chat("Hello"))
    finally:
        started.close()
    assert refused == {
        "error": f"messages: the chat template of {folder} refused them: TemplateError: System messages are not "
        "supported"
    }
    assert answered["usage"]["completion_tokens"] == 3


def test_sigterm_stops_a_worker_whose_template_loops_at_the_warm_up(tiny_model_dir, tmp_path):
    folder = with_template(tiny_model_dir, tmp_path, LOOP + CHATML)
    proc = subprocess.Popen(
        [sys.executable, "handler.py", "--test_input", '{"input": {"prompt": "Hi"}}'],
        cwd=ROOT,
        env={**os.environ, "MODEL_NAME": str(folder)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    lines = []
    for line in proc.stdout:  # until the loading is done and the warm-up renders
        lines.append(line)
        if "loaded " in line or time.monotonic() > deadline:
            break
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=TEMPLATE_TIMEOUT_S - 2)
    finally:
        proc.kill()
    assert code == 128 + signal.SIGTERM, "".join(lines)
