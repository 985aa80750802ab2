"""OpenAI's Responses API (/v1/responses) over real HTTP with the real `openai` client, in front of the real handler:
the tiny tool-calling model (conftest.make_tool_model: it calls get_weather after a user's turn and answers after
the tool's result), a thinking model for reasoning items, and the default model for JSON and forced calls. Every
object is checked with the `openai` package's own types, and every stream event too."""

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from api_server import served_model
from conftest import TOOL_ANSWER, TOOL_CALL, make_tiny_model, out_of_memory_after_first_step
from openai.types.chat import ChatCompletion
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter
from scripted_models import Script, make_scripted_model
from test_routes import parse
from test_tool_streams import REASONING, THINKING_TEMPLATE

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]
ASK = "What is the weather in Paris?"
ROOT = Path(__file__).resolve().parents[3]
EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def model(tool_model_dir):
    return str(tool_model_dir)


def whole(client, **body) -> Response:
    """A Response, checked to hold no field the openai type does not know."""
    return parse(Response, client.responses.create(**body).model_dump(by_alias=True, exclude_unset=True))


def stream_events(base_url: str, body: dict) -> list[BaseModel]:
    """A stream's events over raw HTTP, each checked: its `event:` line names its type, it is an openai stream event
    with no unknown field, the sequence numbers count from 0, and `data: [DONE]` ends it."""
    with httpx.stream("POST", f"{base_url}/openai/v1/responses", json={**body, "stream": True}, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        blocks = [block for block in reply.read().decode().split("\n\n") if block]
    assert blocks[-1] == "data: [DONE]"
    events = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        assert data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        events.append(parse(type(EVENT.validate_python(payload)), payload))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    return events


def deltas(events: list[BaseModel], kind: str) -> str:
    return "".join(event.delta for event in events if event.type == kind)


def test_a_string_input_is_one_message_whole_and_streamed_alike(tool_client, tool_url, model):
    reply = whole(tool_client, model=model, input="Hello", temperature=0)
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.status == "completed"
    [message] = reply.output
    assert message.type == "message" and message.id.startswith("msg_") and message.status == "completed"
    assert reply.output_text == message.content[0].text != ""
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.model == model and reply.tools == [] and reply.tool_choice == "auto"

    events = stream_events(tool_url, {"model": model, "input": "Hello", "temperature": 0})
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert deltas(events, "response.output_text.delta") == events[-4].text == reply.output_text
    final = events[-1].response
    assert final.output_text == reply.output_text and final.usage == reply.usage
    assert final.output[0].id == events[2].item.id == events[-2].item.id
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1


def test_the_openai_clients_stream_helpers_read_the_stream(tool_client, model):
    reply = tool_client.responses.create(model=model, input="Hello", temperature=0)
    with tool_client.responses.stream(model=model, input="Hello", temperature=0) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == reply.output_text and final.status == "completed"
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    raw = list(tool_client.responses.create(model=model, input="Hello", temperature=0, stream=True))
    assert [event.type for event in raw] == kinds


def test_instructions_and_input_items_become_the_chat_a_chat_completion_would_send(tool_client, model):
    """The same conversation, as Responses items and as chat messages, makes the same prompt and the same answer."""
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": " there"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"role": "user", "content": "Weather?"},
    ]
    messages = [
        {"role": "system", "content": "Answer in English."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Weather?"},
    ]
    reply = whole(tool_client, model=model, instructions="Answer in English.", input=items, temperature=0)
    chat = tool_client.chat.completions.create(model=model, messages=messages, temperature=0)
    assert reply.instructions == "Answer in English."
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.output_text == chat.choices[0].message.content
    bare = whole(tool_client, model=model, input="Weather?", temperature=0)
    assert bare.usage.input_tokens < reply.usage.input_tokens


def test_a_function_tool_round_trip_call_output_answer(tool_client, model):
    first = whole(tool_client, model=model, input=ASK, tools=TOOLS, temperature=0)
    [call] = first.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name == TOOL_CALL["name"] and json.loads(call.arguments) == TOOL_CALL["arguments"]
    assert first.output_text == "" and first.tools[0].name == "get_weather"

    # The agent loop: the call as the output gave it, then its result.
    conversation = [
        {"role": "user", "content": ASK},
        *(item.model_dump(exclude_none=True) for item in first.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'},
    ]
    final = whole(tool_client, model=model, input=conversation, tools=TOOLS, temperature=0)
    [message] = final.output
    assert message.type == "message" and final.output_text == TOOL_ANSWER and final.status == "completed"


def test_a_streamed_function_call_adds_up_to_the_whole_one(tool_client, tool_url, model):
    reply = whole(tool_client, model=model, input=ASK, tools=TOOLS, tool_choice="auto", temperature=0)
    events = stream_events(tool_url, {"model": model, "input": ASK, "tools": TOOLS, "temperature": 0})
    kinds = [event.type for event in events]
    assert "response.output_text.delta" not in kinds and "response.content_part.added" not in kinds
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert deltas(events, "response.function_call_arguments.delta") == done.arguments == reply.output[0].arguments
    [added] = [event.item for event in events if event.type == "response.output_item.added"]
    [finished] = [event.item for event in events if event.type == "response.output_item.done"]
    assert added.arguments == "" and added.status == "in_progress"
    assert (finished.id, finished.call_id, finished.name) == (added.id, added.call_id, "get_weather")
    assert finished.status == "completed" and events[-1].response.output == [finished]


def test_tool_choice_none_answers_in_text(tool_client, model):
    reply = whole(tool_client, model=model, input=ASK, tools=TOOLS, tool_choice="none", temperature=0)
    assert [item.type for item in reply.output] == ["message"] and reply.tool_choice == "none"


def test_max_output_tokens_cuts_the_answer_short_as_incomplete(tool_client, tool_url, model):
    reply = whole(tool_client, model=model, input="Hello", max_output_tokens=2, temperature=0)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 2 and reply.max_output_tokens == 2
    assert reply.output[0].status == "incomplete"
    events = stream_events(tool_url, {"model": model, "input": "Hello", "max_output_tokens": 2, "temperature": 0})
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.output_text == reply.output_text


@pytest.mark.parametrize(
    ("field", "sent", "says"),
    [
        ("previous_response_id", {"previous_response_id": "resp_123"}, "send the whole conversation in input"),
        ("conversation", {"conversation": "conv_123"}, "send the whole conversation in input"),
        ("store", {"store": True}, "stores nothing"),
        ("background", {"background": True}, "background false"),
        ("prompt", {"prompt": {"id": "pmpt_123"}}, "send instructions and input"),
        ("include", {"include": ["message.output_text.logprobs"]}, "'message.output_text.logprobs' is not served"),
        ("truncation", {"truncation": "auto"}, "send 'disabled'"),
        ("tools", {"tools": [{"type": "web_search"}]}, "tools.0.type: 'web_search' is not served here"),
        ("tool_choice", {"tools": TOOLS, "tool_choice": {"type": "file_search"}}, "'file_search' is not served"),
        ("input", {"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type: 'item_reference' items"),
        ("seed", {"extra_body": {"seed": 1}}, "Extra inputs are not permitted"),
    ],
)
def test_what_this_worker_cannot_honour_is_refused_by_name(tool_client, model, field, sent, says):
    body = {"model": model, "input": "Hello", **sent}
    with pytest.raises(openai.BadRequestError) as refused:
        tool_client.responses.create(**body)
    assert refused.value.status_code == 400 and refused.value.param == field
    assert refused.value.body["type"] == "invalid_request_error" and says in refused.value.message


def test_what_clients_send_by_default_and_changes_nothing_here_is_taken(tool_client, model):
    """Agent clients that keep no state ask for the reasoning they must send back (`include`), and hint at a cache
    key: the reasoning items carry it as text already, and one worker answers the same without the hint."""
    plain = whole(tool_client, model=model, input="Hello", max_output_tokens=4, temperature=0)
    hinted = whole(
        tool_client, model=model, input="Hello", max_output_tokens=4, temperature=0,
        include=["reasoning.encrypted_content"], prompt_cache_key="conversation-1",
    )  # fmt: skip
    assert hinted.status == "completed" and hinted.output_text == plain.output_text


def test_problems_are_named_by_the_responses_fields(tool_client, model):
    def refused(**body) -> tuple[str, str]:
        """The param and the message of the error a request gets."""
        with pytest.raises(openai.BadRequestError) as caught:
            tool_client.responses.create(model=model, **body)
        return caught.value.param, caught.value.body["message"]

    param, message = refused(
        input=[{"role": "user", "content": "Hi"}, {"type": "function_call", "name": "get_weather"}]
    )
    assert param == "input" and message.startswith("input.1.call_id: Field required")
    bad_json = [{"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{"}]
    assert refused(input=bad_json)[1].startswith("input.0.arguments: not valid JSON")
    image = {"type": "input_image", "image_url": "https://example.com/cat.png"}
    _, message = refused(input=[{"role": "system", "content": [image]}])
    assert message.startswith("input.0.content.0.type: input_image parts are taken only in user messages")
    param, message = refused(input="Hi", max_output_tokens=1000)
    assert param == "max_output_tokens" and message.startswith("max_output_tokens: ") and "MAX_NEW_TOKENS=32" in message
    # The chat path's finding, named as this body names the field: this vocabulary cannot begin a JSON object.
    schema = {"type": "json_schema", "name": "capital", "schema": {"type": "object"}}
    param, message = refused(input="Hi", text={"format": schema})
    assert param == "text" and message.startswith("text.format.schema: ")
    param, message = refused(input="Hi", reasoning={"effort": "low"})
    assert param == "reasoning" and message.startswith("reasoning.effort: the chat template")
    # The image is the second part of the first input item, the second message after the instructions'.
    look = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"}, image]}]
    param, message = refused(instructions="Be brief.", input=look)
    assert param == "input" and message.startswith("input.0.content.1")
    with pytest.raises(openai.NotFoundError) as elsewhere:
        tool_client.responses.create(model="gpt-4o", input="Hi")
    assert elsewhere.value.code == "model_not_found"


def test_a_failure_mid_stream_sends_an_error_event_then_response_failed(tool_engine, tool_url, model):
    with out_of_memory_after_first_step(tool_engine):
        events = stream_events(tool_url, {"model": model, "input": "Hello", "max_output_tokens": 8})
    error, failed = events[-2:]
    assert error.type == "error" and error.code == "out_of_memory"
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.code == "server_error" and failed.response.error.message == error.message
    assert not any(event.type in ("response.completed", "error") for event in events[:-2])


def test_the_runpod_job_form_answers_through_the_handler(tool_engine, model):
    handler = make_handler(tool_engine, Settings.from_env({"MODEL_NAME": model, "MAX_NEW_TOKENS": "32"}))

    def run(body):
        job = {"id": "t", "input": {"openai_route": "/v1/responses", "openai_input": body}}

        async def collect():
            return [item async for item in handler(job)]

        return asyncio.run(collect())

    [reply] = run({"model": model, "input": ASK, "tools": TOOLS, "temperature": 0})
    assert parse(Response, reply).output[0].type == "function_call"
    chunks = run({"model": model, "input": "Hello", "temperature": 0, "stream": True})
    assert chunks[-1] == "data: [DONE]\n\n"
    assert all(chunk.startswith("event: response.") and chunk.endswith("\n\n") for chunk in chunks[:-1])
    last = json.loads(chunks[-2].split("\ndata: ", 1)[1])
    assert parse(Response, last["response"]).status == "completed"
    [refused] = run({"model": model, "input": "Hello", "store": True})
    error = json.loads(refused["error"])["error"]
    assert (error["param"], error["type"]) == ("store", "invalid_request_error")


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A thinking model (test_tool_streams' script): its reasoning, then "It is sunny."."""
    folder = tmp_path_factory.mktemp("thinker")
    ask = [{"role": "user", "content": ASK}]
    make_scripted_model(folder, make_tiny_model(folder / "base"), THINKING_TEMPLATE, [Script(ask, REASONING)])
    with served_model(folder) as served:
        yield served.client, served.url, served.model


def test_reasoning_comes_as_a_reasoning_item_before_the_message_whole_and_streamed(thinker):
    client, url, model = thinker
    reply = whole(client, model=model, input=ASK, temperature=0)
    reasoning, message = reply.output
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert reasoning.content[0].type == "reasoning_text"
    assert reasoning.content[0].text.strip() == "I should look outside."
    assert message.type == "message" and reply.output_text.strip() == "It is sunny."

    events = stream_events(url, {"model": model, "input": ASK, "temperature": 0})
    [thought] = [event for event in events if event.type == "response.reasoning_text.done"]
    assert deltas(events, "response.reasoning_text.delta") == thought.text == reasoning.content[0].text
    assert deltas(events, "response.output_text.delta") == reply.output_text
    indexes = [event.output_index for event in events if event.type == "response.output_item.added"]
    assert indexes == [0, 1]

    # The reasoning item sent back with the answer, as agent loops replay the output, is taken.
    replayed = [{"role": "user", "content": ASK}, *(item.model_dump(exclude_none=True) for item in reply.output)]
    again = whole(client, model=model, input=[*replayed, {"role": "user", "content": "And tomorrow?"}], temperature=0)
    assert again.status == "completed"


# The default model, with the project's tool-aware ChatML template: JSON answers and forced calls.
@pytest.fixture(scope="module")
def smol(default_model_path):
    template = ROOT / "builder" / "chat_templates" / "chatml_tools.jinja"
    env = {"SERVED_MODEL_NAME": "smol", "DTYPE": "float32", "MAX_NEW_TOKENS": "64", "CHAT_TEMPLATE": str(template)}
    with served_model(default_model_path, **env) as served:
        yield served.client


class Capital(BaseModel):
    country: str
    capital: str


def test_a_json_schema_text_format_answers_json_under_the_schema(smol):
    schema = {**Capital.model_json_schema(), "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}}
    question = "What is the capital of France? Answer in JSON."
    reply = whole(smol, model="smol", input=question, text=text, max_output_tokens=48, temperature=0)
    assert reply.status == "completed" and reply.text.format.type == "json_schema"
    jsonschema.validate(json.loads(reply.output_text), schema)
    parsed = smol.responses.parse(
        model="smol", input=question, text_format=Capital, max_output_tokens=48, temperature=0
    )
    assert isinstance(parsed.output_parsed, Capital)


def test_a_named_tool_choice_forces_a_call_of_that_function(smol):
    choice = {"type": "function", "name": "get_weather"}
    reply = whole(smol, model="smol", input="Is it raining in Oslo?", tools=TOOLS, tool_choice=choice, temperature=0)
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["parameters"])
    assert reply.tool_choice.name == "get_weather"
    chat = smol.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Is it raining in Oslo?"}],
        tools=[{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    parse(ChatCompletion, chat.model_dump(exclude_unset=True))
    assert chat.choices[0].message.tool_calls[0].function.arguments == call.arguments


def test_an_openai_agents_agent_calls_its_tool_and_answers_whole_and_streamed(tool_url, model):
    """The openai-agents SDK's own Responses model runs its loop against this worker: the call, the tool's result
    sent back as items, the answer."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces go to OpenAI

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    def agent() -> Agent:  # a client per event loop: an async client is bound to the loop that first used it
        client = openai.AsyncOpenAI(base_url=f"{tool_url}/openai/v1", api_key="unused", max_retries=0)
        responses = OpenAIResponsesModel(model=model, openai_client=client)
        return Agent(
            name="weather", instructions="Answer questions about the weather.", tools=[get_weather], model=responses
        )

    async def streamed() -> str:
        run = Runner.run_streamed(agent(), ASK)
        kinds = [event.type async for event in run.stream_events()]
        assert "raw_response_event" in kinds
        return run.final_output

    assert Runner.run_sync(agent(), ASK).final_output == TOOL_ANSWER
    assert asyncio.run(streamed()) == TOOL_ANSWER
