"""The job input: one typed model with every field's bounds, and errors that name the field.

Parsing is strict: unknown fields are refused, "5" is not a number and 1 is not a boolean, so that a
client's mistake is reported instead of being guessed at. The cap on `max_new_tokens` comes from Settings.
A message's content may hold images (OpenAI's image_url parts); they are fetched and decoded later (images.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from worker_transformers.generation.errors import RequestError  # noqa: F401 - the job formats name it from here

log = logging.getLogger("worker_transformers")


class Strict(BaseModel):
    """A part of a job: its fields' types exactly as declared, and no field it does not declare."""

    model_config = ConfigDict(extra="forbid", strict=True)


DEFAULT_MAX_NEW_TOKENS = 256

# The settings a model's generation_config.json may give defaults for (GENERATION_CONFIG_DEFAULTS).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


class FunctionCall(Strict):
    name: str
    arguments: dict[str, Any]  # chat templates take the arguments as a mapping, not JSON text


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(Strict):
    type: Literal["text"]
    text: str


DATA_URL_FORM = "data:image/png;base64,..."


class ImageUrl(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint; the model's processor decides

    @field_validator("url")
    @classmethod
    def _fetchable(cls, url: str) -> str:
        # The form only; the data itself is read and checked when the images are loaded (images.py).
        if url[:5].lower() == "data:":
            return url
        try:
            parts = urlsplit(url[:2048])
            ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
        except ValueError:  # a malformed address (an unclosed IPv6 bracket)
            ok = False
        if not ok:
            raise ValueError(f"send an http(s) URL or a data URL ({DATA_URL_FORM})")
        return url


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


# OpenAI's content parts that this worker takes; every other kind (audio, video, files) is refused by name.
ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
PART_KINDS: dict[str, type[Strict]] = {"text": TextPart, "image_url": ImagePart}
# OpenAI's rule: images come from the user; these roles' content is text (developer: an OpenAI body's system).
TEXT_ROLES = ("system", "developer", "assistant", "tool")


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, description="An assistant turn's tool calls")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers")
    name: str | None = None
    reasoning_content: str | None = Field(
        None, description="An assistant turn's reasoning, for templates that show it (thinking models)"
    )
    # Last, so that its check sees the fields above. A list of parts is checked before (`check_contents`).
    content: str | list[ContentPart] | None = Field(None, validate_default=True)

    def text(self) -> str:
        """The content's text: the string, or the text parts' texts joined."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    def template_content(self) -> str | list[dict[str, str]]:
        """The content as a chat template reads it: text alone as one string; with images, transformers' parts
        for processor templates, an `{"type": "image"}` placeholder where each image goes."""
        if not isinstance(self.content, list) or all(isinstance(part, TextPart) for part in self.content):
            return self.text()
        return [
            {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
            for part in self.content
        ]

    @field_validator("tool_calls")
    @classmethod
    def _assistant_calls(cls, calls: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if calls is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message makes tool calls")
        return calls

    @field_validator("content")
    @classmethod
    def _content_unless_calling(cls, content: str | list | None, info: ValidationInfo) -> str | list | None:
        if content is not None:
            return content
        if info.data.get("tool_calls") is None:
            raise ValueError("Field required")
        return ""  # templates read a tool-calling turn's content too


# OpenAI's rule for function names, which chat templates print as they are.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class Function(Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

# A required call is forced while decoding (tools/reader.py); the prompt says so too, so the model expects to make it.
REQUIRED_CALL = "Answer only with a call of one of the tools."
NAMED_CALL = "Answer only with a call of the function `{name}`."


class JsonSchema(Strict):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(Strict):
    """OpenAI's response_format: plain text, any JSON object, or JSON valid under a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("send json_schema exactly when type is 'json_schema'")
        return self


# OpenAI's reasoning efforts; a template that reads `reasoning_effort` gets the value as it is.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

LOGIT_BIAS = 100.0  # OpenAI's bound: -100 bans a token, 100 all but forces it
MAX_TOP_LOGPROBS = 20


class GenerationRequest(Strict):
    # inf and nan are refused: no sampling setting means anything at either, and they poison the arithmetic.
    model_config = ConfigDict(allow_inf_nan=False)

    prompt: str | None = Field(None, min_length=1, description="Text to continue, as is")
    messages: list[Message] | None = Field(
        None, min_length=1, description="Chat turns, rendered with the model's chat template"
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description=f"Tokens to generate at most; {DEFAULT_MAX_NEW_TOKENS} or MAX_NEW_TOKENS if lower"
    )
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 is greedy (deterministic)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="Sample from the k likeliest tokens; 0 turns it off")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Above 1 discourages repeats")
    stop: list[str] = Field(default_factory=list, max_length=4, description="Up to 4 strings that end the text")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Makes sampling reproducible (a 64-bit integer)"
    )
    stream: bool = Field(False, description="Yield text as it is generated")
    tools: list[Tool] | None = Field(
        None, min_length=1, max_length=128, description="Functions the model may call, shown to it by its chat template"
    )
    tool_choice: ToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required`, or one function by name"
    )
    parallel_tool_calls: bool = Field(True, description="false: at most one tool call in the answer")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Lowers the logit of every token generated so far"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Lowers a token's logit by this much for each time it was generated"
    )
    logit_bias: dict[str, float] | None = Field(
        None, max_length=1024, description="Token id (a string) to a number from -100 to 100 added to its logit"
    )
    logprobs: bool = Field(False, description="Return each generated token's log-probability")
    top_logprobs: int = Field(
        0, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: the likeliest tokens at each position, up to 20"
    )
    response_format: ResponseFormat | None = Field(
        None, description="`json_object` or `json_schema`: the answer is JSON, enforced while it is generated"
    )
    reasoning_effort: ReasoningEffort | None = Field(
        None, description="How much a reasoning model thinks, passed to its chat template (gpt-oss reads it)"
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables for the chat template, such as `enable_thinking`; each must be one it reads"
    )

    @field_validator("messages", mode="before")
    @classmethod
    def _content_parts(cls, messages: Any) -> Any:
        return check_contents(messages)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounds(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit() or not token.isascii():
                raise ValueError(f'{field_name(token)} is not a token id; the keys are token ids such as "1234"')
            if not -LOGIT_BIAS <= value <= LOGIT_BIAS:
                raise ValueError(f"token {token}: {value:g} is outside -100 to 100")
        return bias

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must not be empty")
        return stop

    @field_validator("max_new_tokens")
    @classmethod
    def _within_cap(cls, value: int | None, info: ValidationInfo) -> int | None:
        cap = _cap(info)
        if value is not None and value > cap:
            raise ValueError(f"{value} is more than MAX_NEW_TOKENS={cap}; ask for fewer")
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self, info: ValidationInfo) -> GenerationRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt or messages")
        if self.max_new_tokens is None:
            self.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, _cap(info))
        if self.tools is not None and self.messages is None:
            raise ValueError("tools: only a chat (messages) can call tools")
        if self.tool_choice is not None and self.tools is None:
            raise ValueError("tool_choice: send tools to choose from")
        for name in ("chat_template_kwargs", "reasoning_effort"):
            if getattr(self, name) is not None and self.messages is None:
                raise ValueError(f"{name}: only a chat (messages) goes through the chat template; send messages")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: send logprobs true too")
        if self.json_schema() is not None and self.required_tool is not None:
            raise ValueError("response_format: a required tool call is JSON already; send one or the other")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice: {self.tool_choice.function.name!r} is none of the tools ({', '.join(names)})"
                )
        return self

    def json_schema(self) -> tuple[dict[str, Any], str] | None:
        """The JSON Schema the answer must follow and the field it came from; None for free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"type": "object"}, "response_format"
        return fmt.json_schema.schema_, "response_format.json_schema.schema"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def calls_tools(self) -> bool:
        """Whether the answer is read for tool calls: tools were sent and tool_choice is not `none`."""
        return self.tools is not None and self.tool_choice != "none"

    @property
    def required_tool(self) -> str | None:
        """The function the answer must call; `*` for any of the tools; None when a call is optional."""
        if not self.calls_tools:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "*" if self.tool_choice == "required" else None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model: none for tool_choice `none`, the named one alone."""
        if not self.calls_tools:
            return None
        required = self.required_tool
        return [t.model_dump(exclude_none=True) for t in self.tools if required in ("*", None, t.function.name)]

    def template_variables(self) -> dict[str, Any]:
        """What the request passes the chat template besides its messages and tools: `chat_template_kwargs`, and
        `reasoning_effort` when it sent one."""
        variables = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            variables["reasoning_effort"] = self.reasoning_effort
        return variables

    def image_urls(self) -> list[tuple[str, str]]:
        """Each image part's URL and its place (`messages.0.content.1`), in the order the messages give them."""
        return [
            (part.image_url.url, f"messages.{i}.content.{j}")
            for i, message in enumerate(self.messages or [])
            if isinstance(message.content, list)
            for j, part in enumerate(message.content)
            if isinstance(part, ImagePart)
        ]

    def text_size(self) -> int:
        """Characters of text in the input (the prompt, or the messages' contents), to refuse a huge input before
        tokenizing it."""
        if self.messages is None:
            return len(self.prompt)
        return sum(len(message.text()) for message in self.messages)

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as the chat template reads them (`Message.template_content`), with the instruction a
        required call adds to the system message."""
        messages = [m.model_dump(exclude_none=True) | {"content": m.template_content()} for m in self.messages]
        required = self.required_tool
        if required is not None:
            instruction = REQUIRED_CALL if required == "*" else NAMED_CALL.format(name=required)
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{instruction}".lstrip()
            else:
                messages.insert(0, {"role": "system", "content": instruction})
        return messages


def check_contents(messages: Any) -> Any:
    """Check every message's list of content parts, so that a mistake is named by its place
    (`messages.0.content.1.image_url.url: ...`) rather than by pydantic's union members. Raises ValueError with
    every problem found; anything else than a list of content parts is left to the model's own checks."""
    if not isinstance(messages, list):
        return messages
    problems = []
    for i, message in enumerate(messages):
        if isinstance(message, dict) and "content" in message:
            problems += _content_problems(message["content"], message.get("role"), f"messages.{i}.content")
    if problems:
        raise ValueError("; ".join(problems))
    return messages


def _content_problems(content: Any, role: Any, where: str) -> list[str]:
    if content is None or isinstance(content, str):
        return []
    if not isinstance(content, list):
        return [f"{where}: send a string or a list of text and image_url parts"]
    problems = []
    for j, part in enumerate(content):
        place = f"{where}.{j}"
        if not isinstance(part, dict):
            problems.append(f'{place}: send a part as an object such as {{"type": "text", "text": "..."}}')
            continue
        kind = part.get("type")
        model = PART_KINDS.get(kind) if isinstance(kind, str) else None
        if model is None:
            reason = "Field required" if kind is None else f"{_shown(kind)} parts are not taken"
            problems.append(f"{place}.type: {reason}; send text and image_url parts")
            continue
        if model is ImagePart and role in TEXT_ROLES:
            problems.append(f"{place}.type: image_url parts are taken only in user messages; move the image there")
            continue
        try:
            model.model_validate(part)
        except ValidationError as error:
            problems += [f"{place}.{problem}" for problem in _problems(error)]
    return problems


def _shown(value: Any) -> str:
    """A value the caller sent, short and quoted, for a message."""
    text = value if isinstance(value, str) else type(value).__name__
    return repr(text[:40] + "..." if len(text) > 40 else text)


def _cap(info: ValidationInfo) -> int:
    return (info.context or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)


def parse_request(
    job_input: Any, max_new_tokens: int, sampling_defaults: Mapping[str, Any] | None = None
) -> GenerationRequest:
    """Validate a job's input; raise RequestError with every problem as `<field>: <reason>`. A sampling field
    the job leaves out takes its value from `sampling_defaults` (the model's, see `sampling_defaults`)."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input: expected a JSON object, got {type(job_input).__name__}")
    check_text(job_input)
    try:
        request = GenerationRequest.model_validate(job_input, context={"max_new_tokens": max_new_tokens})
    except ValidationError as error:
        raise RequestError(describe(error)) from None
    left_out = {k: v for k, v in (sampling_defaults or {}).items() if k not in request.model_fields_set}
    return request.model_copy(update=left_out) if left_out else request


def sampling_defaults(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The SAMPLING_FIELDS that `values` (a model's generation config) sets to a value a job could send; any
    other value is left out, with a warning naming it and `source`."""
    defaults = {}
    for name in SAMPLING_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        try:
            GenerationRequest.model_validate({"prompt": "-", name: value})
        except ValidationError as error:
            log.warning("%s: %s=%r is not usable (%s); it is ignored", source, name, value, describe(error))
            continue
        defaults[name] = value
    return defaults


def check_text(value: Any, where: tuple[str | int, ...] = ()) -> None:
    """Refuse any string in `value` (keys included) that is not valid Unicode text: JSON can carry a lone
    surrogate ("\\ud800"), which Python accepts as a str and the tokenizer, like any UTF-8 encoder, cannot take."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(key, where)
            check_text(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text(item, (*where, index))
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            field = ".".join(field_name(part) for part in where) or "input"
            raise RequestError(
                f"{field}: the text holds a character that is not valid Unicode (U+{ord(value[error.start]):04X}, "
                f"a lone surrogate, at position {error.start}); send UTF-8 text"
            ) from None


_NAMES_ITS_FIELD = re.compile(r"^[a-z_][a-z0-9_.]*: ")
_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w-]{0,63}$")


def field_name(part: str | int) -> str:
    """A field as it appears in a message: plain names and list indexes as they are, any other key (an
    unknown one a caller sent: empty, spaced, very long) quoted and cut short."""
    if isinstance(part, int) or _PLAIN_NAME.match(part):
        return str(part)
    return repr(part[:40] + "..." if len(part) > 40 else part)


def describe(error: ValidationError) -> str:
    """`field.sub: reason; other: reason`, with pydantic's own reasons and no input echoed back."""
    return "; ".join(_problems(error))


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        reason = item["msg"].removeprefix("Value error, ")
        where = ".".join(field_name(part) for part in item["loc"])
        # A check across fields names the one at fault; a check of a list names the place in it.
        if _NAMES_ITS_FIELD.match(reason) and (not where or reason.startswith(f"{where}.")):
            problems.append(reason)
            continue
        problems.append(f"{where or 'input'}: {reason}")
    return problems
