"""Tool calls and reasoning as a real model writes them, token by token, read back by the format the worker finds
for it, through the real handler, the local server and the real `openai` client: the project's own Hermes-format
template (builder/chat_templates/chatml_tools.jinja) in `tool_choice: auto`, parallel calls streamed as OpenAI
streams them (a first delta with index, id, type and name, then argument fragments), and a thinking model's
reasoning apart from its answer, whole and streamed alike."""

import json
from pathlib import Path

import openai
import pytest
from api_server import served_model
from conftest import CHATML, make_tiny_model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from scripted_models import Script, make_scripted_model
from test_routes import parse

ROOT = Path(__file__).resolve().parents[3]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name in ("get_weather", "get_time")
]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]
# Two calls in the Hermes format, in the pieces a tokenizer could cut them into: the arguments stream in three.
CALLS = [
    "<tool_call>",
    '\n{"name": "get_weather", ',
    '"arguments": {"city": ',
    '"Paris", "days": ',
    "3}}\n</tool_call>",
    '\n<tool_call>\n{"name": "get_time", "arguments": ',
    '{"city": "Paris"}}',
    "\n</tool_call>",
]
THINK = "{{ '<think>\\n' if add_generation_prompt and enable_thinking is not defined else '' }}"
THINKING_TEMPLATE = CHATML + THINK
REASONING = ["I should", " look outside.", "</think>", "\n\nIt is", " sunny."]


@pytest.fixture(scope="module")
def hermes(tmp_path_factory):
    """A model on the project's own tools template, with no response_template of its own."""
    folder = tmp_path_factory.mktemp("hermes")
    template = (ROOT / "builder/chat_templates/chatml_tools.jinja").read_text()
    make_scripted_model(folder, make_tiny_model(folder / "base"), template, [Script(ASK, CALLS, TOOLS)])
    with served_model(folder) as served:
        yield served.client, served.model


def test_the_projects_tools_template_calls_tools_in_auto_mode(hermes):
    client, model = hermes
    reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0)
    parse(ChatCompletion, reply.model_dump(exclude_unset=True))
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and not message.content
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Paris", "days": 3}'),
        ("get_time", '{"city": "Paris"}'),
    ]
    assert len({c.id for c in message.tool_calls}) == 2


def test_parallel_calls_stream_a_header_then_argument_fragments_and_add_up_to_the_whole(hermes):
    client, model = hermes
    whole = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, stream=True))
    for chunk in chunks:
        parse(ChatCompletionChunk, chunk.model_dump(exclude_unset=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    calls: dict[int, dict] = {}
    for delta in deltas:
        if delta.index not in calls:  # the first delta of a call: its id, type and name
            assert delta.id and delta.type == "function" and delta.function.name
            calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
        else:
            assert delta.id is None and delta.function.name is None
        calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert sorted(calls) == [0, 1]
    fragments = [d for d in deltas if d.index == 0 and d.function.arguments]
    assert len(fragments) >= 3, "the first call's arguments came whole, not as they were written"
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in (0, 1)] == expected
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A thinking model: its template opens the reasoning (`<think>`), the model closes it and answers; with
    `enable_thinking` false the template leaves it out (its answer then is the plain text of another script)."""
    folder = tmp_path_factory.mktemp("thinker")
    scripts = [Script(ASK, REASONING)]
    base = make_tiny_model(folder / "base")
    make_scripted_model(folder, base, THINKING_TEMPLATE, scripts, markup=("<think>",))
    with served_model(folder) as served:
        yield served.client, served.model


def test_reasoning_comes_apart_from_the_answer_whole_and_streamed(thinker):
    client, model = thinker
    reply = client.chat.completions.create(model=model, messages=ASK, temperature=0)
    message = reply.choices[0].message
    assert message.content.strip() == "It is sunny."
    assert message.model_extra["reasoning_content"].strip() == "I should look outside."
    chunks = list(client.chat.completions.create(model=model, messages=ASK, temperature=0, stream=True))
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == (message.model_extra["reasoning_content"], message.content)
    assert "<think>" not in content + reasoning and "</think>" not in content + reasoning


def test_a_model_without_a_format_is_refused_tools_in_auto_mode_naming_the_setting(tmp_path):
    folder = tmp_path / "plain"
    base = make_tiny_model(tmp_path / "base")
    template = "{% if tools %}{{ tools | tojson }}{% endif %}" + CHATML  # shows tools, no call markup at all
    make_scripted_model(folder, base, template, [Script(ASK, ["Sunny."])])
    with served_model(folder) as served:
        with pytest.raises(openai.BadRequestError) as caught:
            served.client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS)
        assert "RESPONSE_TEMPLATE" in caught.value.body["message"]
        forced = served.client.chat.completions.create(
            model=served.model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4
        )
        assert forced.choices[0].message.content == "Sunny."


def test_the_response_template_setting_forces_a_format_from_a_file(tmp_path, hermes):
    """The project's template read with a response template from a file (RESPONSE_TEMPLATE=path)."""
    folder = Path(hermes[1])
    spec = {
        "start_anchor": "<|im_start|>assistant\n",
        "fields": {
            "tool_calls": {
                "open": "<tool_call>",
                "close": "</tool_call>",
                "repeats": True,
                "content": "json",
                "transform": {"type": "function", "function": "{content}"},
            },
            "content": {"content": "text"},
        },
    }
    path = tmp_path / "hermes.json"
    path.write_text(json.dumps(spec))
    with served_model(folder, RESPONSE_TEMPLATE=str(path)) as served:
        reply = served.client.chat.completions.create(model=served.model, messages=ASK, tools=TOOLS, temperature=0)
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather", "get_time"]


def test_calls_made_whole_after_later_calls_began_each_send_their_own_rest():
    """A required call's list (and a JSON list of calls in any format) ends its calls together, after each has begun
    and streamed fragments: each whole call sends the rest of its own arguments, under its own index."""
    import asyncio
    from types import SimpleNamespace

    from worker_transformers.generation.events import Done
    from worker_transformers.serving.openai.routes import _Chat, _sse
    from worker_transformers.serving.schema import GenerationRequest
    from worker_transformers.serving.tools.reader import ForcedCallReader

    request = GenerationRequest.model_validate({"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    reader = ForcedCallReader(request)
    text = (
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {"city": "Oslo"}}]'
    )
    pieces = [p for i in range(0, len(text), 7) for p in reader.feed(text[i : i + 7])] + reader.finish("stop")

    async def answer():
        for piece in [*pieces, Done("", "stop", 5, 30)]:
            yield piece

    async def events():
        formatter = _Chat(SimpleNamespace(tokenizer=None, model_name="m"), False, False)
        return [chunk async for chunk in _sse(formatter, [answer()])]

    chunks = [json.loads(e.removeprefix("data: ")) for e in asyncio.run(events()) if e != "data: [DONE]\n\n"]
    calls: dict[int, str] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            calls[delta["index"]] = calls.get(delta["index"], "") + delta["function"]["arguments"]
    assert [json.loads(calls[i]) for i in (0, 1)] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
