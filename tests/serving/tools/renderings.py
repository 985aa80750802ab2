"""What each family's real chat template writes for an assistant turn with tool calls (and reasoning), recorded.

Each answer was cut from the template's rendering of [user "Weather in Paris?", assistant with the calls] with the
tools below: what follows the generation prompt, up to the end-of-turn token the model stops at (not part of the
text it is read from). The templates are the Hugging Face ones that llama.cpp keeps in models/templates/ (named in
`source`), rendered with transformers' `render_jinja_template`; Mistral's are mistral_common's
`encode_chat_completion` (1.13) for its tokenizer versions. Where a template does not write an assistant's calls
back (Granite 3.3) or a model writes them otherwise than its template does (gpt-oss), `source` says what the text
follows instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": "d",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
    for name in ("get_weather", "get_time")
]
WEATHER = ("get_weather", {"city": "Paris", "days": 3})
TIME = ("get_time", {"city": "Paris"})


@dataclass(frozen=True)
class Rendering:
    format: str  # the format of formats.FORMATS that reads it
    source: str  # the template (or encoder) it came from
    generation_prompt: str  # what the template adds to ask for the answer (with `variables`)
    answer: str  # what the model writes after it
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    text: str = ""  # the answer's text, as it reads: no markup, nor the whitespace that goes with it
    reasoning: str = ""  # its reasoning, likewise
    ids: list[str] | None = None  # the call ids the format carries
    variables: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs it was rendered with
    name: str = ""
    turn_end: str = ""  # what the template ends the user's turn with, before the generation prompt

    @property
    def prompt(self) -> str:
        """The end of a prompt as the template writes it: the user's turn, then the generation prompt."""
        return f"Weather in Paris?{self.turn_end}{self.generation_prompt}"


_HERMES_CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
)
_QWEN3_CODER_CALLS = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
    "</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)
_DEEPSEEK_V3_CALLS = (
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n'
    '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
_DEEPSEEK_V31_CALLS = (
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}<｜tool▁call▁end｜>'
    '<｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
_KIMI_CALLS = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris", "days": 3}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
    '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>'
)
_MISTRAL_LIST = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}, "id": "abcDEF123"}, '
    '{"name": "get_time", "arguments": {"city": "Paris"}, "id": "xyzUVW456"}]'
)
# Each family's turn markup: what the template ends the user's turn with, and its generation prompt.
CHATML = ("<|im_end|>\n", "<|im_start|>assistant\n")
LLAMA3 = ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n")
GRANITE = ("<|end_of_text|>\n", "<|start_of_role|>assistant<|end_of_role|>")
MISTRAL = ("[/INST]", "")  # no generation prompt: the answer follows the user's turn
HARMONY = ("<|end|>", "<|start|>assistant")
KIMI = ("<|im_end|>", "<|im_assistant|>assistant<|im_middle|>")


def rendering(fmt: str, source: str, turn: tuple[str, str], answer: str, **expected: Any) -> Rendering:
    turn_end, generation_prompt = turn
    return Rendering(fmt, source, generation_prompt, answer, turn_end=turn_end, **expected)


def thinking(turn: tuple[str, str], prefill: str) -> tuple[str, str]:
    return turn[0], turn[1] + prefill


RENDERINGS = [
    # Hermes: ChatML turns, stop at <|im_end|>.
    rendering(
        "hermes",
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        CHATML,
        _HERMES_CALLS[: _HERMES_CALLS.index("\n<tool_call>")],
        calls=[WEATHER],
        name="hermes-3 one call",
    ),
    rendering(
        "hermes",
        "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
        CHATML,
        _HERMES_CALLS,
        calls=[WEATHER, TIME],
        name="hermes-3 two calls",
    ),
    rendering(
        "hermes",
        "Qwen-Qwen3-0.6B",
        CHATML,
        "<think>\nThink.\n</think>\n\nLet me check.\n" + _HERMES_CALLS,
        calls=[WEATHER, TIME],
        text="Let me check.",
        reasoning="Think.",
        name="qwen3 thinking",
    ),
    rendering(
        "hermes",
        "Qwen-Qwen3-0.6B (enable_thinking false)",
        thinking(CHATML, "<think>\n\n</think>\n\n"),
        _HERMES_CALLS,
        calls=[WEATHER, TIME],
        variables={"enable_thinking": False},
        name="qwen3 not thinking",
    ),
    rendering(
        "hermes",
        "ibm-granite-granite-4.0",
        GRANITE,
        "Let me check.\n" + _HERMES_CALLS,
        calls=[WEATHER, TIME],
        text="Let me check.",
        name="granite 4.0",
    ),
    # Qwen3-Coder: ChatML, XML calls whose values are cast by the tool's schema.
    rendering(
        "qwen3_coder",
        "Qwen3-Coder",
        CHATML,
        "Let me check.\n\n" + _QWEN3_CODER_CALLS,
        calls=[WEATHER, TIME],
        text="Let me check.",
        name="qwen3-coder",
    ),
    rendering(
        "qwen3_coder",
        "Qwen3.5-4B",
        thinking(CHATML, "<think>\n"),
        "Think.\n</think>\n\n" + _QWEN3_CODER_CALLS,
        calls=[WEATHER, TIME],
        reasoning="Think.",
        name="qwen3.5 thinking",
    ),
    # Llama 3.1-3.3: one JSON call (the templates refuse two), stop at <|eot_id|>.
    rendering(
        "llama3_json",
        "meta-llama-Llama-3.1-8B-Instruct (3.2-3B and 3.3-70B alike)",
        LLAMA3,
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        calls=[WEATHER],
        name="llama 3.1",
    ),
    rendering("llama3_json", "meta-llama-Llama-3.2-3B-Instruct", LLAMA3, "Sunny.", text="Sunny.", name="llama text"),
    # Mistral before v11: a JSON list of calls, each with the model's id; stop at </s>.
    rendering(
        "mistral",
        "mistralai-Mistral-Nemo-Instruct-2407; mistral_common v3 and v7 alike",
        MISTRAL,
        _MISTRAL_LIST,
        calls=[WEATHER, TIME],
        ids=["abcDEF123", "xyzUVW456"],
        name="mistral nemo",
    ),
    rendering(
        "mistral",
        "mistral_common v7",
        MISTRAL,
        "Let me check." + _MISTRAL_LIST[: _MISTRAL_LIST.index(", {")] + "]",
        calls=[WEATHER],
        text="Let me check.",
        ids=["abcDEF123"],
        name="mistral v7 text",
    ),
    # Mistral v11+: [TOOL_CALLS]NAME[ARGS]{...} per call.
    rendering(
        "mistral_v11",
        "Mistral-Small-3.2-24B-Instruct-2506; mistral_common v11",
        MISTRAL,
        '[TOOL_CALLS]get_weather[CALL_ID]abcDEF123[ARGS]{"city": "Paris", "days": 3}'
        '[TOOL_CALLS]get_time[CALL_ID]xyzUVW456[ARGS]{"city": "Paris"}',
        calls=[WEATHER, TIME],
        ids=["abcDEF123", "xyzUVW456"],
        name="mistral small 3.2",
    ),
    rendering(
        "mistral_v11",
        "unsloth-mistral-Devstral-Small-2507; mistral_common v13",
        MISTRAL,
        'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
        '[TOOL_CALLS]get_time[ARGS]{"city": "Paris"}',
        calls=[WEATHER, TIME],
        text="Let me check.",
        name="devstral",
    ),
    rendering(
        "mistral_v11",
        "mistralai-Ministral-3-14B-Reasoning-2512",
        MISTRAL,
        '[THINK]Think.[/THINK]Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 3}'
        '[TOOL_CALLS]get_time[ARGS]{"city": "Paris"}',
        calls=[WEATHER, TIME],
        text="Let me check.",
        reasoning="Think.",
        name="ministral 3 reasoning",
    ),
    rendering(
        "mistral_v11",
        "mistral_common v13 (Magistral)",
        MISTRAL,
        "[THINK]Think.[/THINK]Sunny.",
        text="Sunny.",
        reasoning="Think.",
        name="magistral",
    ),
    # gpt-oss: the template writes a call back as `<|start|>assistant to=functions.NAME<|channel|>commentary
    # json<|message|>`; the model writes it as OpenAI's harmony guide shows, `<|start|>assistant<|channel|>commentary
    # to=functions.NAME <|constrain|>json<|message|>`. A call stops at <|call|>, an answer at <|return|>.
    rendering(
        "harmony",
        "openai-gpt-oss-120b",
        HARMONY,
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary json<|message|>{"city": "Paris", "days": 3}',
        calls=[WEATHER],
        reasoning="Need the weather.",
        name="gpt-oss template",
    ),
    rendering(
        "harmony",
        "openai-gpt-oss-120b, a call as the harmony guide shows it",
        HARMONY,
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}',
        calls=[WEATHER],
        reasoning="Need the weather.",
        name="gpt-oss harmony",
    ),
    rendering(
        "harmony",
        "openai-gpt-oss-120b",
        HARMONY,
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Sunny.",
        text="Sunny.",
        reasoning="Think.",
        name="gpt-oss final",
    ),
    # DeepSeek V3 and R1 (its distills write the same): a ```json fence per call, stop at <｜end▁of▁sentence｜>.
    rendering(
        "deepseek_v3",
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B (enable_thinking)",
        ("", "<｜Assistant｜><think>\n"),
        "Think.\n</think>\n\n" + _DEEPSEEK_V3_CALLS,
        calls=[WEATHER, TIME],
        reasoning="Think.",
        variables={"enable_thinking": True},
        name="deepseek r1",
    ),
    rendering(
        "deepseek_v3",
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        ("", "<｜Assistant｜><think>\n</think>"),
        "Let me check."
        + _DEEPSEEK_V3_CALLS[: _DEEPSEEK_V3_CALLS.index("\n<｜tool▁call▁begin")]
        + "<｜tool▁calls▁end｜>",
        calls=[WEATHER],
        text="Let me check.",
        name="deepseek r1 not thinking",
    ),
    rendering(
        "deepseek_v31",
        "deepseek-ai-DeepSeek-V3.1",
        ("", "<｜Assistant｜><think></think>"),
        "Let me check." + _DEEPSEEK_V31_CALLS,
        calls=[WEATHER, TIME],
        text="Let me check.",
        name="deepseek v3.1",
    ),
    rendering(
        "deepseek_v31",
        "deepseek-ai-DeepSeek-V3.1 (thinking)",
        ("", "<｜Assistant｜><think>"),
        "Think.</think>Sunny.",
        text="Sunny.",
        reasoning="Think.",
        variables={"thinking": True},
        name="deepseek v3.1 thinking",
    ),
    # GLM 4.5+: the generation prompt opens nothing (4.6) or the reasoning (4.7); stop at <|observation|>.
    rendering(
        "glm45",
        "GLM-4.6",
        ("", "<|assistant|>"),
        "\n<think>Think.</think>\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
        "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
        "<tool_call>get_time\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        calls=[WEATHER, TIME],
        text="Let me check.",
        reasoning="Think.",
        name="glm-4.6",
    ),
    rendering(
        "glm45",
        "GLM-4.6 (enable_thinking false)",
        ("/nothink", "<|assistant|>\n<think></think>"),
        "\nLet me check.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        calls=[WEATHER],
        text="Let me check.",
        variables={"enable_thinking": False},
        name="glm-4.6 not thinking",
    ),
    rendering(
        "glm45",
        "GLM-4.7-Flash",
        ("", "<|assistant|><think>"),
        "Think.</think>Let me check.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call><tool_call>get_time<arg_key>city</arg_key>"
        "<arg_value>Paris</arg_value></tool_call>",
        calls=[WEATHER, TIME],
        text="Let me check.",
        reasoning="Think.",
        name="glm-4.7",
    ),
    rendering(
        "glm45",
        "GLM-4.7-Flash (enable_thinking false)",
        ("", "<|assistant|></think>"),
        "Sunny.",
        text="Sunny.",
        variables={"enable_thinking": False},
        name="glm-4.7 not thinking",
    ),
    # Kimi K2: ids `functions.NAME:INDEX`, stop at <|im_end|>.
    rendering(
        "kimi_k2",
        "moonshotai-Kimi-K2",
        KIMI,
        "Let me check." + _KIMI_CALLS,
        calls=[WEATHER, TIME],
        text="Let me check.",
        ids=["functions.get_weather:0", "functions.get_time:1"],
        name="kimi k2",
    ),
    rendering(
        "kimi_k2",
        "Kimi-K2-Thinking (rendered in jinja2's mutable sandbox: it appends to a list)",
        KIMI,
        "<think>Think.</think>" + _KIMI_CALLS,
        calls=[WEATHER, TIME],
        reasoning="Think.",
        ids=["functions.get_weather:0", "functions.get_time:1"],
        name="kimi k2 thinking",
    ),
    # Granite 3.3 writes no call back; its system prompt asks for "<|tool_call|> followed by a JSON list of tools
    # used", which is what the model writes. Stop at <|end_of_text|>.
    rendering(
        "granite",
        "ibm-granite-granite-3.3-2B-Instruct (its tool instructions)",
        GRANITE,
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
        '{"name": "get_time", "arguments": {"city": "Paris"}}]',
        calls=[WEATHER, TIME],
        name="granite 3.3",
    ),
    # Reasoning alone: DeepSeek-R1's distills without tools.
    rendering(
        "think",
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B (enable_thinking)",
        ("", "<｜Assistant｜><think>\n"),
        "Think.\n</think>\n\nSunny.",
        text="Sunny.",
        reasoning="Think.",
        variables={"enable_thinking": True},
        name="r1 distill without tools",
    ),
]

# A short excerpt of each real template, verbatim, holding the markup `detect` finds its format by (the whole
# template was checked to give the same format), and two whose markup only looks like one of ours.
EXCERPTS = {
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("hermes", "<tool_call>"),
    "Qwen-Qwen2.5-7B-Instruct": ("hermes", '{{- \'\\n<tool_call>\\n{"name": "\' }}'),
    "Qwen-Qwen3-0.6B": ("hermes", '{{- \'<tool_call>\\n{"name": "\' }}'),
    "ibm-granite-granite-4.0": ("hermes", '{{- \'<tool_call>\\n{"name": "\' }}'),
    "Qwen3-Coder": (
        "qwen3_coder",
        "{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\n{{- '<parameter=' + args_name + '>\\n' }}",
    ),
    "Qwen3.5-4B": (
        "qwen3_coder",
        "{{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}\n{{- '<parameter=' + args_name + '>\\n' }}",
    ),
    "meta-llama-Llama-3.1-8B-Instruct (3.2-3B and 3.3-70B alike)": (
        "llama3_json",
        '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n{{- \'"parameters": \' }}',
    ),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", '{{- "[TOOL_CALLS][" }}'),
    "Mistral-Small-3.2-24B-Instruct-2506": (
        "mistral_v11",
        "{{- '[TOOL_CALLS]' + tool_call.function.name }}\n{{- '[ARGS]' + tool_call['function']['arguments']|tojson }}",
    ),
    "unsloth-mistral-Devstral-Small-2507": (
        "mistral_v11",
        "{{- \"[TOOL_CALLS]\" + tool['function']['name'] + \"[ARGS]\" + arguments }}",
    ),
    "mistralai-Ministral-3-14B-Reasoning-2512": (
        "mistral_v11",
        "{{- '[TOOL_CALLS]' }}\n{{- name + '[ARGS]' + arguments }}",
    ),
    "openai-gpt-oss-120b": (
        "harmony",
        '<|start|>assistant\n{{- "functions." + tool_call.name + "<|channel|>commentary " }}',
    ),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        "deepseek_v3",
        "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
        "'```json' + '\\n' + tool['function']['arguments'] | tojson + '\\n' + '```' + '<｜tool▁call▁end｜>'}}",
    ),
    "deepseek-ai-DeepSeek-V3.1": (
        "deepseek_v31",
        "{%- else -%}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' + "
        "tool['function']['arguments'] | tojson + '<｜tool▁call▁end｜>'}}",
    ),
    "GLM-4.6": ("glm45", "<arg_key>{{ k }}</arg_key>"),
    "GLM-4.7-Flash": (
        "glm45",
        "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>",
    ),
    "moonshotai-Kimi-K2": (
        "kimi_k2",
        "<|tool_call_begin|>{{ formatted_id }}<|tool_call_argument_begin|>"
        "{{ tool_call['function']['arguments'] | tojson}}<|tool_call_end|>",
    ),
    "ibm-granite-granite-3.3-2B-Instruct": (
        "granite",
        "When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON "
        "list of tools used.",
    ),
    # Seed-OSS writes <seed:tool_call> around Qwen3-Coder's inner markup; functionary v3.1 writes <function=NAME>
    # after Llama 3's <|python_tag|>: neither is a format of ours.
    "ByteDance-Seed-OSS": (
        None,
        '{{ "\\n" + toolcall_begin_token + "\\n<function=" + tool_call.name + ">\\n" }}\n'
        '{{ "<parameter=" + arg_name + ">" }}\n{%- set toolcall_begin_token   = \'<seed:tool_call>\'         -%}',
    ),
    "meetkai-functionary-medium-v3.1": (
        None,
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{{ '<|python_tag|>' + tool_call['function']['arguments'] | tojson }}",
    ),
}
