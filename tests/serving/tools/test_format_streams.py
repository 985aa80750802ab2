"""Formats of formats.py end to end: a tiny scripted model writes its family's markup token by token (the markers
special tokens, as the family's tokenizer has them), its template writes the same markup so that `auto` finds the
format, and the real handler, local server and `openai` client give the same calls, reasoning and text whole and
streamed. gpt-oss (harmony), Mistral v11+ and GLM 4.5+ (an XML format); the others are read against their real
templates' text in test_formats.py.

A piece is one token and a token is followed by one token only (the model is a bigram table), so markup a family
repeats (a second call's markers) is merged into one piece."""

import pytest
from api_server import served_model
from conftest import make_tiny_model
from renderings import TOOLS
from scripted_models import Script, make_scripted_model

ASK = [{"role": "user", "content": "Weather in Paris?"}]
TOOL_NAMES = "{% for t in tools %}{{ t.function | tojson }}\n{% endfor %}"

# gpt-oss: its turns, and a call written back as its template writes it.
HARMONY_TEMPLATE = (
    "{% if tools %}<|start|>developer<|message|># Tools\n" + TOOL_NAMES + "<|end|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|start|>assistant to=functions."
    "{{ m.tool_calls[0].function.name }}<|channel|>commentary json<|message|>"
    "{{ m.tool_calls[0].function.arguments | tojson }}<|call|>"
    "{% elif m.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
# The model's call as OpenAI's harmony guide shows it; it stops at <|call|> (here the tiny model's end of sequence).
HARMONY = [
    "<|channel|>",
    "analysis",
    "<|message|>",
    "Need the",
    " weather.",
    "<|end|>",
    "<|start|>",
    "assistant<|channel|>commentary to=functions.get_weather",
    " ",
    "<|constrain|>",
    "json<|message|>",
    '{"city": ',
    '"Paris", ',
    '"days": 3}',
]
HARMONY_SPECIAL = ("<|channel|>", "<|message|>", "<|end|>", "<|start|>", "<|constrain|>")

# Mistral's v11+ turns (Mistral Small 3.2's template: no generation prompt, a call's id after [CALL_ID]).
MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content or '' }}{% for c in m.tool_calls or [] %}[TOOL_CALLS]"
    "{{ c.function.name }}[CALL_ID]{{ c.id }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)
MISTRAL = [
    "[THINK]",
    "Need the",
    " weather.",
    "[/THINK]",
    "[TOOL_CALLS]",
    "get_weather",
    "[CALL_ID]",
    "abcDEF123",
    "[ARGS]",
    '{"city": ',
    '"Paris", "days": 3}',
    "[TOOL_CALLS]get_time[CALL_ID]xyzUVW456[ARGS]",
    '{"city": "Paris"}',
]
MISTRAL_SPECIAL = ("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[CALL_ID]", "[ARGS]")

# GLM 4.7's turns: its generation prompt opens the reasoning; a call's arguments are <arg_key>/<arg_value> pairs.
GLM_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# Tools\n" + TOOL_NAMES + "For each function call, output "
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value></tool_call>"
    "{% endif %}{% for m in messages %}{% if m.role == 'user' %}<|user|>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|></think>{{ m.content }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>{% endif %}"
)
GLM = [
    "Need the",
    " weather.",
    "</think>",
    "Let me",
    " check.",
    "<tool_call>",
    "get_weather",
    "<arg_key>",
    "city",
    "</arg_key>",
    "<arg_value>",
    "Paris",
    "</arg_value>",
    "<arg_key>days</arg_key><arg_value>3</arg_value>",
    "</tool_call>",
    "<tool_call>get_time<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
]
GLM_SPECIAL = ("</think>", "<tool_call>", "</tool_call>")

WEATHER = ("get_weather", '{"city": "Paris", "days": 3}')
FAMILIES = {
    # name: (template, pieces, special tokens, the template's own tokens, calls, ids, reasoning, text)
    "harmony": (HARMONY_TEMPLATE, HARMONY, HARMONY_SPECIAL, (), [WEATHER], None, "Need the weather.", ""),
    "mistral_v11": (
        MISTRAL_TEMPLATE,
        MISTRAL,
        MISTRAL_SPECIAL,
        (),
        [WEATHER, ("get_time", '{"city": "Paris"}')],
        ["abcDEF123", "xyzUVW456"],
        "Need the weather.",
        "",
    ),
    "glm45": (
        GLM_TEMPLATE,
        GLM,
        GLM_SPECIAL,
        ("<think>",),
        [WEATHER, ("get_time", '{"city": "Paris"}')],
        None,
        "Need the weather.",
        "Let me check.",
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    template, pieces, special, markup, *expected = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    base = make_tiny_model(folder / "base")
    make_scripted_model(folder, base, template, [Script(ASK, pieces, TOOLS)], special=special, markup=markup)
    with served_model(folder) as served:
        yield served.client, served.model, expected


def test_a_family_found_in_its_template_calls_tools_whole_and_streamed_alike(family):
    client, model, (calls, ids, reasoning, text) = family
    reply = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == calls
    if ids is not None:  # the ids the model wrote, which its template checks when the calls come back
        assert [c.id for c in message.tool_calls] == ids
    assert (message.model_extra.get("reasoning_content") or "", message.content or "") == (reasoning, text)

    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0, stream=True))
    streamed: dict[int, dict] = {}
    for delta in (d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []):
        call = streamed.setdefault(delta.index, {"id": delta.id, "name": delta.function.name, "arguments": ""})
        call["arguments"] += delta.function.arguments or ""
    assert all(call["id"] for call in streamed.values())
    assert [(streamed[i]["name"], streamed[i]["arguments"]) for i in sorted(streamed)] == calls
    if ids is not None:
        assert [streamed[i]["id"] for i in sorted(streamed)] == ids
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == text
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
