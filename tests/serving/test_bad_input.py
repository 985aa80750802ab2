"""Arbitrary JSON thrown at the real handler (plain and OpenAI jobs): every job gets either a well-formed
answer or exactly one `{"error": str}` that names a field; nothing raises, nothing hangs, and a valid job
still succeeds afterwards."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler
from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
from worker_transformers.serving.openai.protocol import ROUTES
from worker_transformers.serving.schema import GenerationRequest, field_name

pytestmark = pytest.mark.slow

TRIED = {"plain": 0, "openai": 0}

EDGES = [
    0,
    -0.0,
    1,
    -1,
    1e-300,
    5e-324,
    1e-45,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
]
scalars = (
    st.sampled_from(EDGES)
    | st.floats(min_value=0, max_value=2.5)
    | st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "\x00", "\ud7ff", "日本語", "🙂" * 50, "a" * 5000])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
FIELDS = list(GenerationRequest.model_fields)
# A valid job with some fields replaced by anything: reaches the model with edge values (inf, huge, empty).
near_valid = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from([{"prompt": "Hello"}, {"messages": [{"role": "user", "content": "Hi"}]}]),
    st.dictionaries(st.sampled_from(FIELDS), scalars | st.lists(scalars, max_size=5), max_size=3),
)
plain_inputs = near_valid | json_values | st.dictionaries(st.sampled_from(FIELDS + ["extra"]), json_values, max_size=6)
messages = st.lists(
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values | st.sampled_from(["user", "system"]))
    | json_values,
    max_size=3,
)
OPENAI_FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "logprobs",
    "tools",
    "user",
    "top_k",
    "echo",
    "bogus",
]
openai_near_valid = st.builds(
    lambda base, changes: {**base, **changes},
    st.sampled_from(
        [{"model": "SERVED", "messages": [{"role": "user", "content": "Hi"}]}, {"model": "SERVED", "prompt": "Hello"}]
    ),
    st.dictionaries(st.sampled_from(OPENAI_FIELDS), scalars | st.lists(scalars, max_size=5), max_size=3),
)
openai_bodies = (
    openai_near_valid
    | json_values
    | st.dictionaries(st.sampled_from(OPENAI_FIELDS), json_values | messages, max_size=6)
)
openai_inputs = st.fixed_dictionaries(
    {"openai_route": st.sampled_from([*ROUTES, "/v1/nope", "", None]) | json_values, "openai_input": openai_bodies}
)


def names_a_field(message: str, sent, known) -> bool:
    """The message starts with `input:`, a field the caller sent or a field the route knows, then a reason."""
    names = ["input", *known] + ([field_name(k) for k in sent] if isinstance(sent, dict) else [])
    return any(message.startswith(f"{n}: ") or message.startswith(f"{n}.") for n in names) and ": " in message


@pytest.fixture(scope="module")
def handler(tiny_engine, tiny_model_name):
    # A low cap keeps the valid jobs among thousands of inputs quick.
    return make_handler(tiny_engine, Settings.from_env({"MODEL_NAME": tiny_model_name, "MAX_NEW_TOKENS": "8"}))


@pytest.fixture(scope="module")
def model(tiny_model_name):
    return tiny_model_name


def answer(handler, job_input):
    async def collect():
        return [item async for item in handler({"id": "fuzz", "input": job_input})]

    return asyncio.run(asyncio.wait_for(collect(), timeout=30))


def check_plain(items, sent):
    assert items, "no output at all"
    if any(isinstance(i, dict) and "error" in i for i in items):
        [item] = items
        assert isinstance(item["error"], str) and names_a_field(item["error"], sent, FIELDS), item
        return
    final = items[-1]
    assert {"text", "finish_reason", "usage", "model"} <= set(final)
    assert final["usage"]["completion_tokens"] <= 8


def check_openai(items, sent):
    assert items, "no output at all"
    if any(isinstance(i, dict) and "error" in i for i in items):
        [item] = items
        error = json.loads(item["error"])["error"]
        assert error["type"] == "invalid_request_error"
        body = sent["openai_input"]
        known = ["openai_route", "openai_input", *ChatCompletionBody.model_fields, *CompletionBody.model_fields]
        assert names_a_field(error["message"], body, known), error
        return
    if isinstance(items[0], str):
        assert items[-1] == "data: [DONE]\n\n"
    else:
        [body] = items
        assert body["object"] in {"list", "chat.completion", "text_completion"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_input=plain_inputs)
def test_arbitrary_plain_jobs_get_an_answer_or_a_named_error(handler, job_input):
    TRIED["plain"] += 1
    check_plain(answer(handler, job_input), job_input)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(job_input=openai_inputs)
def test_arbitrary_openai_jobs_get_an_answer_or_an_openai_error(handler, model, job_input):
    TRIED["openai"] += 1
    body = job_input["openai_input"]
    if isinstance(body, dict) and body.get("model") == "SERVED":
        job_input = {**job_input, "openai_input": {**body, "model": model}}
    check_openai(answer(handler, job_input), job_input)


def test_a_valid_job_still_succeeds_after_the_fuzzing(handler):
    [result] = answer(handler, {"prompt": "Hello", "max_new_tokens": 3, "temperature": 0})
    assert result["usage"]["completion_tokens"] == 3
    print(f"bad inputs tried: {TRIED}")
