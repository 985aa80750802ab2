"""OpenAI request bodies (/v1/chat/completions, /v1/completions), turned into this worker's own request.

The bodies follow OpenAI's API: its field names, defaults (temperature 1, 16 tokens for completions) and
forms (`stop` as a string or a list, content as a string or text and image_url parts). A field whose value this
worker cannot honour (echo, suffix, best_of, a list of prompts) is refused by name rather than silently ignored; `user`
is accepted and ignored, as it only labels the caller. `top_k` and `repetition_penalty` are accepted as
extensions, as vLLM does. A sampling field left out takes the model's own default when it has one
(GENERATION_CONFIG_DEFAULTS), else OpenAI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from worker_transformers.serving.schema import (
    MAX_TOP_LOGPROBS,
    ContentPart,
    GenerationRequest,
    RequestError,
    ResponseFormat,
    Strict,
    TextPart,
    check_contents,
    check_text,
    parse_request,
)

MAX_CHOICES = 16  # n: each choice is a sequence in the batch
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI bounds it


class CalledFunction(Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # checked first by the body (`check_contents`)
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning, as this worker and vLLM return it

    def native(self, where: str) -> dict[str, Any]:
        """This message in the worker's own request: developer is system, a call's arguments a mapping."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if isinstance(self.content, list) and all(isinstance(p, TextPart) for p in self.content):
            message["content"] = "".join(p.text for p in self.content)
        elif isinstance(self.content, list):  # with images: the parts as they are, for the worker's request
            message["content"] = [p.model_dump(exclude_none=True) for p in self.content]
        elif self.content is not None:
            message["content"] = self.content
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls is not None:
            message["tool_calls"] = []
            for i, call in enumerate(self.tool_calls):
                arguments = _arguments(call.function.arguments, f"{where}.tool_calls.{i}.function.arguments")
                function = {"name": call.function.name, "arguments": arguments}
                message["tool_calls"].append({"id": call.id, "type": "function", "function": function})
        return message


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        raise RequestError(f"{where}: not valid JSON; send the arguments as a JSON object") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}: send the arguments as a JSON object")
    return arguments


class StreamOptions(Strict):
    include_usage: bool = False


def _only(value: Any, allowed: tuple[Any, ...], name: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported by this worker")
    return value


class _Common(Strict):
    model_config = ConfigDict(allow_inf_nan=False)

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # checked by the worker's own request (schema.py)
    user: str | None = None
    top_k: int = Field(0, ge=-1)  # extension; -1 or 0 turn it off
    repetition_penalty: float = Field(1.0, gt=0.0)  # extension

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None, model_defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of this worker's request that both routes share. A sampling field left out is the model's
        default (`model_defaults`), else OpenAI's."""
        sent = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": max(self.top_k, 0),
            "repetition_penalty": self.repetition_penalty,
        }
        fields: dict[str, Any] = {
            name: model_defaults[name] if name in model_defaults and name not in self.model_fields_set else value
            for name, value in sent.items()
        }
        fields |= {
            "stop": self.stop_list(),
            "seed": self.seed,
            "stream": self.stream,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.logit_bias:
            fields["logit_bias"] = self.logit_bias
        if max_tokens is not None:
            fields["max_new_tokens"] = max_tokens
        return fields


class ChatCompletionBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None  # checked by the worker's own request (schema.py)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None  # checked by the worker's own request (schema.py)
    chat_template_kwargs: dict[str, Any] | None = None  # an extension, as vLLM takes it

    @field_validator("messages", mode="before")
    @classmethod
    def _content_parts(cls, messages: Any) -> Any:
        return check_contents(messages)

    def to_request(self, max_new_tokens_cap: int, model_defaults: Mapping[str, Any]) -> GenerationRequest:
        check_text(self.model_dump())
        messages = [m.native(f"messages.{i}") for i, m in enumerate(self.messages)]
        fields = self.sampling(self.max_completion_tokens or self.max_tokens, model_defaults)
        fields |= {"logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0}
        if self.response_format is not None:
            fields["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        for name in ("reasoning_effort", "chat_template_kwargs"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        # OpenAI's own forms of "no tools"; the worker's request has no empty list.
        if self.tools:
            fields["tools"] = self.tools
            if self.tool_choice is not None:
                fields["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                fields["parallel_tool_calls"] = self.parallel_tool_calls
        elif self.tool_choice not in (None, "none"):
            raise RequestError("tool_choice: send tools to choose from")
        return _convert({"messages": messages, **fields}, max_new_tokens_cap, tokens_field="max_tokens")


class CompletionBody(_Common):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for this route
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # the likeliest tokens to show with each
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("send one prompt (a string); lists of prompts are not supported by this worker")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        return _only(value, (False,), "echo")

    @field_validator("suffix")
    @classmethod
    def _unset(cls, value: Any, info) -> Any:
        return _only(value, (None,), info.field_name)

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        return _only(value, (None, 1), "best_of")

    def to_request(self, max_new_tokens_cap: int, model_defaults: Mapping[str, Any]) -> GenerationRequest:
        check_text(self.model_dump())
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        fields = self.sampling(self.max_tokens, model_defaults)
        if self.logprobs is not None:
            fields |= {"logprobs": True, "top_logprobs": self.logprobs}
        return _convert({"prompt": prompt, **fields}, max_new_tokens_cap, "max_tokens")


def _convert(fields: dict[str, Any], cap: int, tokens_field: str) -> GenerationRequest:
    """Validate with the worker's own schema, naming fields the way the OpenAI caller sent them."""
    try:
        return parse_request(fields, cap)
    except RequestError as error:
        raise RequestError(str(error).replace("max_new_tokens", tokens_field)) from None
