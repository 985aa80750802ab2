"""The body of an OpenAI Responses request (/v1/responses), turned into a chat completion body (bodies.py), so that a
Responses request takes the one path every chat takes.

The input items map onto chat messages: `instructions` is a system message first, a message item is a message, a
run of `function_call` items is one assistant turn's tool calls (joined to the assistant message just before them),
a `function_call_output` is a tool message and a `reasoning` item's text is the next assistant turn's
reasoning_content. This worker keeps nothing between requests, so what refers to stored state (previous_response_id,
conversation, a stored prompt, item references, store: true, background) is refused by name, as is any tool other
than a function. A problem the chat path finds is reported under the name the Responses body gave the field
(`FieldNames`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from worker_transformers.serving.schema import FUNCTION_NAME, ReasoningEffort, RequestError, Strict, field_name

STORES_NOTHING = "this worker stores nothing; send the whole conversation in input"
# What `include` may ask for: the reasoning as a client can send it back, which this worker's reasoning items always
# carry (as text, not encrypted: there is no store to keep it from the client).
INCLUDABLE = ("reasoning.encrypted_content",)
MAX_METADATA = 16  # OpenAI's bounds on metadata: 16 pairs, keys of 64 characters, values of 512
Status = Literal["in_progress", "completed", "incomplete"]


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputText(Strict):
    """An earlier answer's text, as this worker's output gave it."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None

    @field_validator("file_id")
    @classmethod
    def _no_files(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("this worker keeps no files; send the image as image_url (an http(s) or data URL)")
        return value

    def chat(self, where: str) -> dict[str, Any]:
        if self.image_url is None:
            raise RequestError(f"{where}.image_url: Field required; send an http(s) or data URL")
        url = {"url": self.image_url} | ({} if self.detail in (None, "original") else {"detail": self.detail})
        return {"type": "image_url", "image_url": url}


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText | OutputText | InputImage]
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def chat_content(self, where: str) -> str | list[dict[str, Any]]:
        """The content as a chat message's: its text alone as one string, or text and image_url parts."""
        if isinstance(self.content, str):
            return self.content
        if not any(isinstance(part, InputImage) for part in self.content):
            return "".join(part.text for part in self.content)
        parts = []
        for j, part in enumerate(self.content):
            if not isinstance(part, InputImage):
                parts.append({"type": "text", "text": part.text})
            elif self.role != "user":
                raise RequestError(f"{where}.content.{j}.type: input_image parts are taken only in user messages")
            else:
                parts.append(part.chat(f"{where}.content.{j}"))
        return parts


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text
    id: str | None = None
    status: Status | None = None

    def chat(self, where: str) -> dict[str, Any]:
        try:
            arguments = json.loads(self.arguments)
        except json.JSONDecodeError:
            raise RequestError(f"{where}.arguments: not valid JSON; send the arguments as a JSON object") from None
        if not isinstance(arguments, dict):
            raise RequestError(f"{where}.arguments: send the arguments as a JSON object")
        return {"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None
    status: Status | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class SummaryText(Strict):
    type: Literal["summary_text"]
    text: str


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    id: str | None = None
    encrypted_content: str | None = None  # another server's; this worker has no key to read it
    status: Status | None = None

    def text(self) -> str:
        """The reasoning's own text, else its summary's."""
        if self.content:
            return "".join(part.text for part in self.content)
        return "\n\n".join(part.text for part in self.summary)


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem
ITEM_KINDS: dict[str, type[Strict]] = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}
PART_KINDS: dict[str, type[Strict]] = {"input_text": InputText, "output_text": OutputText, "input_image": InputImage}


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat(self) -> dict[str, Any]:
        return {"type": "function", "function": self.model_dump(exclude={"type"}, exclude_none=True)}


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormatText(Strict):
    type: Literal["text"]


class TextFormatJsonObject(Strict):
    type: Literal["json_object"]


class TextFormatJsonSchema(Strict):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None  # the schema is always enforced


class TextConfig(Strict):
    format: Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")] = (
        TextFormatText(type="text")
    )

    def response_format(self) -> dict[str, Any]:
        """The chat body's response_format of this format."""
        if not isinstance(self.format, TextFormatJsonSchema):
            return {"type": self.format.type}
        schema = self.format.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
        return {"type": "json_schema", "json_schema": schema}


class ReasoningConfig(Strict):
    effort: ReasoningEffort | None = None
    # Accepted for the clients that send them: the reasoning comes whole (a reasoning item's content), not summed up.
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


def _refused(value: Any, allowed: tuple[Any, ...], reason: str) -> Any:
    if value not in allowed:
        raise ValueError(reason)
    return value


class ResponsesBody(Strict):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    input: str | list[Item]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    metadata: dict[str, str] | None = None
    user: str | None = None  # labels the caller; accepted and echoed, as the chat body takes it
    truncation: Literal["auto", "disabled"] | None = None
    stream: bool = False
    store: bool | None = None
    background: bool | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None  # a hint for routing to a cache; one worker's answer is the same without it
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return _checked(value, "input", ITEM_KINDS, "message", _input_refusal)
        raise ValueError("send a string or a list of items")

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return _checked(value, "tools", {"function": FunctionTool}, None, _tool_refusal)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _choice_of_functions(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if value is None or value in ("none", "auto", "required") or kind == "function":
            return value
        shown = _shown(kind) if isinstance(kind, str) else _shown(value) if isinstance(value, str) else None
        fix = """send 'none', 'auto', 'required' or {"type": "function", "name": ...}"""
        raise ValueError(f"{shown} is not served here; {fix}" if shown else fix)

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA:
            raise ValueError(f"{len(value)} pairs; send at most {MAX_METADATA}")
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError(f"{field_name(key)}: keys are at most 64 characters and values at most 512")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        return _refused(
            value, (None, "disabled"), "'auto' is not served here: input is never cut to fit; send 'disabled'"
        )

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        return _refused(value, (None, False), "this worker stores nothing; send store false or leave it out")

    @field_validator("background")
    @classmethod
    def _not_in_background(cls, value: bool | None) -> bool | None:
        reason = "this worker answers while the request waits; send background false or leave it out"
        return _refused(value, (None, False), reason)

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, value: list[str] | None) -> list[str] | None:
        for asked in value or []:
            if asked not in INCLUDABLE:
                raise ValueError(f"{_shown(asked)} is not served here; send {', '.join(INCLUDABLE)} or nothing")
        return value

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _no_stored_state(cls, value: Any) -> Any:
        return _refused(value, (None,), STORES_NOTHING)

    @field_validator("prompt")
    @classmethod
    def _no_stored_prompt(cls, value: Any) -> Any:
        return _refused(value, (None,), "stored prompts are not served here; send instructions and input instead")

    def chat_body(self) -> tuple[dict[str, Any], FieldNames]:
        """This request as a chat completion body, and the names its fields had here."""
        messages, places = _Conversation(self.instructions).of(self.input)
        chat: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream}
        for own, theirs in (
            ("temperature", "temperature"),
            ("top_p", "top_p"),
            ("max_output_tokens", "max_completion_tokens"),
            ("parallel_tool_calls", "parallel_tool_calls"),
            ("user", "user"),
        ):
            if getattr(self, own) is not None:
                chat[theirs] = getattr(self, own)
        if self.tools:
            chat["tools"] = [tool.chat() for tool in self.tools]
        if self.tool_choice is not None and (self.tools or self.tool_choice not in ("auto", "none")):
            choice = self.tool_choice
            chat["tool_choice"] = (
                choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
            )
        if self.text is not None:
            chat["response_format"] = self.text.response_format()
        if self.reasoning is not None and self.reasoning.effort is not None:
            chat["reasoning_effort"] = self.reasoning.effort
        return chat, FieldNames(places)


def _shown(value: str) -> str:
    """A name the caller sent, quoted and cut short, for a message."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def _tool_refusal(kind: str) -> str:
    return f"{_shown(kind)} is not served here; only function tools"


def _input_refusal(kind: str) -> str:
    reason = "this worker stores nothing to refer to" if kind == "item_reference" else "this worker runs no such tool"
    kinds = "message, function_call, function_call_output and reasoning items"
    return f"{_shown(kind)} items are not served here ({reason}); send {kinds}"


def _part_refusal(kind: str) -> str:
    return f"{_shown(kind)} parts are not taken; send input_text, output_text and input_image parts"


def _checked(
    items: list[Any], where: str, kinds: dict[str, type[Strict]], default: str | None, refusal: Callable[[str], str]
) -> list[Any]:
    """Each item validated as the model its `type` names (`default` when it names none), so that a problem is named
    by its place (`input.2.call_id: Field required`) and an item of another kind is refused by name. Raises
    ValueError with every problem found."""
    checked, problems = [], []
    for i, item in enumerate(items):
        place = f"{where}.{i}"
        kind = item.get("type", default) if isinstance(item, dict) else None
        model = kinds.get(kind) if isinstance(kind, str) else None
        if not isinstance(item, dict):
            problems.append(f"{place}: send an object with a type")
        elif model is None:
            reason = "Field required" if kind is None else refusal(kind) if isinstance(kind, str) else "send a string"
            problems.append(f"{place}.type: {reason}")
        else:
            try:
                checked.append(model.model_validate(_parts_checked(item, place, problems)))
            except ValidationError as error:
                problems += _named(error, place)
    if problems:
        raise ValueError("; ".join(problems))
    return checked


def _parts_checked(item: dict[str, Any], place: str, problems: list[str]) -> dict[str, Any]:
    """A message item with its list of content parts validated each (the rest is left to the item's model)."""
    if item.get("type", "message") != "message" or not isinstance(item.get("content"), list):
        return item
    try:
        content = _checked(item["content"], f"{place}.content", PART_KINDS, None, _part_refusal)
    except ValueError as error:
        problems.append(str(error))
        content = []
    return {**item, "content": content}


def _named(error: ValidationError, place: str) -> list[str]:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join([place, *(field_name(part) for part in item["loc"])])
        problems.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return problems


class _Conversation:
    """Chat messages made from input items, with the place each came from (`input.3`, `instructions`)."""

    def __init__(self, instructions: str | None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.places: list[str] = []
        self.reasoning = ""  # reasoning items' text, for the next assistant turn
        self.names: dict[str, str] = {}  # each call's function, by call_id, for the tool message that answers it
        if instructions is not None:
            self._add({"role": "system", "content": instructions}, "instructions")

    def of(self, given: str | list[Item]) -> tuple[list[dict[str, Any]], list[str]]:
        items = [MessageItem(role="user", content=given)] if isinstance(given, str) else given
        for i, item in enumerate(items):
            place = f"input.{i}"
            if isinstance(item, ReasoningItem):
                self.reasoning += item.text()
            elif isinstance(item, MessageItem):
                message = {"role": item.role, "content": item.chat_content(place)}
                self._add(self._with_reasoning(message) if item.role == "assistant" else message, place)
            elif isinstance(item, FunctionCallItem):
                self.names[item.call_id] = item.name
                last = self.messages[-1] if self.messages else None
                if last is None or last["role"] != "assistant":  # a turn that only calls tools
                    last = self._add(self._with_reasoning({"role": "assistant", "content": None}), place)
                last.setdefault("tool_calls", []).append(item.chat(place))
            else:
                message = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
                if item.call_id in self.names:
                    message["name"] = self.names[item.call_id]
                self._add(message, place)
        return self.messages, self.places

    def _with_reasoning(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.reasoning:
            message["reasoning_content"], self.reasoning = self.reasoning, ""
        return message

    def _add(self, message: dict[str, Any], place: str) -> dict[str, Any]:
        self.messages.append(message)
        self.places.append(place)
        return message


# The chat body's names of the fields a Responses body names otherwise, at the start of a problem's text.
_RENAMED = (
    (re.compile(r"^response_format\.json_schema\.schema\b"), "text.format.schema"),
    (re.compile(r"^response_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"^max_(completion_)?tokens\b"), "max_output_tokens"),
    (re.compile(r"^reasoning_effort\b"), "reasoning.effort"),
    (re.compile(r"^tools\.(\d+)\.function\b"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function\b"), "tool_choice"),
    (re.compile(r"^messages\b(?!\.\d)"), "input"),
)
_MESSAGE = re.compile(r"^messages\.(\d+)\b")


class FieldNames:
    """Names the fields of a problem the chat path reports (`messages.2.content`) as this body named them
    (`input.1.content`)."""

    def __init__(self, places: list[str]) -> None:
        self.places = places

    def rename(self, message: str) -> str:
        return "; ".join(self._renamed(problem) for problem in message.split("; "))

    def _renamed(self, problem: str) -> str:
        found = _MESSAGE.match(problem)
        if found and int(found[1]) < len(self.places):
            return self.places[int(found[1])] + problem[found.end() :]
        for pattern, name in _RENAMED:
            if pattern.match(problem):
                return pattern.sub(name, problem, count=1)
        return problem
