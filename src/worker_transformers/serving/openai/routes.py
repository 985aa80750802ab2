"""OpenAI-compatible routes: jobs whose input is {"openai_route": ..., "openai_input": ...}.

RunPod turns `POST https://api.runpod.ai/v2/<endpoint>/openai/v1/...` into such a job. A non-streaming
request yields one OpenAI-shaped object; a streaming one yields Server-Sent Events strings, `data: {...}`,
ending with `data: [DONE]`. A refused request fails the job with an OpenAI error object, as JSON text, as
its error (the SDK wants error values to be strings): `{"error": {"message", "type", "param", "code"}}`; a
stream that fails after it began ends with that object as its last event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from worker_transformers.serving.engine import DeviceFailed, Engine, GenerationFailed, OutOfMemory, usage
from worker_transformers.serving.events import Done
from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
from worker_transformers.serving.schema import RequestError, describe
from worker_transformers.serving.tools import (
    Call,
    CallReader,
    Piece,
    Reasoning,
    ToolCallFailed,
    ToolFormat,
    finish_reason,
    read_calls,
)

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions")
OWNER = "worker-transformers"


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, dict) and "openai_route" in job_input


DONE = "data: [DONE]\n\n"


def _error_body(message: str, param: str | None, code: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_result(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, str]:
    """A failed job's result: the OpenAI error object as JSON text (the SDK wants error values to be strings)."""
    return {"error": json.dumps(_error_body(message, param, code, kind))}


class OpenAIRoutes:
    def __init__(
        self, engine: Engine, max_new_tokens: int, sampling_defaults: Mapping[str, Any], tool_format: ToolFormat
    ) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self.sampling_defaults = sampling_defaults
        self.tool_format = tool_format
        self.created = int(time.time())

    async def handle(self, job_input: dict[str, Any]) -> AsyncIterator[Any]:
        route, body = job_input.get("openai_route"), job_input.get("openai_input")
        if route not in ROUTES:
            yield error_result(
                f"openai_route: unknown route {route!r}; use one of {', '.join(ROUTES)}",
                "openai_route",
                "unknown_route",
            )
            return
        if route == "/v1/models":
            yield self.models()
            return
        if not isinstance(body, dict):
            yield error_result(f"openai_input: expected a JSON object, got {type(body).__name__}", "openai_input")
            return
        schema = ChatCompletionBody if route == "/v1/chat/completions" else CompletionBody
        try:
            parsed = schema.model_validate(body)
            if parsed.model != self.engine.model_name:
                yield error_result(
                    f"model: {parsed.model!r} is not served here; use {self.engine.model_name!r}",
                    "model",
                    "model_not_found",
                )
                return
            request = parsed.to_request(self.max_new_tokens, self.sampling_defaults)
            self.tool_format.check(request)
            ids = await asyncio.to_thread(self.engine.prompt_ids, request)
        except ValidationError as error:
            yield error_result(describe(error), _first_param(error))
            return
        except RequestError as error:
            yield error_result(str(error), str(error).split(":", 1)[0].split(".", 1)[0])
            return
        reader = (
            CallReader(self.tool_format, request, self.engine.tokenizer.decode(ids)) if request.calls_tools else None
        )
        shape = _Chat if route == "/v1/chat/completions" else _Completion
        formatter = shape(self.engine.model_name, parsed.include_usage())
        pieces = read_calls(self.engine.stream(request, ids), reader)
        if request.stream:
            async for chunk in _sse(formatter, pieces):
                yield chunk
            return
        try:
            yield await _whole(formatter, pieces)
        except ToolCallFailed as error:
            yield error_result(
                str(error), "tool_choice" if error.code == "tool_call_missing" else None, error.code, "server_error"
            )

    def models(self) -> dict[str, Any]:
        model = {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": OWNER}
        return {"object": "list", "data": [model]}


def _first_param(error: ValidationError) -> str | None:
    loc = error.errors()[0]["loc"]
    return str(loc[0]) if loc else None


class _Chat:
    """Shapes of /v1/chat/completions: chat.completion and chat.completion.chunk. With `include_usage`, every
    chunk has `usage: null` and one more chunk, with no choices, carries the usage."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.include_usage = include_usage

    def whole(self, text: str, reasoning: str, calls: list[Call], done: Done) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": None if calls and not text.strip() else text}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [call.openai() for call in calls]
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(done, len(calls))}
        return self._envelope("chat.completion", [choice], usage=usage(done))

    def preamble(self) -> list[dict[str, Any]]:
        """Chunks sent before any text: the chat stream names the speaker first."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def piece(self, piece: Piece, index: int) -> dict[str, Any]:
        """The chunk of one piece of the answer; `index` counts the tool calls before this one."""
        if isinstance(piece, Call):
            return self._chunk({"tool_calls": [{"index": index, **piece.openai()}]})
        if isinstance(piece, Reasoning):
            return self._chunk({"reasoning_content": piece.text})
        return self._chunk({"content": piece})

    def last(self, done: Done, calls: int) -> dict[str, Any]:
        return self._chunk({}, finish_reason(done, calls))

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return self._envelope(self.chunk_kind, [], usage=usage(done))

    chunk_kind = "chat.completion.chunk"

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return self._stream_envelope([{"index": 0, "delta": delta, "finish_reason": finish}])

    def _stream_envelope(self, choices: list) -> dict[str, Any]:
        return self._envelope(self.chunk_kind, choices, **({"usage": None} if self.include_usage else {}))

    def _envelope(self, kind: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


class _Completion(_Chat):
    """Shapes of /v1/completions: text_completion, streamed as text_completion objects too."""

    chunk_kind = "text_completion"

    def __init__(self, model: str, include_usage: bool) -> None:
        super().__init__(model, include_usage)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def whole(self, text: str, reasoning: str, calls: list[Call], done: Done) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._envelope("text_completion", [choice], usage=usage(done))

    def preamble(self) -> list[dict[str, Any]]:
        return []

    def piece(self, piece: Piece, index: int) -> dict[str, Any]:
        return self._text(piece)

    def last(self, done: Done, calls: int) -> dict[str, Any]:
        return self._text("", done.finish_reason)

    def _text(self, text: str, finish: str | None = None) -> dict[str, Any]:
        return self._stream_envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])


async def _whole(formatter: _Chat, pieces: AsyncIterator[Piece | Done]) -> dict[str, Any]:
    text, reasoning, calls = [], [], []
    async for piece in pieces:
        if isinstance(piece, Done):
            return formatter.whole("".join(text), "".join(reasoning), calls, piece)
        if isinstance(piece, Call):
            calls.append(piece)
        elif isinstance(piece, Reasoning):
            reasoning.append(piece.text)
        else:
            text.append(piece)
    raise RuntimeError("the generation ended without a final event")


async def _sse(formatter: _Chat, pieces: AsyncIterator[Piece | Done]) -> AsyncIterator[str]:
    """The answer as Server-Sent Events, ending with `data: [DONE]` even when it fails midway: then an error
    event comes first, and a failure of the model is raised after it, for the handler to count."""
    for chunk in formatter.preamble():
        yield _data(chunk)
    calls = 0
    try:
        async for piece in pieces:
            if isinstance(piece, Done):
                yield _data(formatter.last(piece, calls))
                if formatter.include_usage:
                    yield _data(formatter.usage_chunk(piece))
            else:
                yield _data(formatter.piece(piece, calls))
                calls += isinstance(piece, Call)
    except ToolCallFailed as error:
        yield _data(_error_body(str(error), None, error.code, "server_error"))
        yield DONE
        return
    except GenerationFailed as error:
        code = {OutOfMemory: "out_of_memory", DeviceFailed: "device_error"}.get(type(error), "generation_failed")
        yield _data(_error_body(str(error), None, code, "server_error"))
        yield DONE
        raise
    yield DONE


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
