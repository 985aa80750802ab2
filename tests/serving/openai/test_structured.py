"""Structured output, forced tool calls, logprobs and n choices, over real HTTP with the real `openai` client,
against the local server in front of the real handler and the default model (float32, so that log-probabilities
can be checked against a forward pass of the same ids), with the tool-aware ChatML template the Hub tests use."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from test_routes import parse
from test_server import free_port

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler
from worker_transformers.serving.openai.server import make_app
from worker_transformers.worker import setup

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "builder" / "chat_templates" / "chatml_tools.jinja"
CAPITAL = {
    "type": "object",
    "properties": {"country": {"type": "string", "maxLength": 40}, "capital": {"type": "string", "maxLength": 40}},
    "required": ["country", "capital"],
    "additionalProperties": False,
}
LANDMARK = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "height_m": {"type": "integer", "maximum": 10000}},
    "required": ["name", "height_m"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def json_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def served(default_model_path):
    import uvicorn

    env = {
        "MODEL_NAME": str(default_model_path),
        "SERVED_MODEL_NAME": "smol",
        "DTYPE": "float32",
        "MAX_NEW_TOKENS": "64",
        "CHAT_TEMPLATE": str(TEMPLATE),
    }
    settings = Settings.from_env(env)
    engine = setup(settings)
    port = free_port()
    app = make_app(make_handler(engine, settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield engine, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key="unused", max_retries=0)
    server.should_exit = True
    thread.join()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return served[1]


def test_a_json_schema_answer_parses_and_validates_whole_and_streamed(client):
    body = {
        "model": "smol",
        "messages": ask("What is the capital of France? Answer in JSON."),
        "response_format": json_format("capital", CAPITAL),
        "temperature": 0,
    }
    whole = client.chat.completions.create(**body)
    parse(ChatCompletion, whole.model_dump(exclude_unset=True))
    answer = json.loads(whole.choices[0].message.content)
    jsonschema.validate(answer, CAPITAL)
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**body, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_two_concurrent_requests_with_different_schemas_each_get_their_own(served, client):
    engine, _ = served
    requests = [
        ("What is the capital of France? Answer in JSON.", CAPITAL),
        ("Describe the Eiffel Tower in JSON.", LANDMARK),
    ] * 2
    engine.generation.engine.peak_batch = 0

    def one(request):
        question, schema = request
        return client.chat.completions.create(
            model="smol", messages=ask(question), response_format=json_format("a", schema), temperature=0
        )

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(one, requests))
    assert engine.generation.engine.peak_batch >= 2, "the requests were not decoded together"
    for (_, schema), answer in zip(requests, answers):
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_json_object_is_an_object(client):
    answer = client.chat.completions.create(
        model="smol",
        messages=ask("Give me a JSON object about a cat."),
        response_format={"type": "json_object"},
        max_tokens=64,
        temperature=0,
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # the model went on past max_tokens: what it wrote is still the start of an object
        assert answer.choices[0].message.content.startswith("{")


def forward_logprobs(engine, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return engine.generation.engine.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_chat_logprobs_are_the_models_own_log_probabilities_of_the_returned_tokens(served, client):
    engine, _ = served
    messages = ask("Name a color.")
    answer = client.chat.completions.create(
        model="smol", messages=messages, max_tokens=6, temperature=0.8, seed=11, logprobs=True, top_logprobs=3
    )
    parse(ChatCompletion, answer.model_dump(exclude_unset=True))
    content = answer.choices[0].logprobs.content
    assert "".join(item.token for item in content) == answer.choices[0].message.content
    prompt = engine.prepare(engine_request(messages)).ids
    generated = engine.tokenizer(answer.choices[0].message.content, add_special_tokens=False)["input_ids"]
    expected = forward_logprobs(engine, prompt + generated)
    assert len(generated) == len(content)
    for position, (token, item) in enumerate(zip(generated, content)):
        row = expected[len(prompt) - 1 + position]
        assert item.logprob == pytest.approx(row[token].item(), abs=2e-3)
        assert bytes(item.bytes).decode() == item.token
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=2e-3)
    streamed = client.chat.completions.create(
        model="smol", messages=messages, max_tokens=6, temperature=0.8, seed=11, logprobs=True, top_logprobs=3,
        stream=True,
    )  # fmt: skip
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in streamed]
    tokens = [
        item.token for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content
    ]
    assert tokens == [item.token for item in content]


def engine_request(messages):
    from worker_transformers.serving.schema import parse_request

    return parse_request({"messages": messages}, 64)


def test_completion_logprobs_have_the_legacy_shape(client):
    answer = client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    parse(Completion, answer.model_dump(exclude_unset=True))
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == len(logprobs.top_logprobs) == 4
    # greedy: each token is the likeliest of its position
    assert all(
        max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs)
    )
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


def test_n_choices_each_differ_and_the_first_is_the_single_answer_with_that_seed(client):
    body = {"model": "smol", "messages": ask("Tell me a word."), "max_tokens": 8, "temperature": 1.0, "seed": 5}
    three = client.chat.completions.create(**body, n=3)
    parse(ChatCompletion, three.model_dump(exclude_unset=True))
    assert [c.index for c in three.choices] == [0, 1, 2]
    single = client.chat.completions.create(**body)
    assert three.choices[0].message.content == single.choices[0].message.content
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    streamed = client.chat.completions.create(**body, n=3, stream=True, stream_options={"include_usage": True})
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in streamed]
    texts = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in three.choices]
    assert chunks[-1].usage.completion_tokens == three.usage.completion_tokens


def test_a_required_tool_call_round_trip_call_result_answer(client):
    first = client.chat.completions.create(
        model="smol", messages=ask("What is the weather in Paris?"), tools=TOOLS, tool_choice="required", temperature=0
    )
    parse(ChatCompletion, first.model_dump(exclude_unset=True))
    [choice] = first.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    conversation = [
        *ask("What is the weather in Paris?"),
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    final = client.chat.completions.create(
        model="smol", messages=conversation, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0
    )
    parse(ChatCompletion, final.model_dump(exclude_unset=True))
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content


def test_a_named_tool_call_streams_as_one_call_of_that_function(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(
        model="smol", messages=ask("Is it raining in Oslo?"), tools=TOOLS, tool_choice=named, temperature=0,
        stream=True,
    )  # fmt: skip
    chunks = [parse(ChatCompletionChunk, c.model_dump(exclude_unset=True)) for c in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    first, *fragments = [tc for d in deltas for tc in d.tool_calls or []]
    assert first.function.name == "get_weather" and all(f.index == 0 and f.id is None for f in fragments)
    arguments = first.function.arguments + "".join(f.function.arguments for f in fragments)
    assert "city" in json.loads(arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_logit_bias_and_penalties_reach_the_sampler(client):
    favoured = client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=0,
        logit_bias={"7042": 100},
    )  # fmt: skip
    tokens = favoured.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1, tokens  # the favoured token every time
    body = {"model": "smol", "prompt": "one one one one one", "max_tokens": 8, "temperature": 0}
    penalized = client.completions.create(**body, frequency_penalty=2.0)
    assert penalized.choices[0].text != client.completions.create(**body).choices[0].text
