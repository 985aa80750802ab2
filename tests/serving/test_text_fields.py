"""Arbitrary Unicode in every text field of a job, native and OpenAI, through the real handler: lone
surrogates, NUL, combining marks, any code point. Text that is valid Unicode is answered; text that is not
(a lone surrogate, which JSON can carry and no UTF-8 encoder can take) fails the job with an error that names
the field, never a traceback."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler

pytestmark = pytest.mark.slow

SENT = {"native answered": 0, "native refused": 0, "openai answered": 0, "openai refused": 0}
# st.text leaves surrogates out of any alphabet; characters joined by hand keep them.
texts = st.lists(
    st.characters(codec=None, exclude_categories=())
    | st.sampled_from(["\ud800", "\udfff", "\x00", "\u0301", "\u200d"]),
    min_size=1,
    max_size=12,
).map("".join)


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture(scope="module")
def handler(tiny_engine, tiny_model_name):
    return make_handler(tiny_engine, Settings.from_env({"MODEL_NAME": tiny_model_name, "MAX_NEW_TOKENS": "2"}))


def answer(handler, job_input) -> list:
    async def collect():
        return [item async for item in handler({"id": "text", "input": job_input})]

    return asyncio.run(asyncio.wait_for(collect(), timeout=30))


# Where the text goes, and the field the error must name.
NATIVE = {
    "prompt": lambda t: ({"prompt": t}, "prompt"),
    "system content": lambda t: ({"messages": [{"role": "system", "content": t}]}, "messages.0.content"),
    "user content": lambda t: (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": t}]},
        "messages.1.content",
    ),
    "stop": lambda t: ({"prompt": "Hello", "stop": ["x", t]}, "stop.1"),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, where=st.sampled_from(sorted(NATIVE)))
def test_any_text_in_a_native_job_is_answered_or_refused_by_field(handler, text, where):
    job, field = NATIVE[where](text)
    items = answer(handler, {**job, "max_new_tokens": 2, "temperature": 0})
    if valid_unicode(text):
        assert "usage" in items[-1], items
        SENT["native answered"] += 1
    else:
        assert items == [{"error": items[0]["error"]}] and items[0]["error"].startswith(
            f"{field}: the text holds a "
        ), items
        SENT["native refused"] += 1


OPENAI = {
    "chat content": ("/v1/chat/completions", lambda t: {"messages": [{"role": "user", "content": t}]}, "messages"),
    "chat part": (
        "/v1/chat/completions",
        lambda t: {"messages": [{"role": "user", "content": [{"type": "text", "text": t}]}]},
        "messages",
    ),
    "chat name": (
        "/v1/chat/completions",
        lambda t: {"messages": [{"role": "user", "content": "Hi", "name": t}]},
        "messages",
    ),
    "chat stop": (
        "/v1/chat/completions",
        lambda t: {"messages": [{"role": "user", "content": "Hi"}], "stop": t},
        "stop",
    ),
    "chat user": (
        "/v1/chat/completions",
        lambda t: {"messages": [{"role": "user", "content": "Hi"}], "user": t},
        "user",
    ),
    "prompt": ("/v1/completions", lambda t: {"prompt": t}, "prompt"),
    "prompt list": ("/v1/completions", lambda t: {"prompt": [t]}, "prompt"),
    "completion stop": ("/v1/completions", lambda t: {"prompt": "Hello", "stop": [t]}, "stop"),
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, where=st.sampled_from(sorted(OPENAI)))
def test_any_text_in_an_openai_job_is_answered_or_refused_by_field(handler, tiny_model_name, text, where):
    route, body, param = OPENAI[where]
    items = answer(
        handler, {"openai_route": route, "openai_input": {"model": tiny_model_name, "max_tokens": 2, **body(text)}}
    )
    if valid_unicode(text):
        assert items and items[0]["object"] in {"chat.completion", "text_completion"}, items
        SENT["openai answered"] += 1
    else:
        [item] = items
        error = json.loads(item["error"])["error"]
        assert error["type"] == "invalid_request_error" and error["param"].split(".")[0] == param, error
        # param names the top-level field, as OpenAI's errors do; the message names the exact place
        where_named, _, reason = error["message"].partition(": ")
        assert where_named.split(".")[0] == error["param"] and reason.startswith("the text holds a character that is")
        SENT["openai refused"] += 1


def test_a_lone_surrogate_in_a_message_through_the_local_api_server_is_a_named_error(tiny_model_dir):
    import requests
    from api_server import api_server

    job = {"input": {"messages": [{"role": "user", "content": "hi \ud800"}], "max_new_tokens": 2}}
    with api_server({"MODEL_NAME": str(tiny_model_dir)}) as server:
        reply = requests.post(f"{server.url}/runsync", json=job, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["output"] == [
        {
            "error": "messages.0.content: the text holds a character that is not valid Unicode (U+D800, a lone "
            "surrogate, at position 3); send UTF-8 text"
        }
    ]
    print(f"text inputs sent: {SENT}")
