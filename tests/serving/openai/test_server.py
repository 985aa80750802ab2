"""The local OpenAI-compatible server, over real HTTP with the real `openai` client, in front of the real handler
and a tiny model whose chat template supports tools (conftest.make_tool_model: it calls get_weather after a
user's turn and answers after the tool's result)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import TOOL_ANSWER, TOOL_CALL, out_of_memory_after_first_step
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_routes import parse


ROOT = Path(__file__).resolve().parents[3]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tool_engine):
    return tool_engine


@pytest.fixture(scope="module")
def base_url(tool_url):
    return tool_url


@pytest.fixture(scope="module")
def client(tool_client):
    return tool_client


@pytest.fixture(scope="module")
def model(tool_model_dir):
    return str(tool_model_dir)


def test_the_client_lists_the_model_on_both_paths(client, base_url, model):
    assert [m.id for m in client.models.list()] == [model]
    plain = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in plain.models.list()] == [model]


def test_a_chat_and_its_stream_say_the_same(client, model):
    whole = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0)
    parse(ChatCompletion, whole.model_dump(exclude_unset=True))
    stream = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content != ""
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_a_completion_and_its_stream_say_the_same(client, model):
    whole = client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0)
    parse(Completion, whole.model_dump(exclude_unset=True))
    chunks = list(
        client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    assert 1 <= whole.usage.completion_tokens <= 5


def test_a_tool_call_round_trip_call_result_answer(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0)
    parse(ChatCompletion, first.model_dump(exclude_unset=True))
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == TOOL_CALL["name"]
    assert json.loads(call.function.arguments) == TOOL_CALL["arguments"]
    assert call.id.startswith("call_")

    conversation = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    final = client.chat.completions.create(model=model, messages=conversation, tools=TOOLS, temperature=0)
    parse(ChatCompletion, final.model_dump(exclude_unset=True))
    assert final.choices[0].message.content == TOOL_ANSWER
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].finish_reason == "stop"


def test_a_streamed_tool_call_comes_as_a_delta_and_no_markup_streams_as_text(client, model):
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="auto", temperature=0, stream=True
    )
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    first, *fragments = [tc for d in deltas for tc in d.tool_calls or []]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert all(f.index == 0 and f.id is None and f.function.name is None for f in fragments)
    arguments = first.function.arguments + "".join(f.function.arguments for f in fragments)
    assert json.loads(arguments) == TOOL_CALL["arguments"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_include_usage_puts_null_usage_on_every_chunk_and_the_usage_on_a_last_chunk_without_choices(base_url, model):
    body = {"model": model, "messages": ASK, "max_tokens": 3, "temperature": 0, "stream": True}
    with_usage = sse(base_url, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" in p and p["usage"] is None for p in with_usage[:-1])
    last = parse(ChatCompletionChunk, with_usage[-1])
    assert last.choices == [] and last.usage.completion_tokens == 3
    without = sse(base_url, body)
    assert all("usage" not in p for p in without) and all(p["choices"] for p in without)


def sse(base_url: str, body: dict) -> list[dict]:
    """The data of a stream's events, checked to end with [DONE]."""
    with httpx.stream("POST", f"{base_url}/openai/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_errors_come_with_openais_status_codes_and_body(client, model):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=ASK, temperature=9)
    assert bad.value.param == "temperature" and "less than or equal to 2" in bad.value.message
    with pytest.raises(openai.BadRequestError) as no_tools:
        client.chat.completions.create(model=model, messages=ASK, tool_choice="required")
    assert no_tools.value.param == "tool_choice"


def test_a_forced_call_on_a_vocabulary_that_cannot_write_json_is_refused_by_name(client, model):
    # This model's word-level vocabulary has no "[" or "{": a required call, forced as JSON, cannot be written.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required")
    assert refused.value.param == "tools" and "no token of this model's vocabulary" in refused.value.message


def test_a_failure_mid_stream_ends_it_with_an_error_event_and_done(base_url, engine, model):
    with out_of_memory_after_first_step(engine):
        events = sse(base_url, {"model": model, "messages": ASK, "max_tokens": 8, "stream": True})
    assert events[-1]["error"]["code"] == "out_of_memory"
    assert events[-1]["error"]["type"] == "server_error"
    assert all("error" not in e for e in events[:-1])


@pytest.mark.slow
def test_the_server_command_serves_the_worker_under_its_served_model_name(tool_model_dir):
    port = free_port()
    env = {
        **os.environ,
        "MODEL_NAME": str(tool_model_dir),
        "SERVED_MODEL_NAME": "my-model",
        "PYTHONPATH": str(ROOT / "src"),
    }
    command = [sys.executable, "-m", "worker_transformers.openai_server", "--port", str(port)]
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                listed = [m.id for m in client.models.list()]
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert listed == ["my-model"]
        reply = client.chat.completions.create(model="my-model", messages=ASK, tools=TOOLS, temperature=0)
        assert reply.model == "my-model" and reply.choices[0].finish_reason == "tool_calls"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=str(tool_model_dir), messages=ASK)
    finally:
        server.terminate()
        server.wait(timeout=30)
