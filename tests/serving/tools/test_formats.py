"""Each format of formats.py read against the text its family's real chat template writes (renderings.py): the
answer's text, its reasoning and its calls, whole, a character at a time and in any chunks; the format `detect`
finds in each real template; and where `choose` anchors it, at the template's generation prompt."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from renderings import EXCERPTS, RENDERINGS, TOOLS, Rendering
from transformers import AutoTokenizer
from transformers.utils.chat_parsing.response_templates import load_response_template

from worker_transformers.serving.schema import GenerationRequest
from worker_transformers.serving.tools.formats import FORMATS, choose, detect
from worker_transformers.serving.tools.reader import (
    Call,
    CallArguments,
    CallReader,
    CallStart,
    Reasoning,
    ToolFormat,
    _answer_start,
    call_reader,
)

REQUEST = GenerationRequest.model_validate(
    {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS}
)
BY_NAME = {r.name: r for r in RENDERINGS}
# The markers of every format, none of which may reach the text or the reasoning.
MARKUP = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|start|>",
    "[TOOL_CALLS]",
    "[THINK]",
    "[/THINK]",
    "[ARGS]",
    "<｜tool",
    "<|tool",
    "<arg_",
    "<function=",
    "<parameter=",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def templates(tokenizer):
    """Each rendering's format as `choose` anchors it for a template that writes the family's generation prompt."""
    return {r.name: anchored(r, tokenizer) for r in RENDERINGS}


def template_writing(generation_prompt: str) -> str:
    """A chat template that writes the messages, then (asked for) `generation_prompt`, as the family's does."""
    return "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}" + (
        "{{ " + json.dumps(generation_prompt) + " }}{% endif %}"
    )


def anchored(rendering: Rendering, tokenizer) -> dict:
    tokenizer.chat_template = template_writing(rendering.generation_prompt)
    return choose(rendering.format, tokenizer, "llama").template


def read(template: dict, rendering: Rendering, chunks: list[str]) -> list:
    reader = CallReader(template, REQUEST, rendering.prompt)
    pieces = [piece for chunk in chunks for piece in reader.feed(chunk)]
    return pieces + reader.finish("stop")


def split(text: str, cuts: list[int]) -> list[str]:
    edges = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[start:end] for start, end in zip(edges, edges[1:])]


def check_read(pieces: list, rendering: Rendering) -> None:
    """The pieces are the rendering's text, reasoning and calls, each call's streamed arguments the start of its
    whole arguments (the rest the caller sends on)."""
    text = "".join(p for p in pieces if isinstance(p, str))
    reasoning = "".join(p.text for p in pieces if isinstance(p, Reasoning))
    assert (text, reasoning) == (rendering.text, rendering.reasoning)
    assert not [mark for mark in MARKUP if mark in text + reasoning], "markup was read as text"
    calls = [p for p in pieces if isinstance(p, Call)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == rendering.calls
    assert len([p for p in pieces if isinstance(p, CallStart)]) == len(calls)
    streamed, index = [""] * len(calls), -1
    for piece in pieces:
        index += isinstance(piece, CallStart)
        if isinstance(piece, CallArguments):
            streamed[index] += piece.text
    assert all(c.arguments.startswith(s) for c, s in zip(calls, streamed))


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
@pytest.mark.parametrize("step", [1, 10**6], ids=["by character", "whole"])
def test_a_real_answer_reads_as_its_text_reasoning_and_calls(tokenizer, rendering, step):
    chunks = [rendering.answer[i : i + step] for i in range(0, len(rendering.answer), step)]
    pieces = read(anchored(rendering, tokenizer), rendering, chunks)
    check_read(pieces, rendering)
    if step == 1:  # a character at a time every call's arguments stream as written, and add up to the whole
        calls = [p for p in pieces if isinstance(p, Call)]
        json_arguments = FORMATS[rendering.format]["fields"].get("tool_calls", {}).get("content") == "json"
        streamed = "".join(p.text for p in pieces if isinstance(p, CallArguments))
        assert streamed == ("".join(c.arguments for c in calls) if json_arguments else "")
        starts = [p for p in pieces if isinstance(p, CallStart)]
        assert [(s.id, s.name) for s in starts] == [(c.id, c.name) for c in calls]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(RENDERINGS), st.lists(st.integers(0, 10**6), max_size=12))
def test_a_real_answer_reads_the_same_however_it_is_chunked(templates, rendering, cuts):
    check_read(read(templates[rendering.name], rendering, split(rendering.answer, cuts)), rendering)


@pytest.mark.parametrize(
    ("rendering", "step"),
    [
        pytest.param(BY_NAME["mistral small 3.2"], 1, id="mistral small 3.2 by character"),
        pytest.param(BY_NAME["mistral small 3.2"], 10**6, id="mistral small 3.2 whole"),  # two calls open in one feed
        pytest.param(BY_NAME["kimi k2"], 1, id="kimi k2 by character"),
        pytest.param(BY_NAME["kimi k2"], 10**6, id="kimi k2 whole"),
        pytest.param(BY_NAME["kimi k2 thinking"], 1, id="kimi k2 thinking by character"),
    ],
)
def test_a_call_keeps_the_id_the_model_wrote(tokenizer, rendering, step):
    chunks = [rendering.answer[i : i + step] for i in range(0, len(rendering.answer), step)]
    pieces = read(anchored(rendering, tokenizer), rendering, chunks)
    assert [p.id for p in pieces if isinstance(p, Call)] == rendering.ids
    assert [p.id for p in pieces if isinstance(p, CallStart)] == rendering.ids


@pytest.mark.parametrize("name", ["mistral nemo", "mistral v7 text"])
@pytest.mark.parametrize("step", [1, 10**6], ids=["by character", "whole"])
def test_a_mistral_call_has_an_id_its_template_takes_back(tokenizer, name, step):
    """Mistral's JSON calls carry their id after the name, once the call has streamed with an id of the worker's:
    that id is 9 letters and digits, the only ids Mistral's templates take back ("Tool call IDs should be
    alphanumeric strings with length 9!")."""
    rendering = BY_NAME[name]
    tokenizer.chat_template = template_writing(rendering.generation_prompt) + "{# [TOOL_CALLS] #}"
    fmt = ToolFormat.of(tokenizer, "mistral", rendering.format)
    reader = call_reader(fmt, REQUEST, rendering.prompt)
    chunks = [rendering.answer[i : i + step] for i in range(0, len(rendering.answer), step)]
    pieces = [piece for chunk in chunks for piece in reader.feed(chunk)] + reader.finish("stop")
    ids = [p.id for p in pieces if isinstance(p, Call)]
    assert ids == [p.id for p in pieces if isinstance(p, CallStart)] and len(ids) == len(rendering.calls)
    assert all(len(id_) == 9 and id_.isalnum() for id_ in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("rendering", RENDERINGS, ids=lambda r: r.name)
def test_the_answer_is_read_from_the_templates_generation_prompt(tokenizer, rendering):
    """What the reader reads of the prompt is the generation prompt, its reasoning prefill included (Qwen3's
    `<think>\\n\\n</think>\\n\\n` with thinking off, DeepSeek V3.1's `<think></think>`, GLM 4.7's `</think>`), and
    nothing before it; Mistral's templates have none, so nothing of the prompt is read."""
    template = load_response_template(anchored(rendering, tokenizer))
    assert _answer_start(template, rendering.prompt) == rendering.generation_prompt
    # the anchor finds the last generation prompt of a longer chat too
    earlier = f"Hi{rendering.turn_end}{rendering.generation_prompt}Hello.\n"
    assert _answer_start(template, earlier + rendering.prompt) == rendering.generation_prompt


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_loads_as_a_response_template_anchored_or_not(tokenizer, name):
    tokenizer.chat_template = template_writing("<|im_start|>assistant\n")
    load_response_template(choose(name, tokenizer, "llama").template)
    tokenizer.chat_template = template_writing("")
    assert choose(name, tokenizer, "llama").template["start_anchor_pattern"] == r"\Z"


@pytest.mark.parametrize(("source", "expected"), [(s, e) for s, (e, _) in EXCERPTS.items()])
def test_the_format_is_found_in_the_markup_of_the_real_template(source, expected):
    assert detect(EXCERPTS[source][1]) == expected


@pytest.mark.parametrize(
    "rendering", [BY_NAME["gpt-oss template"], BY_NAME["glm-4.7"], BY_NAME["kimi k2"]], ids=lambda r: r.name
)
def test_auto_finds_the_format_in_the_template_and_anchors_it(tokenizer, rendering):
    excerpt = next(text for fmt, text in EXCERPTS.values() if fmt == rendering.format)
    tokenizer.chat_template = "{#- " + excerpt + " -#}" + template_writing(rendering.generation_prompt)
    chosen = choose("auto", tokenizer, "llama")
    assert chosen.source == f"the {rendering.format} format, found in the chat template"
    check_read(read(chosen.template, rendering, [rendering.answer]), rendering)


def test_transformers_own_template_comes_first_for_the_families_it_keeps(tokenizer):
    excerpt = EXCERPTS["Qwen3-Coder"][1]
    tokenizer.chat_template = "{#- " + excerpt + " -#}" + template_writing("<|im_start|>assistant\n")
    assert choose("auto", tokenizer, "qwen3_5").source == "transformers' response template for qwen3_5"
    assert choose("auto", tokenizer, "llama").source == "the qwen3_coder format, found in the chat template"


def mistral_tokenizer(version: str, folder):
    """mistral_common's tokenizer of `version`: its own Tekken file, with that version's special tokens."""
    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    tekken = json.loads((MistralTokenizer._data_path() / "tekken_240911.json").read_text())
    tekken["config"]["version"] = version
    tekken["special_tokens"] = [
        {"rank": i, "token_str": token.value, "is_control": True} for i, token in enumerate(SpecialTokens)
    ]
    path = folder / f"tekken_{version}.json"
    path.write_text(json.dumps(tekken))
    return MistralTokenizer.from_file(str(path))


@pytest.mark.parametrize(
    ("version", "rendering", "content"),
    [
        ("v3", "mistral nemo", None),
        ("v7", "mistral v7 text", "Let me check."),
        ("v11", "mistral small 3.2", None),
        ("v13", "devstral", "Let me check."),
        ("v13", "magistral", None),
    ],
)
def test_the_mistral_texts_are_what_mistral_common_writes(tmp_path, version, rendering, content):
    """The recorded Mistral answers, as mistral_common writes an assistant turn for each tokenizer version."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, TextChunk, ThinkChunk, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall

    rendering = BY_NAME[rendering]
    tools = [Tool(function=t["function"]) for t in TOOLS]
    ids = rendering.ids or ["abcDEF123", "xyzUVW456"]
    calls = [
        ToolCall(id=i, function=FunctionCall(name=name, arguments=json.dumps(arguments)))
        for i, (name, arguments) in zip(ids, rendering.calls)
    ]
    if rendering.reasoning:
        answer = AssistantMessage(content=[ThinkChunk(thinking=rendering.reasoning), TextChunk(text=rendering.text)])
    else:
        answer = AssistantMessage(content=content, tool_calls=calls)
    tokenizer = mistral_tokenizer(version, tmp_path)
    chat = [UserMessage(content="Weather in Paris?"), answer, UserMessage(content="Thanks.")]
    tokens = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=chat, tools=tools)).tokens
    # the tools are shown before the last user turn: the answer follows the first
    written = tokenizer.decode(tokens, special_token_policy="keep").split("Weather in Paris?[/INST]", 1)[1]
    assert written.startswith(rendering.answer + "</s>")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("hermez", "RESPONSE_TEMPLATE='hermez' names no format; use auto, none, one of hermes, "),
        ("{path}", "RESPONSE_TEMPLATE='{path}': not a valid response template (response_template must define"),
    ],
    ids=["unknown name", "file without an anchor"],
)
def test_a_response_template_setting_that_names_no_format_stops_startup_before_the_weights(
    tiny_model_dir, tmp_path, caplog, monkeypatch, setting, message
):
    """Each job of a worker whose RESPONSE_TEMPLATE cannot be used fails with one line naming the setting, and the
    model is never built (the choice is made in the tokenizer phase)."""
    from test_worker import sdk_run

    from worker_transformers.loading import loader
    from worker_transformers.worker import start_worker

    def build_model(*args):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loader, "build_model", build_model)

    path = tmp_path / "template.json"
    path.write_text(json.dumps({"fields": {"content": {"content": "text"}}}))
    setting, message = setting.format(path=path), message.format(path=path)
    with caplog.at_level("INFO"):
        started = start_worker({"MODEL_NAME": str(tiny_model_dir), "RESPONSE_TEMPLATE": setting})
    error = sdk_run(started.handler, {"prompt": "Hello"})["error"]
    assert error.startswith(message), error
    assert "Traceback" not in caplog.text
