"""The job input: one typed model with every field's bounds, and errors that name the field.

Parsing is strict: unknown fields are refused, "5" is not a number and 1 is not a boolean, so that a
client's mistake is reported instead of being guessed at. The cap on `max_new_tokens` comes from Settings.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

DEFAULT_MAX_NEW_TOKENS = 256


class RequestError(ValueError):
    """A job the worker refuses because of what the caller sent. The message reads `<field>: <reason>`."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(BaseModel):
    # inf and nan are refused: no sampling setting means anything at either, and they poison the arithmetic.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _cap(info: ValidationInfo) -> int:
    return (info.context or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)


def parse_request(job_input: Any, max_new_tokens: int) -> GenerationRequest:
    """Validate a job's input; raise RequestError with every problem as `<field>: <reason>`."""
    if not isinstance(job_input, dict):
        raise RequestError(f"input: expected a JSON object, got {type(job_input).__name__}")
    check_text(job_input)
    try:
        return GenerationRequest.model_validate(job_input, context={"max_new_tokens": max_new_tokens})
    except ValidationError as error:
        raise RequestError(describe(error)) from None


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


_PLAIN_NAME = re.compile(r"^[A-Za-z_][\w-]{0,63}$")


def field_name(part: str | int) -> str:
    """A field as it appears in a message: plain names and list indexes as they are, any other key (an
    unknown one a caller sent: empty, spaced, very long) quoted and cut short."""
    if isinstance(part, int) or _PLAIN_NAME.match(part):
        return str(part)
    return repr(part[:40] + "..." if len(part) > 40 else part)


def describe(error: ValidationError) -> str:
    """`field.sub: reason; other: reason`, with pydantic's own reasons and no input echoed back."""
    problems = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(field_name(part) for part in item["loc"]) or "input"
        reason = item["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {reason}")
    return "; ".join(problems)
