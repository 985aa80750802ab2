"""The formats models write tool calls and reasoning in, each as a response template (transformers' declarative
format, read by its ResponseParser: reader.py), and the choice of the one a model's answers are read with.

RESPONSE_TEMPLATE=auto takes, in order: the tokenizer's own `response_template`; transformers' template for the
model's family (it keeps them for Qwen 2/3/3.5 and Gemma 4); one of FORMATS, found from the markup its chat
template writes (`detect`). A format's name, or a JSON file, forces one; `none` reads nothing.

A format here says nothing of where the model's answer starts: `_anchored` adds it from the chat template itself
(its generation prompt), so one format serves every template that writes that markup (Hermes calls in a ChatML or
a Llama 3 turn alike). Markers are matched as the text shows them, special tokens included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from worker_transformers.config import ConfigError, names_a_file

log = logging.getLogger("worker_transformers")

# A tool offered to a template to see what it does with tools: its name shows in the prompt exactly when the
# template shows tools.
PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "-", "parameters": {}}}
# Mistral's templates take a call's id back only as 9 letters and digits ("Tool call IDs should be alphanumeric
# strings with length 9!"): a template with this marker gets such ids.
NINE_CHARACTER_IDS_MARK = "[TOOL_CALLS]"

# Reasoning in <think>: the whitespace around its markers is markup (templates write `\n<think>` and
# `</think>\n\n`), neither reasoning nor the answer's text.
_THINK = {"open_pattern": r"\s*<think>\s*", "close_pattern": r"\s*</think>\s*", "content": "text"}
_CONTENT = {"content": "text"}  # the implicit field: text outside every marked region


def _call(name: str = "{name}", arguments: str = "{content}", **extra: str) -> dict[str, Any]:
    """A transform that shapes a call whose name (and maybe id) the markup captured, its arguments the region."""
    return {"type": "function", **extra, "function": {"name": name, "arguments": arguments}}


# The end of a call that may be a section's last: the section's end, or (unread) the next call, or the answer's end.
# Not an optional `(?:END)?`: the regex module prefers a whole match to a partial one, so it would close the call
# before END has come whole, and END would then be read as text.
_LAST_CALL = r"(?:\s*{end}|(?=\s*{next})|\s*\Z)"
_DEEPSEEK_CALL_END = r"<｜tool▁call▁end｜>" + _LAST_CALL.format(
    end="<｜tool▁calls▁end｜>", next="<｜tool▁call▁begin｜>"
)

# Each format by name: its fields, in transformers' response-template shape, without a start anchor. A leading \s*
# in an open pattern swallows the whitespace between calls, which would otherwise open an empty text region.
FORMATS: dict[str, dict[str, Any]] = {
    # Hermes (NousResearch), Qwen 2.5/3, SmolLM3, Granite 4 and this project's chatml_tools.jinja: a JSON call per
    # <tool_call> block, reasoning in <think>.
    "hermes": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*<tool_call>",
                "close": "</tool_call>",
                "repeats": True,
                "content": "json",
            },
            "content": _CONTENT,
        }
    },
    # Qwen3-Coder (and Qwen 3.5): XML calls, one <parameter=KEY> per argument, cast by the tool's schema.
    "qwen3_coder": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*<tool_call>\s*<function=(?P<name>[^>\n]+)>",
                "close_pattern": r"</function>\s*</tool_call>",
                "repeats": True,
                "content": "xml-inline",
                "content_args": {"tag_pattern": r"<parameter=(?P<key>[^>\n]+)>\n?(?P<value>.*?)\n?</parameter>"},
                "transform": _call(),
            },
            "content": _CONTENT,
        }
    },
    # Llama 3.1-3.3: an answer that is one JSON call, `{"name": ..., "parameters": {...}}`, maybe after
    # <|python_tag|>; it ends with the turn.
    "llama3_json": {
        "fields": {
            "tool_calls": {
                "open_pattern": r"\A\s*(?:<\|python_tag\|>)?\s*(?=\{)",
                "content": "json",
            },
            "content": _CONTENT,
        }
    },
    # Mistral (tokenizers before v11: Mistral 7B v0.3, Mixtral, Nemo): a JSON list of calls after [TOOL_CALLS].
    "mistral": {
        "fields": {
            "tool_calls": {"open_pattern": r"\s*\[TOOL_CALLS\]\s*", "content": "json"},
            "content": _CONTENT,
        }
    },
    # Mistral's v11+ tokenizers (Mistral Small 3.2, Magistral, Devstral): [TOOL_CALLS]NAME[ARGS]{...} per call
    # (an id after [CALL_ID] in some), each ended by the next call or the turn; reasoning in [THINK].
    "mistral_v11": {
        "fields": {
            "reasoning_content": {"open": "[THINK]", "close": "[/THINK]", "content": "text"},
            "tool_calls": {
                "open_pattern": r"\s*\[TOOL_CALLS\](?P<name>[^\[\]]+?)(?:\[CALL_ID\](?P<id>[^\[\]]+?))?\[ARGS\]",
                "close_pattern": r"(?=\[TOOL_CALLS\])",
                "repeats": True,
                "content": "json",
                "transform": _call(),
            },
            "content": _CONTENT,
        }
    },
    # gpt-oss (OpenAI's harmony): every message names its channel. `analysis` is reasoning, `final` (and a
    # `commentary` preamble) the answer, `commentary to=functions.NAME` a call, the recipient before the channel
    # (as its template writes a call back) or after it (as the model writes one), its content type (`json`,
    # `<|constrain|>json`) before <|message|>. Text between messages is markup.
    "harmony": {
        "fields": {
            "reasoning_content": {
                "open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>analysis<\|message\|>",
                "close_pattern": r"<\|end\|>",
                "content": "text",
            },
            "tool_calls": {
                "open_pattern": r"(?:<\|start\|>assistant)?"
                r"(?: to=functions\.(?P<name>[^\s<]+)\s*<\|channel\|>commentary"
                r"|<\|channel\|>commentary to=functions\.(?P<name>[^\s<]+))[^<]*(?:<\|constrain\|>[^<]*)?<\|message\|>",
                "close_pattern": r"<\|call\|>|<\|end\|>",
                "repeats": True,
                "content": "json",
                "transform": _call(),
            },
            "content": {
                "open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>(?:final|commentary)<\|message\|>",
                "close_pattern": r"<\|end\|>|<\|return\|>",
                "content": "text",
            },
        }
    },
    # DeepSeek V3 and R1: `function<｜tool▁sep｜>NAME` then the arguments in a ```json fence, per call.
    "deepseek_v3": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*(?:<｜tool▁calls▁begin｜>)?\s*<｜tool▁call▁begin｜>function<｜tool▁sep｜>"
                r"(?P<name>[^\n<]+)\n```(?:json)?\n",
                "close_pattern": r"\s*```\s*" + _DEEPSEEK_CALL_END,
                "repeats": True,
                "content": "json",
                "transform": _call(),
            },
            "content": _CONTENT,
        }
    },
    # DeepSeek V3.1 and later: `NAME<｜tool▁sep｜>{...}` per call.
    "deepseek_v31": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*(?:<｜tool▁calls▁begin｜>)?\s*<｜tool▁call▁begin｜>(?P<name>[^<]+?)<｜tool▁sep｜>",
                "close_pattern": _DEEPSEEK_CALL_END,
                "repeats": True,
                "content": "json",
                "transform": _call(),
            },
            "content": _CONTENT,
        }
    },
    # GLM 4.5 and later: <tool_call>NAME then <arg_key>/<arg_value> pairs, cast by the tool's schema.
    "glm45": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*<tool_call>\s*(?P<name>[^\s<]+)",
                "close": "</tool_call>",
                "repeats": True,
                "content": "xml-inline",
                "content_args": {
                    "tag_pattern": r"<arg_key>(?P<key>.*?)</arg_key>\s*<arg_value>(?P<value>.*?)</arg_value>"
                },
                "transform": _call(),
            },
            "content": _CONTENT,
        }
    },
    # Kimi K2: each call's id is `functions.NAME:INDEX`, which its template expects back.
    "kimi_k2": {
        "fields": {
            "reasoning_content": _THINK,
            "tool_calls": {
                "open_pattern": r"\s*(?:<\|tool_calls_section_begin\|>)?\s*<\|tool_call_begin\|>\s*"
                r"(?P<id>(?:functions\.)?(?P<name>[^\s:<]+):\d+)\s*<\|tool_call_argument_begin\|>",
                "close_pattern": r"<\|tool_call_end\|>"
                + _LAST_CALL.format(end=r"<\|tool_calls_section_end\|>", next=r"<\|tool_call_begin\|>"),
                "repeats": True,
                "content": "json",
                "transform": _call(id="{id}"),
            },
            "content": _CONTENT,
        }
    },
    # Granite 3.x: a JSON list of calls after <|tool_call|>.
    "granite": {
        "fields": {
            "tool_calls": {"open_pattern": r"\s*<\|tool_call\|>\s*", "content": "json"},
            "content": _CONTENT,
        }
    },
    # Reasoning alone, in <think> (DeepSeek-R1's distilled models, and any thinking model without tools).
    "think": {"fields": {"reasoning_content": _THINK, "content": _CONTENT}},
}

# The markup each format's chat template writes, most specific first: the first format all of whose marks a chat
# template holds is its format.
_MARKS: list[tuple[str, tuple[str, ...]]] = [
    ("harmony", ("<|start|>assistant", "<|channel|>")),  # gpt-oss's writes `to=` and `functions.` apart
    ("kimi_k2", ("<|tool_call_begin|>",)),
    ("deepseek_v3", ("<｜tool▁call▁begin｜>", "```json")),
    ("deepseek_v31", ("<｜tool▁call▁begin｜>",)),
    ("glm45", ("<arg_key>",)),
    ("qwen3_coder", ("<tool_call>", "<function=", "<parameter=")),  # not Seed-OSS's <seed:tool_call>
    ("mistral_v11", ("[TOOL_CALLS]", "[ARGS]")),
    ("mistral", ("[TOOL_CALLS]",)),
    ("granite", ("<|tool_call|>",)),
    ("llama3_json", ("<|start_header_id|>", '"parameters": ')),  # not <|python_tag|> alone: functionary's has it
    ("hermes", ("<tool_call>",)),
    ("think", ("<think>",)),
]


# The chat template applied to messages and tools, with or without the generation prompt. At startup it renders in
# the renderer's children, bounded in time (serving/renderer.py): a template may loop on the probes below.
Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None, bool], str]


def in_process(tokenizer: Any) -> Render:
    """The chat template rendered here, unbounded: for a template known to finish (tests, tools of this project)."""
    return lambda messages, tools, ask: tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=ask, tokenize=False
    )


@dataclass(frozen=True)
class AnswerFormat:
    template: dict[str, Any]
    source: str  # where it came from, for the log


def detect(chat_template: str | None) -> str | None:
    """The format whose markup `chat_template` writes, if any."""
    if not chat_template:
        return None
    return next((name for name, marks in _MARKS if all(mark in chat_template for mark in marks)), None)


def check(setting: str) -> None:
    """Refuse, naming RESPONSE_TEMPLATE, a setting that names no format or a file that holds no response template:
    startup checks it before the model loads, since choosing needs the chat template rendered."""
    if setting in ("auto", "none") or setting in FORMATS:
        return
    if names_a_file(setting):
        _read_file(Path(setting))
    else:
        _named_by_model_type(setting)


def choose(setting: str, tokenizer: Any, model_type: str, render: Render | None = None) -> AnswerFormat | None:
    """The response template this model's answers are read with, by RESPONSE_TEMPLATE (config.py). `render`: how
    the chat template is applied to find where answers start (in this process when not given)."""
    render = render or in_process(tokenizer)
    if setting == "none":
        return None
    if setting == "auto":
        return _automatic(tokenizer, model_type, render)
    if names_a_file(setting):
        return AnswerFormat(_read_file(Path(setting)), f"the response template in {setting} (RESPONSE_TEMPLATE)")
    if setting in FORMATS:
        return AnswerFormat(_anchored(FORMATS[setting], render), f"the {setting} format (RESPONSE_TEMPLATE)")
    template = _named_by_model_type(setting)
    return AnswerFormat(template, f"transformers' response template for {setting} (RESPONSE_TEMPLATE)")


def _named_by_model_type(setting: str) -> dict[str, Any]:
    """transformers' response template for the model type RESPONSE_TEMPLATE names; ConfigError when it keeps none."""
    template = _transformers_template(setting)
    if template is None:
        raise ConfigError(
            f"RESPONSE_TEMPLATE={setting!r} names no format; use auto, none, one of {', '.join(FORMATS)}, a model "
            "type transformers keeps a response template for (qwen3, gemma4, ...), or the path of a JSON file"
        )
    return template


def _automatic(tokenizer: Any, model_type: str, render: Render) -> AnswerFormat | None:
    own = getattr(tokenizer, "response_template", None)
    if own is not None:
        return AnswerFormat(own, "the tokenizer's own response_template")
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    found = detect(chat_template)
    # transformers' templates live in its serving CLI, a quarter second of imports: looked up only for a model
    # whose template shows tools or reasoning.
    if (found or (chat_template and "tool" in chat_template)) and (
        template := _transformers_template(model_type)
    ) is not None:
        return AnswerFormat(template, f"transformers' response template for {model_type}")
    if found is not None:
        return AnswerFormat(_anchored(FORMATS[found], render), f"the {found} format, found in the chat template")
    return None


def _transformers_template(model_type: str) -> dict[str, Any] | None:
    try:
        from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS as fallbacks
    except ImportError:  # a transformers without them (or without its serving extras): this project's formats
        return None
    return next((template for types, template in fallbacks.items() if model_type in types), None)


def _read_file(path: Path) -> dict[str, Any]:
    from transformers.utils.chat_parsing.response_templates import load_response_template

    try:
        template = json.loads(path.read_text(encoding="utf-8"))
        load_response_template(template)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, regex.error) as error:
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise ConfigError(
            f"RESPONSE_TEMPLATE={str(path)!r}: not a valid response template ({first_line}); see transformers' "
            "response_template format"
        ) from None
    return template


def _anchored(fields: dict[str, Any], render: Render) -> dict[str, Any]:
    """A format anchored where this model's answers begin: at its chat template's generation prompt, cut before
    any reasoning marker in it, so that a prompt that opens (or skips) the reasoning is read as the model's own
    start. Without a generation prompt, the answer starts where the prompt ends."""
    start = _generation_prompt(render)
    reasoning = fields["fields"].get("reasoning_content")
    if start and reasoning is not None:
        markers = [_marker(reasoning, "open"), _marker(reasoning, "close")]
        cuts = [m.start() for m in (regex.search(marker, start) for marker in markers if marker) if m]
        start = start[: min(cuts, default=len(start))]
    if not start or not start.strip():
        return {**fields, "start_anchor_pattern": r"\Z"}
    pattern = regex.escape(start)
    if reasoning is not None and (close := _marker(reasoning, "close")):
        pattern += f"(?:{close})?"  # a prompt that closes the reasoning unopened (thinking off) opens the answer
    return {**fields, "start_anchor_pattern": pattern}


def _marker(field: dict[str, Any], end: str) -> str | None:
    """A field's open or close marker as a pattern."""
    if f"{end}_pattern" in field:
        return field[f"{end}_pattern"]
    literal = field.get(end)
    if literal is None:
        return None
    literals = [literal] if isinstance(literal, str) else literal
    return "|".join(regex.escape(text) for text in literals)


def _generation_prompt(render: Render) -> str | None:
    """What the chat template adds to a chat to ask for the assistant's answer."""
    chat = [{"role": "user", "content": "Hi"}]
    failure = None
    for tools in (None, [PROBE_TOOL]):  # some templates render only with tools (Hermes 3's loops over them)
        try:
            asked, plain = render(chat, tools, True), render(chat, tools, False)
        except Exception as error:  # noqa: BLE001 - the template's refusal, a render stopped at its time limit, ...
            failure = error
            continue
        return asked[len(plain) :] if asked.startswith(plain) else None
    log.warning("the chat template could not render a probe chat (%s); answers are read from the prompt's end", failure)
    return None
