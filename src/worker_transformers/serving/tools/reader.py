"""Tool calls: whether this model can be offered tools, and its answer read back as calls while it streams.

The tools reach the model through its own chat template (`apply_chat_template(tools=...)`). Its answer is read
with transformers' response parsing: a `response_template` (tokenizer_config.json's, else the one transformers'
own server keeps for the model's family: Qwen 2 to 3.5, Gemma 4) says which markup opens and closes a call, and
transformers' `ResponseParser` reads the text as it comes, holding back what may be the start of a call, so a
call's markup never streams as text.

A required call (tool_choice `required` or a function by name) is forced while decoding, as vLLM does: the answer
is JSON under a schema made from the tools (`forced_call_schema`, enforced by grammar.py), the named function's
arguments or a list of calls, so it needs no markup to read and comes whatever the model's own call format.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_parsing import ResponseParser

from worker_transformers.serving.schema import GenerationRequest, RequestError

# A tool the check below offers the template: its name shows in the prompt exactly when the template shows tools.
_PROBE = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "-", "parameters": {}}}
_REASONING_FIELDS = ("reasoning_content", "thinking")


class ToolCallFailed(RuntimeError):
    """The model's answer to a request with tools could not be read as calls. `code` names why, for the OpenAI
    error."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# A call streams as a CallStart (its id and name, as soon as they are known), then CallArguments (fragments of its
# arguments, as they are generated: none for formats whose arguments are not JSON as written), then the whole Call
# once it has ended. The fragments sent are always the start of the Call's arguments; whoever streamed them sends
# the rest (`Call.arguments[len(sent):]`), so a whole answer and a streamed one always agree.


@dataclass(frozen=True)
class CallStart:
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    text: str  # the next fragment of the current call's arguments (JSON text)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Reasoning:
    text: str


Piece = str | Reasoning | CallStart | CallArguments | Call  # a str is answer text


@dataclass(frozen=True)
class ToolFormat:
    """What this model's files say about tools: whether its template shows them and how to read its calls."""

    renders_tools: bool
    response_template: dict[str, Any] | None
    model_type: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, model_type: str) -> ToolFormat:
        # Looked up only for a template that shows tools: transformers' table costs its server's imports (~0.6 s).
        renders = _renders_tools(tokenizer)
        return cls(renders, known_response_template(tokenizer, model_type) if renders else None, model_type)

    def check(self, request: GenerationRequest) -> None:
        """Refuse, naming `tools`, a request this model cannot serve with tools."""
        if not request.calls_tools:
            return
        if not self.renders_tools:
            raise RequestError(
                "tools: this model's chat template does not show tools to the model; use a model whose template "
                "supports tools, or set CHAT_TEMPLATE to one that does"
            )
        if self.response_template is None and request.required_tool is None:
            raise RequestError(
                f"tools: transformers has no response_template to read this model's ({self.model_type}) tool calls; "
                "add one to its tokenizer_config.json, send tool_choice 'required' or a function, or use a model "
                "that has one"
            )


def _renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return False
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tools=[_PROBE], add_generation_prompt=True, tokenize=False
        )
    except TemplateError:
        return False
    return _PROBE["function"]["name"] in text


def known_response_template(tokenizer: PreTrainedTokenizerBase, model_type: str) -> dict[str, Any] | None:
    """The tokenizer's response_template, else the one transformers keeps for `model_type`'s family, else None."""
    if getattr(tokenizer, "response_template", None) is not None:
        return tokenizer.response_template
    # transformers' own server keeps the templates of the families whose tokenizers ship none; it reads them by
    # the model's type, the only thing of the model it looks at.
    from types import SimpleNamespace

    from transformers.cli.serving.utils import get_response_template

    return get_response_template(tokenizer, SimpleNamespace(config=SimpleNamespace(model_type=model_type)))


def forced_call_schema(request: GenerationRequest) -> dict[str, Any]:
    """The JSON Schema of a required call's answer: the named function's arguments, or a list of calls of any of
    the tools (`{"name": ..., "arguments": {...}}` each)."""

    def parameters(tool) -> dict[str, Any]:
        return tool.function.parameters or {"type": "object"}

    required = request.required_tool
    if required != "*":
        [tool] = [t for t in request.tools if t.function.name == required]
        return parameters(tool)
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in request.tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}}


class ForcedCallReader:
    """Reads the answer to a required call: JSON under `forced_call_schema`, read once it is whole."""

    def __init__(self, request: GenerationRequest) -> None:
        self.required = request.required_tool
        self._text: list[str] = []

    def feed(self, text: str) -> list[Piece]:
        self._text.append(text)
        return []

    def finish(self, finish_reason: str) -> list[Piece]:
        if finish_reason == "length":  # cut short by max_tokens: no whole call came
            return []
        try:
            value = json.loads("".join(self._text))
        except json.JSONDecodeError as error:
            raise _unreadable(error) from None
        if self.required != "*":
            return [_call(self.required, value)]
        return [_call(call["name"], call["arguments"]) for call in value]


def call_reader(fmt: ToolFormat, request: GenerationRequest, prompt: str) -> CallReader | ForcedCallReader | None:
    """What reads this request's answer for tool calls; None when it calls none."""
    if not request.calls_tools:
        return None
    if request.required_tool is not None:
        return ForcedCallReader(request)
    return CallReader(fmt, request, prompt)


class CallReader:
    """Reads one answer's text, as it streams, into answer text, reasoning and the tool calls the model chose to
    make (tool_choice `auto`), by the model's own call markup."""

    def __init__(self, fmt: ToolFormat, request: GenerationRequest, prompt: str) -> None:
        self.parser = ResponseParser(fmt.response_template, prefix=prompt, tools=request.template_tools())

    def feed(self, text: str) -> list[Piece]:
        try:
            return self._pieces(self.parser.feed(text))
        except ValueError as error:
            raise _unreadable(error) from None

    def finish(self, finish_reason: str) -> list[Piece]:
        try:
            _, events = self.parser.finalize()
        except ValueError as error:
            if finish_reason == "length":  # a call cut short by max_tokens: the answer is what came before it
                return []
            raise _unreadable(error) from None
        return self._pieces(events)

    def _pieces(self, events: list[dict[str, Any]]) -> list[Piece]:
        pieces: list[Piece] = []
        for event in events:
            field = event.get("field")
            if event["type"] == "region_chunk" and not event["dirty"] and event["text"]:
                if field == "content":
                    pieces.append(event["text"])
                elif field in _REASONING_FIELDS:
                    pieces.append(Reasoning(event["text"]))
            elif event["type"] == "region_close" and field == "tool_calls":
                pieces.append(self._call(event["value"]))
        return pieces

    def _call(self, value: Any) -> Call:
        function = value.get("function") if isinstance(value, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolCallFailed(f"the model's tool call has no function name: {value!r}"[:300], "invalid_tool_call")
        return _call(function["name"], function.get("arguments", {}))


def _call(name: str, arguments: Any) -> Call:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return Call(f"call_{uuid.uuid4().hex[:24]}", name, text)


def _unreadable(error: ValueError) -> ToolCallFailed:
    first_line = (str(error).splitlines() or [""])[0][:200]
    return ToolCallFailed(f"the model's tool call could not be read ({first_line}); retry", "invalid_tool_call")
