"""Real agent clients over real HTTP: LangChain's ChatOpenAI, the OpenAI Agents SDK (on Chat Completions and on the
Responses API) and the plain `openai` client, against the local OpenAI server in front of the worker's real handler.

The models are scripted (scripted_models.py): tiny Llamas whose next token depends on the last one alone, so a
model answers every prompt that ends in the same token the same way. Their chat template (TEMPLATE below) writes
tool calls in the Hermes markup, which the worker finds on its own (formats.py), and has no generation prompt: a
user's turn ends the prompt with `<|/user|>`, a tool's result with `</tool_response>`, so one model calls the tool
after a question and answers after the tool's result, whatever the client puts before them (instructions, tool
schemas with or without titles, call ids). A ChatML template with an assistant turn to open (the project's own
chatml_tools.jinja) ends both prompts alike, which a last-token model cannot tell apart. Three models: `chat`
answers a question in text, `agent` calls get_weather(city="Paris") after it and answers from the tool's result,
`structured` answers it as Weather JSON (a forced answer: its first piece is the one token the grammar allows
first, the others are tokens the grammar allows where they come).

Every exchange is recorded as the server saw it (request body, and the handler's answer or stream) and checked
with the `openai` package's own types, since the clients hand back their own objects. With WT_TRANSCRIPTS=1 the
exchanges are also written to /tmp/client_transcripts/<client>.json, one file per client.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem
from api_server import openai_server
from conftest import make_tiny_model
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter
from scripted_models import Script, make_scripted_model
from test_routes import parse, sse_payloads

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler
from worker_transformers.worker import setup

TEMPLATE = (
    "{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<tool_response>{{ message.content }}</tool_response>"
    "{% elif message.role == 'assistant' %}{{ message.content or '' }}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>"
    "{% else %}<|{{ message.role }}|>{{ message.content }}<|/{{ message.role }}|>{% endif %}"
    "{% endfor %}"
)
MARKUP = (
    "<tools>",
    "</tools>",
    "<tool_response>",
    "</tool_response>",
    "<|user|>",
    "<|/user|>",
    "<|system|>",
    "<|/system|>",
)

QUESTION = "What is the weather in Paris?"
ASK = [{"role": "user", "content": QUESTION}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_RESULT = "sunny"

CHAT_PIECES = ["Paris", " is the", " capital", " of France."]
# The call in the Hermes markup, cut so that its arguments stream in two fragments.
CALL_PIECES = ["<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}', "</tool_call>"]
CALL_ARGUMENTS = '{"city": "Paris"}'
ANSWER_PIECES = ["It is", " sunny", " in Paris."]
ANSWER = "".join(ANSWER_PIECES)
# Compact JSON, as the grammar writes it; its first piece is the one token the grammar allows first.
STRUCTURED_PIECES = ['{"city":"', "Paris", '","temperature_c":', "21}"]


class Weather(BaseModel):
    """The weather in a city."""

    city: str
    temperature_c: int


CALLED = [
    *ASK,
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": TOOL_RESULT},
]
SCRIPTS = {
    "chat": [Script(ASK, CHAT_PIECES)],
    "agent": [Script(ASK, CALL_PIECES, [WEATHER_TOOL]), Script(CALLED, ANSWER_PIECES, [WEATHER_TOOL])],
    "structured": [Script(ASK, STRUCTURED_PIECES)],
}


class Recorder:
    """Every exchange the servers had, as they saw it: the route, the request body, and what the handler answered
    (one JSON object, or a stream's SSE events as sent), tagged with the test that made it."""

    def __init__(self) -> None:
        self.exchanges: list[dict[str, Any]] = []
        self.test = ""

    def wrap(self, handler, model: str):
        async def recorded(job):
            exchange = {
                "test": self.test,
                "model": model,
                "route": job["input"]["openai_route"],
                "request": copy.deepcopy(job["input"]["openai_input"]),
                "response": [],
            }
            self.exchanges.append(exchange)
            async for item in handler(job):
                exchange["response"].append(item)
                yield item

        return recorded

    def of(self, test: str) -> list[dict[str, Any]]:
        return [e for e in self.exchanges if e["test"] == test]


class _ResponseEvent:
    """ResponseStreamEvent (a union of event types) in the shape test_routes.parse takes."""

    model_validate = staticmethod(TypeAdapter(ResponseStreamEvent).validate_python)


def _sse_events(items: list[str]) -> list[tuple[str | None, Any]]:
    """A stream's events as (event name, data), `[DONE]` left out."""
    events = []
    for item in items:
        name, data = None, None
        for line in item.strip("\n").split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        if data != "[DONE]":
            events.append((name, json.loads(data)))
    return events


def checked(exchange: dict[str, Any]):
    """The exchange's answer, validated with the `openai` package's types (no field left over): a ChatCompletion or
    its chunks, a Response or its stream events."""
    items = exchange["response"]
    if exchange["route"] == "/v1/chat/completions":
        if exchange["request"].get("stream"):
            return [parse(ChatCompletionChunk, payload) for payload in sse_payloads(items)]
        [whole] = items
        return parse(ChatCompletion, whole)
    assert exchange["route"] == "/v1/responses"
    if not exchange["request"].get("stream"):
        [whole] = items
        return parse(Response, whole)
    assert items[-1] == "data: [DONE]\n\n"
    events = _sse_events(items)
    assert all(name == data["type"] for name, data in events)
    return [parse(_ResponseEvent, data) for _, data in events]


@pytest.fixture(scope="module")
def recorder():
    recorder = Recorder()
    yield recorder
    if os.environ.get("WT_TRANSCRIPTS") == "1":
        _write_transcripts(recorder.exchanges, Path("/tmp/client_transcripts"))


def _write_transcripts(exchanges: list[dict[str, Any]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    clients = {"test_langchain": "langchain-openai", "test_agents": "openai-agents", "test_openai": "openai"}
    for prefix, client in clients.items():
        written = []
        for e in exchanges:
            if not e["test"].startswith(prefix):
                continue
            items = e["response"]
            stream = bool(items) and isinstance(items[0], str)
            response = (
                [{"event": n, "data": d} if n else d for n, d in _sse_events(items)] if stream else (items or [None])[0]
            )
            written.append({"test": e["test"], "route": e["route"], "request": e["request"], "stream": stream,
                            "response": response})  # fmt: skip
        if written:
            (folder / f"{client}.json").write_text(json.dumps(written, indent=2, ensure_ascii=False) + "\n")


@pytest.fixture(autouse=True)
def _tag(recorder, request):
    recorder.test = request.node.name
    yield
    recorder.test = ""


@pytest.fixture(scope="module")
def served(tmp_path_factory, recorder):
    """Each scripted model served on its own local server: name -> (base URL, served model name)."""
    root = tmp_path_factory.mktemp("clients")
    base = make_tiny_model(root / "base")
    with ExitStack() as stack:
        urls = {}
        for name, scripts in SCRIPTS.items():
            folder = make_scripted_model(root / name, base, TEMPLATE, scripts, markup=MARKUP)
            settings = Settings.from_env({"MODEL_NAME": str(folder), "MAX_NEW_TOKENS": "32"})
            engine = setup(settings)
            stack.callback(engine.close)
            handler = recorder.wrap(make_handler(engine, settings), name)
            urls[name] = (stack.enter_context(openai_server(handler)), str(folder))
        yield urls


def chat_openai(served, name: str, **options) -> ChatOpenAI:
    url, model = served[name]
    return ChatOpenAI(base_url=f"{url}/openai/v1", api_key="unused", model=model, temperature=0, max_retries=0,
                      **options)  # fmt: skip


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return TOOL_RESULT


# ---------------------------------------------------------------------------------------------- LangChain ChatOpenAI


def test_langchain_invoke_and_stream_give_the_same_answer(served, recorder, request):
    llm = chat_openai(served, "chat")
    answer = llm.invoke(QUESTION)
    assert isinstance(answer, AIMessage)
    assert answer.content == "".join(CHAT_PIECES) and answer.tool_calls == []
    assert answer.response_metadata["finish_reason"] == "stop"
    usage = answer.usage_metadata
    assert usage["output_tokens"] == len(CHAT_PIECES) + 1  # the pieces and the end of the turn
    assert usage["input_tokens"] + usage["output_tokens"] == usage["total_tokens"]

    chunks = list(llm.stream(QUESTION))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert [c.content for c in chunks if c.content] == CHAT_PIECES
    total = sum(chunks[1:], chunks[0])
    assert total.content == answer.content
    assert total.response_metadata["finish_reason"] == "stop"

    whole, stream = recorder.of(request.node.name)
    assert whole["request"]["messages"] == ASK and whole["request"]["temperature"] == 0
    assert stream["request"]["stream"] is True
    assert checked(whole).choices[0].message.content == answer.content
    assert "".join(c.choices[0].delta.content or "" for c in checked(stream) if c.choices) == answer.content


def test_langchain_bound_tool_round_trip_call_result_answer(served, recorder, request):
    llm = chat_openai(served, "agent").bind_tools([get_weather])
    question = HumanMessage(QUESTION)
    called = llm.invoke([question])
    assert called.content == "" and called.response_metadata["finish_reason"] == "tool_calls"
    [call] = called.tool_calls
    assert call == {"name": "get_weather", "args": {"city": "Paris"}, "id": call["id"], "type": "tool_call"}
    assert call["id"].startswith("call_") and called.invalid_tool_calls == []

    result = get_weather.invoke(call)  # the tool run on the call: a ToolMessage that answers it
    assert isinstance(result, ToolMessage) and (result.content, result.tool_call_id) == (TOOL_RESULT, call["id"])
    answer = llm.invoke([question, called, result])
    assert answer.content == ANSWER and answer.tool_calls == []
    assert answer.response_metadata["finish_reason"] == "stop"

    first, second = recorder.of(request.node.name)
    [tool_schema] = first["request"]["tools"]
    assert tool_schema["function"]["name"] == "get_weather"
    assert checked(first).choices[0].message.tool_calls[0].function.arguments == CALL_ARGUMENTS
    sent_call, sent_result = second["request"]["messages"][1:]
    assert sent_call["role"] == "assistant"
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in sent_call["tool_calls"]
    ] == [(call["id"], "get_weather", {"city": "Paris"})]
    assert sent_result == {"role": "tool", "tool_call_id": call["id"], "content": TOOL_RESULT}
    assert checked(second).choices[0].message.content == ANSWER


def test_langchain_streamed_tool_call_chunks_add_up_and_the_answer_streams(served, recorder, request):
    llm = chat_openai(served, "agent").bind_tools([get_weather])
    question = HumanMessage(QUESTION)
    chunks = list(llm.stream([question]))
    pieces = [piece for c in chunks for piece in c.tool_call_chunks]
    head, *fragments = pieces
    assert (head["name"], head["index"]) == ("get_weather", 0) and head["id"].startswith("call_")
    assert all(f["name"] is None and f["id"] is None and f["index"] == 0 for f in fragments)
    assert len([f for f in fragments if f["args"]]) >= 2, "the arguments came whole, not as they were written"
    assert head["args"] + "".join(f["args"] for f in fragments) == CALL_ARGUMENTS
    called = sum(chunks[1:], chunks[0])
    assert called.content == ""
    assert called.tool_calls == [
        {"name": "get_weather", "args": {"city": "Paris"}, "id": head["id"], "type": "tool_call"}
    ]
    assert called.response_metadata["finish_reason"] == "tool_calls"

    result = get_weather.invoke(called.tool_calls[0])
    chunks = list(llm.stream([question, called, result]))
    assert [c.content for c in chunks if c.content] == ANSWER_PIECES
    assert sum(chunks[1:], chunks[0]).tool_calls == []

    first, second = recorder.of(request.node.name)
    assert checked(first)[-1].choices[0].finish_reason == "tool_calls"
    assert second["request"]["messages"][1]["tool_calls"][0]["id"] == head["id"]
    assert checked(second)[-1].choices[0].finish_reason == "stop"


def test_langchain_structured_output_by_default_is_a_json_schema_response_format(served, recorder, request):
    weather = chat_openai(served, "structured").with_structured_output(Weather).invoke(QUESTION)
    assert weather == Weather(city="Paris", temperature_c=21)

    [exchange] = recorder.of(request.node.name)
    body = exchange["request"]
    assert "tools" not in body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "Weather"
    assert checked(exchange).choices[0].message.content == "".join(STRUCTURED_PIECES)


def test_langchain_structured_output_by_function_calling(served, recorder, request):
    """method="function_calling" forces a call of the schema's function by name, with parallel_tool_calls false (one
    call): the worker's grammar writes its arguments."""
    weather = (
        chat_openai(served, "structured").with_structured_output(Weather, method="function_calling").invoke(QUESTION)
    )
    assert weather == Weather(city="Paris", temperature_c=21)

    [exchange] = recorder.of(request.node.name)
    body = exchange["request"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "Weather"}}
    assert body["parallel_tool_calls"] is False and "response_format" not in body
    [call] = checked(exchange).choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("Weather", "".join(STRUCTURED_PIECES))


# ----------------------------------------------------------------------------------------------- OpenAI Agents SDK


def weather_agent(served, model_class, calls: list[str]) -> Agent:
    url, model = served["agent"]

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return TOOL_RESULT

    set_tracing_disabled(True)  # no trace is sent anywhere
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0)
    return Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        tools=[get_weather],
        model=model_class(model=model, openai_client=client),
        model_settings=ModelSettings(temperature=0),
    )


def check_run_items(items, call_name: str = "get_weather") -> None:
    assert [type(item) for item in items] == [ToolCallItem, ToolCallOutputItem, MessageOutputItem]
    call, output, message = items
    raw = call.raw_item if isinstance(call.raw_item, dict) else call.raw_item.model_dump()
    assert (raw["name"], json.loads(raw["arguments"])) == (call_name, {"city": "Paris"})
    assert output.output == TOOL_RESULT
    [part] = message.raw_item.content
    assert part.text == ANSWER


async def _streamed(agent: Agent):
    """Run the agent streamed: its result, the names of its run-item events, the text and arguments deltas."""
    result = Runner.run_streamed(agent, QUESTION)
    names, text, arguments = [], [], []
    async for event in result.stream_events():
        if event.type == "run_item_stream_event":
            names.append(event.name)
        elif event.type == "raw_response_event":
            if event.data.type == "response.output_text.delta":
                text.append(event.data.delta)
            elif event.data.type == "response.function_call_arguments.delta":
                arguments.append(event.data.delta)
    return result, names, text, arguments


def test_agents_chat_completions_run_calls_the_tool_and_answers(served, recorder, request):
    calls: list[str] = []
    agent = weather_agent(served, OpenAIChatCompletionsModel, calls)
    result = asyncio.run(Runner.run(agent, QUESTION))
    assert result.final_output == ANSWER
    assert calls == ["Paris"]
    check_run_items(result.new_items)

    first, second = recorder.of(request.node.name)
    assert first["route"] == second["route"] == "/v1/chat/completions"
    assert first["request"]["messages"] == [{"role": "system", "content": "Answer questions about the weather."}, *ASK]
    [call] = checked(first).choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", CALL_ARGUMENTS)
    assert second["request"]["messages"][-1] == {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}
    assert checked(second).choices[0].message.content == ANSWER


def check_streamed_run(served, model_class) -> None:
    """Runner.run_streamed of the weather agent on `model_class`: the tool called once, the run's events in order,
    and the call's argument deltas and the answer's text deltas as the model wrote them."""
    calls: list[str] = []
    agent = weather_agent(served, model_class, calls)
    result, names, text, arguments = asyncio.run(_streamed(agent))
    assert result.final_output == ANSWER and calls == ["Paris"]
    assert names == ["tool_called", "tool_output", "message_output_created"]
    assert "".join(arguments) == CALL_ARGUMENTS
    assert text == ANSWER_PIECES
    check_run_items(result.new_items)


def test_agents_chat_completions_run_streamed(served, recorder, request):
    check_streamed_run(served, OpenAIChatCompletionsModel)

    first, second = recorder.of(request.node.name)
    assert first["request"]["stream"] is True and second["request"]["stream"] is True
    assert checked(first)[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in checked(second) if c.choices) == ANSWER


def test_agents_responses_run_calls_the_tool_and_answers(served, recorder, request):
    calls: list[str] = []
    agent = weather_agent(served, OpenAIResponsesModel, calls)
    result = asyncio.run(Runner.run(agent, QUESTION))
    assert result.final_output == ANSWER and calls == ["Paris"]
    check_run_items(result.new_items)

    first, second = recorder.of(request.node.name)
    assert first["route"] == second["route"] == "/v1/responses"
    assert first["request"]["input"] == [{"role": "user", "content": QUESTION}]
    [call] = checked(first).output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", CALL_ARGUMENTS)
    sent = [item for item in second["request"]["input"] if item.get("type") == "function_call_output"]
    assert sent == [{"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}]
    answer = checked(second)
    assert answer.status == "completed" and answer.output_text == ANSWER


def test_agents_responses_run_streamed(served, recorder, request):
    check_streamed_run(served, OpenAIResponsesModel)

    first, second = recorder.of(request.node.name)
    assert first["route"] == second["route"] == "/v1/responses"
    assert first["request"]["instructions"] == "Answer questions about the weather."
    done = checked(first)[-1]
    assert done.type == "response.completed"
    [call] = done.response.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", CALL_ARGUMENTS)
    sent = [item for item in second["request"]["input"] if item.get("type") == "function_call_output"]
    assert sent == [{"type": "function_call_output", "call_id": call.call_id, "output": TOOL_RESULT}]
    done = checked(second)[-1]
    assert done.type == "response.completed" and done.response.output_text == ANSWER


# ------------------------------------------------------------------------------------------------ the openai client


def test_openai_streamed_round_trip_through_the_hermes_format(served, recorder, request):
    """The call streamed, the assistant message rebuilt from its deltas as an agent loop does, the tool's result
    sent back, and the answer streamed: tool_choice auto, read by the Hermes format found in the template (the
    unstreamed round trip is in test_server.py, on a model with its own response template)."""
    url, model = served["agent"]
    client = openai.OpenAI(base_url=f"{url}/openai/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER_TOOL], tool_choice="auto", temperature=0, stream=True
    )
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in stream]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert {d.index for d in deltas} == {0}
    call_id, name = deltas[0].id, deltas[0].function.name
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert (name, arguments) == ("get_weather", CALL_ARGUMENTS) and call_id.startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    conversation = [
        *ASK,
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT},
    ]  # fmt: skip
    stream = client.chat.completions.create(
        model=model, messages=conversation, tools=[WEATHER_TOOL], temperature=0, stream=True
    )
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in stream]
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == ANSWER_PIECES
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [e["request"]["messages"] for e in recorder.of(request.node.name)] == [ASK, conversation]
