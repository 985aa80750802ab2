"""OpenAI-compatible jobs, checked with the `openai` package's own response types (not by hand)."""

import asyncio
import json

import pytest
from openai.types import Completion, ErrorObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from worker_transformers.serving.handlers import make_handler


@pytest.fixture(scope="module")
def handler(tiny_engine, tiny_settings):
    return make_handler(tiny_engine, tiny_settings)  # MAX_NEW_TOKENS=64


@pytest.fixture(scope="module")
def model(tiny_model_name):
    return tiny_model_name


def run(handler, route, body):
    async def collect():
        return [item async for item in handler({"id": "t", "input": {"openai_route": route, "openai_input": body}})]

    return asyncio.run(collect())


def parse(cls: type[BaseModel], data):
    """Validate with the openai type and insist that nothing was left over as an unknown field."""
    parsed = cls.model_validate(data)

    def no_extras(obj):
        if isinstance(obj, BaseModel):
            assert not obj.model_extra, f"{type(obj).__name__} has unexpected fields {obj.model_extra}"
            for value in obj.__dict__.values():
                no_extras(value)
        elif isinstance(obj, list):
            for item in obj:
                no_extras(item)

    no_extras(parsed)
    return parsed


def sse_payloads(chunks):
    assert all(isinstance(c, str) and c.startswith("data: ") and c.endswith("\n\n") for c in chunks)
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(c[len("data: ") :]) for c in chunks[:-1]]


def openai_error(items) -> ErrorObject:
    [item] = items
    assert set(item) == {"error"} and isinstance(item["error"], str)
    body = json.loads(item["error"])
    assert set(body) == {"error"}
    return parse(ErrorObject, body["error"])


CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}


def test_models_lists_the_served_model(handler, model):
    [listing] = run(handler, "/v1/models", {})
    assert listing["object"] == "list"
    [entry] = [parse(Model, m) for m in listing["data"]]
    assert entry.id == model


def test_chat_completion_is_an_openai_chat_completion(handler, model):
    [body] = run(handler, "/v1/chat/completions", {"model": model, "max_tokens": 8, **CHAT})
    completion = parse(ChatCompletion, body)
    assert completion.object == "chat.completion" and completion.model == model
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8

    async def native():
        return [o async for o in handler({"id": "n", "input": {**CHAT, "max_new_tokens": 8}})]

    [same_job] = asyncio.run(native())
    assert choice.message.content == same_job["text"]
    assert completion.usage.prompt_tokens == same_job["usage"]["prompt_tokens"]


def test_chat_stream_is_openai_chunks_that_add_up_to_the_whole_answer(handler, model):
    [whole] = run(handler, "/v1/chat/completions", {"model": model, "max_tokens": 10, **CHAT})
    chunks = run(
        handler,
        "/v1/chat/completions",
        {"model": model, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}, **CHAT},
    )
    parsed = [parse(ChatCompletionChunk, p) for p in sse_payloads(chunks)]
    assert parsed[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
    assert text == whole["choices"][0]["message"]["content"]
    finishing = [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 10
    assert len({c.id for c in parsed}) == 1


def test_completion_uses_openais_default_of_16_tokens(handler, model):
    [body] = run(handler, "/v1/completions", {"model": model, "prompt": "Hello world", "temperature": 0})
    completion = parse(Completion, body)
    assert completion.object == "text_completion"
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_completion_stream_is_sse_of_text_completion_objects(handler, model):
    body = {"model": model, "prompt": "Hello world", "temperature": 0, "max_tokens": 6}
    [whole] = run(handler, "/v1/completions", body)
    payloads = sse_payloads(run(handler, "/v1/completions", {**body, "stream": True}))
    # OpenAI streams finish_reason null until the last chunk, which its strict type does not admit: the
    # client reads chunks leniently (see the client tests below); the last one must pass strictly.
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
    last = parse(Completion, payloads[-1])
    assert last.choices[0].finish_reason == "length"
    assert "".join(p["choices"][0]["text"] for p in payloads) == whole["choices"][0]["text"]


def test_stop_as_a_string_and_text_parts_are_accepted(handler, model):
    body = {
        "model": model,
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, CHAT["messages"][0]],
        "stop": "zzz",
        "max_completion_tokens": 4,
        "temperature": 0,
    }
    completion = parse(ChatCompletion, run(handler, "/v1/chat/completions", body)[0])
    assert completion.usage.completion_tokens <= 4


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        ("/v1/embeddings", {}, "openai_route", "unknown route '/v1/embeddings'"),
        ("/v1/chat/completions", None, "openai_input", "expected a JSON object"),
        ("/v1/chat/completions", {"messages": CHAT["messages"]}, "model", "Field required"),
        ("/v1/chat/completions", {"temperature": 5}, "temperature", "less than or equal to 2"),
        ("/v1/chat/completions", {"n": 17}, "n", "less than or equal to 16"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "send logprobs true too"),
        ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools", "tools.0.function: Field required"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "send tools to choose from"),
        ("/v1/chat/completions", {"frequency_penalty": 2.5}, "frequency_penalty", "less than or equal to 2"),
        ("/v1/chat/completions", {"logit_bias": {"hello": 1}}, "logit_bias", "hello is not a token id"),
        ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias", "token 5: 101 is outside -100 to 100"),
        ("/v1/chat/completions", {"logit_bias": {"99999999": 1}}, "logit_bias", "not in this model's vocabulary"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema"}},
            "response_format",
            "send json_schema exactly when type is 'json_schema'",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
            "response_format.json_schema.schema: the schema cannot be enforced",
        ),
        ("/v1/chat/completions", {"max_tokens": 100000}, "max_tokens", "more than MAX_NEW_TOKENS=64"),
        ("/v1/chat/completions", {"temprature": 0.5}, "temprature", "Extra inputs are not permitted"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages",
            "messages.0.content",
        ),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt", "lists of prompts are not supported"),
        ("/v1/completions", {"echo": True}, "echo", "not supported"),
    ],
)
def test_a_bad_request_gets_an_openai_error_naming_the_parameter(handler, model, route, body, param, says):
    if isinstance(body, dict):
        defaults = {"model": model, **CHAT} if route == "/v1/chat/completions" else {"model": model, "prompt": "x"}
        body = {**defaults, **body}
        body = {k: v for k, v in body.items() if not (param == "model" and k == "model")}
    error = openai_error(run(handler, route, body))
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert says in error.message


def test_a_request_for_another_model_is_refused(handler):
    error = openai_error(run(handler, "/v1/chat/completions", {"model": "gpt-4o", **CHAT}))
    assert (error.param, error.code) == ("model", "model_not_found")
    assert "'gpt-4o' is not served here" in error.message


# The real openai client, talking to the handler through an in-process transport that does what RunPod's
# OpenAI proxy does: the request becomes a job {"openai_route", "openai_input"}; a failed job becomes an HTTP
# error with the job's error text as its body; a stream's SSE strings become the response body.


@pytest.fixture(scope="module")
def client(handler):
    import httpx
    import openai

    def proxy(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        job_input = {"openai_route": request.url.path, "openai_input": body}

        async def collect():
            return [item async for item in handler({"id": "proxy", "input": job_input})]

        items = asyncio.run(collect())
        if len(items) == 1 and isinstance(items[0], dict) and "error" in items[0]:
            return httpx.Response(400, content=items[0]["error"], headers={"content-type": "application/json"})
        if body.get("stream"):
            return httpx.Response(200, content="".join(items), headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=items[0])

    return openai.OpenAI(
        base_url="http://worker.test/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.MockTransport(proxy)),
    )


def test_the_openai_client_lists_models(client, model):
    assert [m.id for m in client.models.list()] == [model]


def test_the_openai_client_reads_a_chat_completion_and_its_stream(client, model):
    whole = client.chat.completions.create(model=model, max_tokens=8, **CHAT)
    stream = client.chat.completions.create(model=model, max_tokens=8, stream=True, **CHAT)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8


def test_the_openai_client_reads_a_completion_stream(client, model):
    whole = client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0)
    chunks = list(
        client.completions.create(model=model, prompt="Hello world", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_openai_client_raises_a_bad_request_error_with_the_parameter(client, model):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=model, temperature=7, **{k: v for k, v in CHAT.items() if k != "temperature"}
        )
    assert caught.value.param == "temperature"
    assert "less than or equal to 2" in caught.value.message
