"""Tool calls and reasoning: whether this model can be offered tools, and its answer read back as text, reasoning
and calls while it streams.

The tools reach the model through its own chat template (`apply_chat_template(tools=...)`). Its answer is read
with transformers' response parsing: a `response_template` (formats.py chooses it: the tokenizer's own, transformers'
for the model's family, or a known format found in the chat template's markup) says which markup opens and closes
reasoning and a call, and transformers' `ResponseParser` reads the text as it comes, holding back what may be the
start of a marker, so markup never streams as text. A call whose arguments are JSON streams as it is written: its
name first, then its arguments as they grow (arguments.py), as OpenAI streams calls.

A required call (tool_choice `required` or a function by name) is forced while decoding, as vLLM does: the answer
is JSON under a schema made from the tools (`forced_call_schema`, enforced by grammar.py), the named function's
arguments or a list of calls, so it needs no markup to read and comes whatever the model's own call format.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_parsing import ResponseParser
from transformers.utils.chat_parsing.response_templates import ResponseTemplate, load_response_template

from worker_transformers.serving.schema import GenerationRequest, RequestError
from worker_transformers.serving.tools.arguments import CallScanner
from worker_transformers.serving.tools.formats import NINE_CHARACTER_IDS_MARK, PROBE_TOOL, Render, choose, in_process

log = logging.getLogger("worker_transformers")

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


def new_call_id(nine_characters: bool = False) -> str:
    """A call's id: OpenAI's shape, or 9 letters and digits for a template that takes only those back."""
    if nine_characters:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolFormat:
    """What this model's files say about its answers: whether its template shows tools, and the response template
    its answers are read with (formats.py chooses it), if any."""

    renders_tools: bool
    response_template: dict[str, Any] | None
    model_type: str
    nine_character_ids: bool = False  # the template takes call ids back only as 9 letters and digits (Mistral)

    @classmethod
    def of(
        cls, tokenizer: PreTrainedTokenizerBase, model_type: str, setting: str = "auto", render: Render | None = None
    ) -> ToolFormat:
        """The model's, by RESPONSE_TEMPLATE. `render` applies the chat template to the probes (formats.Render): at
        startup in the renderer's children, bounded in time; in this process when not given."""
        render = render or in_process(tokenizer)
        chosen = choose(setting, tokenizer, model_type, render)
        if chosen is not None:
            log.info("answers are read for reasoning and tool calls with %s", chosen.source)
        nine = NINE_CHARACTER_IDS_MARK in str(tokenizer.chat_template or "")
        shows_tools = bool(tokenizer.chat_template) and _renders_tools(render)
        return cls(shows_tools, chosen.template if chosen else None, model_type, nine)

    @classmethod
    def reading_nothing(cls, model_type: str) -> ToolFormat:
        """A format that reads nothing and takes no tools (before startup has chosen the model's)."""
        return cls(False, None, model_type)

    def new_call_id(self) -> str:
        return new_call_id(self.nine_character_ids)

    def check(self, request: GenerationRequest) -> None:
        """Refuse, naming `tools`, a request this model cannot serve with tools."""
        if not request.calls_tools:
            return
        if not self.renders_tools:
            raise RequestError(
                "tools: this model's chat template does not show tools to the model; use a model whose template "
                "supports tools, or set CHAT_TEMPLATE to one that does"
            )
        if self.calls_template is None and request.required_tool is None:
            raise RequestError(
                f"tools: no response template reads this model's ({self.model_type}) tool calls; set "
                "RESPONSE_TEMPLATE to its format (see the README's list) or to a JSON file, or send tool_choice "
                "'required' or a function"
            )

    @property
    def calls_template(self) -> dict[str, Any] | None:
        """The response template that reads tool calls, when this model's has a field for them."""
        template = self.response_template
        return template if template is not None and "tool_calls" in template["fields"] else None

    @property
    def plain_template(self) -> dict[str, Any] | None:
        """The response template for an answer to a chat without tools: its tool calls are not read (they would
        be calls of no tool), and None when what is left reads nothing (no reasoning, content as it comes)."""
        template = self.response_template
        if template is None:
            return None
        fields = {name: spec for name, spec in template["fields"].items() if name != "tool_calls"}
        reads = any(name in _REASONING_FIELDS for name in fields) or any(
            "open" in spec or "open_pattern" in spec for spec in fields.values()
        )
        return {**template, "fields": fields} if reads else None


def _renders_tools(render: Render) -> bool:
    try:
        text = render([{"role": "user", "content": "Hi"}], [PROBE_TOOL], True)
    except Exception as error:  # noqa: BLE001 - the template's refusal, or a render stopped at its time limit
        log.warning("the chat template could not render a chat with tools (%s): tools are refused", error)
        return False
    return PROBE_TOOL["function"]["name"] in text


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
    most = {} if request.parallel_tool_calls else {"maxItems": 1}
    return {"type": "array", "minItems": 1, **most, "items": {"anyOf": calls}}


class _CallStream:
    """The calls of one stretch of JSON text as they are written: a CallStart for each once its name is known, then
    CallArguments as its arguments grow (arguments.py scans them), and at the end each whole Call, whose arguments
    are the text that streamed when there is one."""

    def __init__(
        self,
        scanner: CallScanner | None,
        new_id: Callable[[], str],
        start: CallStart | None = None,
        most: int | None = None,
    ) -> None:
        self.scanner = scanner
        self.new_id = new_id
        self.most = most  # the calls taken from this stretch (parallel_tool_calls false): later ones are dropped
        self.starts: list[CallStart] = [start] if start is not None else []
        self.sent: list[int] = [0] * len(self.starts)  # characters of each started call's arguments streamed

    def feed(self, text: str) -> list[Piece]:
        if self.scanner is None:
            return []
        self.scanner.feed(text)
        pieces: list[Piece] = []
        for i, scanned in enumerate(self.scanner.calls[: self.most]):
            if i == len(self.starts):
                if scanned.name is None:
                    break
                self.starts.append(CallStart(self.new_id(), scanned.name))
                self.sent.append(0)
                pieces.append(self.starts[i])
            arguments = self.scanner.arguments(scanned)
            if len(arguments) > self.sent[i]:
                pieces.append(CallArguments(arguments[self.sent[i] :]))
                self.sent[i] = len(arguments)
        return pieces

    def close(self, values: list[dict[str, Any]]) -> list[Piece]:
        """The whole calls, read by the parser: `{"name", "arguments"}` each."""
        pieces: list[Piece] = []
        for i, value in enumerate(values[: self.most]):
            if i == len(self.starts):
                self.starts.append(CallStart(value.get("id") or self.new_id(), value["name"]))
                self.sent.append(0)
                pieces.append(self.starts[i])
            arguments = self._written(i) or _arguments_text(value["arguments"])
            if not arguments.startswith(self._streamed(i)):
                message = "the model's tool call could not be read (its arguments changed); retry"
                raise ToolCallFailed(message, "invalid_tool_call")
            pieces.append(Call(self.starts[i].id, value["name"], arguments))
        return pieces

    def cut(self) -> list[Piece]:
        """The calls begun when the answer was cut short (max_tokens): each as far as it got, as OpenAI gives a call
        cut short, so that a whole answer shows what its stream showed."""
        return [Call(start.id, start.name, self._streamed(i)) for i, start in enumerate(self.starts)]

    def _streamed(self, i: int) -> str:
        return self.scanner.arguments(self.scanner.calls[i])[: self.sent[i]] if self.sent[i] else ""

    def _written(self, i: int) -> str | None:
        """Call i's arguments exactly as written, when they were JSON (an object) and are whole."""
        if self.scanner is None or i >= len(self.scanner.calls):
            return None
        scanned = self.scanner.calls[i]
        if scanned.arguments_end is None or scanned.arguments_are_text:
            return None
        text = self.scanner.arguments(scanned)
        try:
            return text if isinstance(json.loads(text), dict) else None
        except json.JSONDecodeError:
            return None


class ForcedCallReader:
    """Reads the answer to a required call: JSON under `forced_call_schema`, the named function's arguments or a
    list of calls, streamed as it is written."""

    def __init__(self, request: GenerationRequest, new_id: Callable[[], str] = new_call_id) -> None:
        self.required = request.required_tool
        self._text: list[str] = []
        named = self.required != "*"
        scanner = CallScanner(name=self.required if named else None)
        self._calls = _CallStream(scanner, new_id, CallStart(new_id(), self.required) if named else None)
        self._begun = False

    def feed(self, text: str) -> list[Piece]:
        self._text.append(text)
        pieces = self._calls.feed(text)
        if not self._begun and self._calls.starts:  # the named call's start, before its first fragment
            self._begun = True
            if self.required != "*":
                pieces.insert(0, self._calls.starts[0])
        return pieces

    def finish(self, finish_reason: str) -> list[Piece]:
        pieces = self.feed("")
        if finish_reason == "length":  # cut short by max_tokens: no whole call came
            return pieces + self._calls.cut()
        try:
            value = json.loads("".join(self._text))
        except json.JSONDecodeError as error:
            raise _unreadable(error) from None
        if self.required != "*":
            return pieces + self._calls.close([{"name": self.required, "arguments": value}])
        return pieces + self._calls.close([{"name": call["name"], "arguments": call["arguments"]} for call in value])


def call_reader(
    fmt: ToolFormat | None, request: GenerationRequest, prompt: str
) -> CallReader | ForcedCallReader | None:
    """What reads this request's answer; None when its text is its answer as it comes: a prompt to continue, or a
    chat whose model's answers have nothing to read (no reasoning, no tool calls asked for)."""
    if request.required_tool is not None:
        return ForcedCallReader(request, fmt.new_call_id if fmt is not None else new_call_id)
    if request.messages is None or fmt is None:
        return None
    if request.calls_tools:
        return CallReader(fmt.calls_template, request, prompt, fmt.new_call_id)
    template = fmt.plain_template
    return CallReader(template, request, prompt, fmt.new_call_id) if template is not None else None


class CallReader:
    """Reads one answer's text, as it streams, into answer text, reasoning and the tool calls the model chose to
    make (tool_choice `auto`), by the model's own markup (a response template). The text must keep the special
    tokens (`keeps_special_tokens`): many formats' markers are special tokens."""

    keeps_special_tokens = True

    def __init__(
        self,
        template: dict[str, Any],
        request: GenerationRequest,
        prompt: str,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        loaded = load_response_template(template)  # its patterns compiled once, for the anchor and the parser
        self.parser = _Parser(loaded, prefix=_answer_start(loaded, prompt), tools=request.template_tools())
        self.new_id = new_id
        self._shape = _json_shape(template["fields"].get("tool_calls"))
        self._calls: _CallStream | None = None  # the tool-call region open now
        self._room = None if request.parallel_tool_calls else 1  # the calls still taken, when limited

    def feed(self, text: str) -> list[Piece]:
        try:
            return self._pieces(self.parser.feed(text))
        except ValueError as error:
            raise _unreadable(error) from None

    def finish(self, finish_reason: str) -> list[Piece]:
        try:
            _, events = self.parser.finalize()
        except ValueError as error:
            if finish_reason == "length":  # a call cut short by max_tokens: it ends as far as it got
                return self._calls.cut() if self._calls is not None else []
            raise _unreadable(error) from None
        return self._pieces(events)

    def _pieces(self, events: list[dict[str, Any]]) -> list[Piece]:
        pieces: list[Piece] = []
        for event in events:
            field = event.get("field")
            if field == "tool_calls":
                pieces += self._call_pieces(event)
            elif event["type"] == "region_chunk" and not event["dirty"] and event["text"]:
                if field == "content":
                    pieces.append(event["text"])
                elif field in _REASONING_FIELDS:
                    pieces.append(Reasoning(event["text"]))
        return pieces

    def _call_pieces(self, event: dict[str, Any]) -> list[Piece]:
        if event["type"] == "region_open":
            if self._room == 0:  # parallel_tool_calls false, and the one call made: the rest are dropped
                self._calls = None
                return []
            captures = event.get("captures", {})
            name = captures.get("name")
            start = CallStart(captures.get("id") or self.new_id(), name.strip()) if name else None
            scanner = CallScanner(name=start.name) if self._shape == "arguments" and start else None
            scanner = scanner or (CallScanner() if self._shape == "calls" else None)
            self._calls = _CallStream(scanner, self.new_id, start, self._room)
            return [start] if start is not None else []
        if self._calls is None:  # a region the parser closed without opening it: nothing to add
            return []
        if event["type"] == "region_chunk":
            return self._calls.feed(event["text"])
        calls, self._calls = self._calls, None
        pieces = calls.close([_function(value) for value in _listed(event["value"])])
        if self._room is not None:
            self._room -= sum(isinstance(piece, Call) for piece in pieces)
        return pieces


def _answer_start(template: ResponseTemplate, prompt: str) -> str:
    """The prompt from the last place the template's start anchor finds, which the parser reads as the start of the
    answer (a prefill that opens the reasoning, say); nothing of it when the anchor is not there, so that what the
    prompt holds is never read as the answer (transformers' parser would read all of it)."""
    found = None
    for found in template.start_anchor_re.finditer(prompt):
        pass
    return prompt[found.start() :] if found is not None else ""


def _json_shape(spec: dict[str, Any] | None) -> str | None:
    """How a format's tool-call regions can stream: `calls` (JSON call objects, the name inside), `arguments`
    (the name in the markup, the arguments JSON as written), None (read only when the call has ended)."""
    if spec is None or spec.get("content", "text") != "json" or spec.get("content_args"):
        return None
    transform = spec.get("transform")
    function = transform.get("function") if isinstance(transform, dict) else None
    if transform is None or function == "{content}":
        return "calls"
    if isinstance(function, dict) and function.get("arguments") == "{content}" and function.get("name") == "{name}":
        return "arguments"
    return None


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _function(value: Any) -> dict[str, Any]:
    """A parsed call as `{"name", "arguments", "id"?}`, whichever way the format shaped it."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolCallFailed(f"the model's tool call has no function name: {value!r}"[:300], "invalid_tool_call")
    arguments = function.get("arguments", function.get("parameters", {}))
    call = {"name": function["name"].strip(), "arguments": arguments}
    if isinstance(value.get("id"), str):
        call["id"] = value["id"]
    return call


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


class _Parser(ResponseParser):
    """transformers' parser, with each region's named captures (a call's name, its id) on its open event: the parser
    keeps them only privately, and only until the next region opens, which may be within the same feed."""

    def _open_explicit(self, events: list[dict], field: Any, match: Any) -> None:
        super()._open_explicit(events, field, match)
        events[-1]["captures"] = {key: value for key, value in match.groupdict().items() if value is not None}


def _unreadable(error: ValueError) -> ToolCallFailed:
    first_line = (str(error).splitlines() or [""])[0][:200]
    return ToolCallFailed(f"the model's tool call could not be read ({first_line}); retry", "invalid_tool_call")
