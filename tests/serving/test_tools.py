"""Reading tool calls from a model's answer as it streams, with transformers' response parsing."""

import json
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from worker_transformers.serving.schema import GenerationRequest
from worker_transformers.serving.tools.reader import (
    Call,
    CallArguments,
    CallReader,
    CallStart,
    ForcedCallReader,
    Reasoning,
    ToolCallFailed,
    ToolFormat,
    call_reader,
    forced_call_schema,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
# Qwen2.5-7B-Instruct's answer to "What's the weather in Paris for the next 3 days?" with the tool above: its
# chat template's Hermes format, a JSON object between <tool_call> tags.
QWEN_ANSWER = (
    "Let me look that up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
)
QWEN_PROMPT_END = (
    "<|im_start|>user\nWhat's the weather in Paris for the next 3 days?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def qwen_format(tiny_model_dir):
    """Qwen 2's format as transformers keeps it (found by the model's type for a tokenizer that ships none)."""
    from transformers.cli.serving.utils import get_response_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = get_response_template(tokenizer, SimpleNamespace(config=SimpleNamespace(model_type="qwen2")))
    return ToolFormat(renders_tools=True, response_template=template, model_type="qwen2")


def request(tool_choice=None) -> GenerationRequest:
    fields = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    return GenerationRequest.model_validate(fields | ({"tool_choice": tool_choice} if tool_choice else {}))


def read(fmt, text: str, step: int, tool_choice=None, finish_reason="stop") -> list:
    reader = call_reader(fmt, request(tool_choice), QWEN_PROMPT_END)
    pieces = []
    for start in range(0, len(text), step):
        pieces += reader.feed(text[start : start + step])
    return pieces + reader.finish(finish_reason)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_a_real_answer_reads_as_its_text_then_the_call_however_it_is_chunked(qwen_format, step):
    pieces = read(qwen_format, QWEN_ANSWER, step)
    text = "".join(p for p in pieces if isinstance(p, str))
    assert text.strip() == "Let me look that up."
    assert "<" not in text, "markup of the call streamed as text"
    [call] = [p for p in pieces if isinstance(p, Call)]
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}


def test_an_answer_without_markup_is_all_text(qwen_format):
    pieces = read(qwen_format, "Paris is sunny.", 2)
    assert "".join(pieces) == "Paris is sunny."


def test_a_call_cut_short_by_max_tokens_ends_as_far_as_it_got_as_its_stream_showed(qwen_format):
    cut = QWEN_ANSWER[: QWEN_ANSWER.index('"days"')]
    pieces = read(qwen_format, cut, 4, finish_reason="length")
    [call] = [p for p in pieces if isinstance(p, Call)]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris", '
    assert "".join(p.text for p in pieces if isinstance(p, CallArguments)) == call.arguments
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == "Let me look that up."


@pytest.mark.parametrize("step", [1, 2, 7])
def test_a_call_streams_its_name_first_then_its_arguments_as_written(qwen_format, step):
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",  "days": 3}}\n</tool_call>\n' * 2
    pieces = read(qwen_format, answer, step)
    kinds = [type(p).__name__ for p in pieces if not isinstance(p, str)]
    assert kinds[0] == "CallStart" and kinds.count("CallStart") == 2 and kinds.count("Call") == 2
    assert kinds.index("CallArguments") < kinds.index("Call"), "the arguments did not stream before the call ended"
    starts = [p for p in pieces if isinstance(p, CallStart)]
    calls = [p for p in pieces if isinstance(p, Call)]
    assert [c.id for c in calls] == [s.id for s in starts] and starts[0].id != starts[1].id
    # the arguments as the model wrote them (two spaces and all), and what streamed is exactly that
    assert calls[0].arguments == '{"city": "Paris",  "days": 3}'
    first = kinds.index("Call")
    assert "".join(p.text for p in pieces[: first + 1] if isinstance(p, CallArguments)) == calls[0].arguments
    assert not "".join(p for p in pieces if isinstance(p, str)).strip()


def test_unreadable_call_markup_is_an_error_naming_it(qwen_format):
    with pytest.raises(ToolCallFailed) as caught:
        read(qwen_format, "<tool_call>\n{not json}\n</tool_call>", 5)
    assert caught.value.code == "invalid_tool_call"


NAMED = {"type": "function", "function": {"name": "get_weather"}}
TWO_TOOLS = TOOLS + [{"type": "function", "function": {"name": "get_time"}}]


def forced(tool_choice, tools=TOOLS) -> GenerationRequest:
    fields = {"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "tool_choice": tool_choice}
    return GenerationRequest.model_validate(fields)


def test_a_named_call_is_the_functions_arguments_and_is_read_as_a_call_of_it():
    request = forced(NAMED, TWO_TOOLS)
    assert forced_call_schema(request) == TOOLS[0]["function"]["parameters"]
    reader = call_reader(None, request, "")
    assert isinstance(reader, ForcedCallReader)
    start, first = reader.feed('{"city": "Par')
    assert (start.name, first.text) == ("get_weather", '{"city": "Par')
    assert reader.feed('is"}') == [CallArguments('is"}')]
    [call] = reader.finish("stop")
    assert (call.id, call.name, call.arguments) == (start.id, "get_weather", '{"city": "Paris"}')


def test_a_required_call_is_a_list_of_calls_of_the_tools_each_by_name():
    request = forced("required", TWO_TOOLS)
    schema = forced_call_schema(request)
    assert schema["minItems"] == 1
    assert [item["properties"]["name"] for item in schema["items"]["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    # a tool without parameters takes any object
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object"}
    reader = call_reader(None, request, "")
    reader.feed('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    assert [(c.name, json.loads(c.arguments)) for c in reader.finish("stop")] == [
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]


def test_a_forced_call_cut_short_by_max_tokens_is_no_call_until_its_name_is_whole():
    reader = call_reader(None, forced("required"), "")
    assert reader.feed('[{"name": "get_weath') == []
    assert reader.finish("length") == []
    reader = call_reader(None, forced("required"), "")
    [start, fragment] = reader.feed('[{"name": "get_weather", "arguments": {"ci')
    [call] = reader.finish("length")
    assert (call.name, call.arguments) == ("get_weather", fragment.text) == ("get_weather", '{"ci')


def test_a_template_that_ignores_tools_is_refused_by_name(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # ChatML without a tools section
    fmt = ToolFormat.of(tokenizer, "qwen2", "hermes")
    assert not fmt.renders_tools and fmt.calls_template is not None  # a format to read calls, none shown
    from worker_transformers.serving.schema import RequestError

    with pytest.raises(RequestError, match="^tools: this model's chat template does not show tools"):
        fmt.check(request())
    fmt.check(request("none"))  # nothing to show: tool_choice none sends no tools


def test_required_and_named_choices_instruct_the_model_and_show_only_the_named_tool():
    required = request("required")
    assert "call of one of the tools" in required.template_messages()[0]["content"]
    named = GenerationRequest.model_validate(
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}],
            "tools": TOOLS + [{"type": "function", "function": {"name": "get_time"}}],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        }
    )
    [system, _] = named.template_messages()
    assert system["content"].startswith("Be brief.") and "`get_time`" in system["content"]
    assert [t["function"]["name"] for t in named.template_tools()] == ["get_time"]
    assert request("none").template_tools() is None


QWEN3_THINKING = "<think>\nThe user wants the weather.\n</think>\n\nIt is sunny."


def test_reasoning_is_read_apart_in_a_chat_without_tools_and_calls_are_not(qwen_format):
    chat = GenerationRequest.model_validate({"messages": [{"role": "user", "content": "Weather?"}]})
    reader = call_reader(qwen_format, chat, QWEN_PROMPT_END)
    assert isinstance(reader, CallReader) and reader.keeps_special_tokens
    pieces = [p for i in range(0, len(QWEN3_THINKING), 3) for p in reader.feed(QWEN3_THINKING[i : i + 3])]
    pieces += reader.finish("stop")
    assert "".join(p.text for p in pieces if isinstance(p, Reasoning)).strip() == "The user wants the weather."
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == "It is sunny."
    # without tools, markup of a call is no call: there is no tool to call
    reader = call_reader(qwen_format, chat, QWEN_PROMPT_END)
    pieces = reader.feed(QWEN_ANSWER) + reader.finish("stop")
    assert not [p for p in pieces if isinstance(p, (Call, CallStart))]


def test_a_prompt_or_a_model_with_nothing_to_read_is_not_read(qwen_format):
    prompt = GenerationRequest.model_validate({"prompt": "<think>"})
    assert call_reader(qwen_format, prompt, "") is None
    chat = GenerationRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}]})
    calls_only = {
        "start_anchor": "x",
        "fields": {"tool_calls": {"open": "<c>", "close": "</c>", "content": "json"}, "content": {"content": "text"}},
    }
    assert call_reader(ToolFormat(True, calls_only, "x"), chat, "") is None
    assert call_reader(ToolFormat(True, None, "x"), chat, "") is None


def test_parallel_tool_calls_false_takes_the_first_call_and_drops_the_rest(qwen_format):
    two = QWEN_ANSWER + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    fields = {"messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS}
    for parallel, cities in ((True, ["Paris", "Oslo"]), (False, ["Paris"])):
        single = GenerationRequest.model_validate(fields | {"parallel_tool_calls": parallel})
        reader = call_reader(qwen_format, single, QWEN_PROMPT_END)
        pieces = [p for step in range(0, len(two), 5) for p in reader.feed(two[step : step + 5])] + reader.finish(
            "stop"
        )
        assert [json.loads(p.arguments)["city"] for p in pieces if isinstance(p, Call)] == cities
        assert len([p for p in pieces if isinstance(p, CallStart)]) == len(cities)
    one = GenerationRequest.model_validate(fields | {"tool_choice": "required", "parallel_tool_calls": False})
    assert forced_call_schema(one)["maxItems"] == 1 and "maxItems" not in forced_call_schema(request("required"))


def test_gemma_4s_thought_channel_and_call_read_by_transformers_template(tiny_model_dir):
    """Gemma 4's answer as its format writes it (transformers keeps the template, found by the model type): the
    thought channel is reasoning, the call's unquoted-key arguments are JSON, whole and a character at a time."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fmt = ToolFormat.of(tokenizer, "gemma4", "gemma4")
    answer = (
        "<|channel>thought\nThe user wants the weather.<channel|>"
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
    )
    for step in (1, len(answer)):
        reader = call_reader(fmt, request(), "<bos><|turn>user\nWeather?<turn|>\n<|turn>model\n")
        pieces = [p for i in range(0, len(answer), step) for p in reader.feed(answer[i : i + step])]
        pieces += reader.finish("stop")
        assert "".join(p.text for p in pieces if isinstance(p, Reasoning)) == "The user wants the weather."
        assert "".join(p for p in pieces if isinstance(p, str)) == ""
        [start] = [p for p in pieces if isinstance(p, CallStart)]
        [call] = [p for p in pieces if isinstance(p, Call)]
        assert (start.name, start.id) == (call.name, call.id) == ("get_weather", call.id)
        assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
