"""OpenAI-compatible routes: jobs whose input is {"openai_route": ..., "openai_input": ...}.

RunPod turns `POST https://api.runpod.ai/v2/<endpoint>/openai/v1/...` into such a job. A non-streaming
request yields one OpenAI-shaped object; a streaming one yields Server-Sent Events strings, `data: {...}`,
ending with `data: [DONE]`. A refused request fails the job with an OpenAI error object, as JSON text, as
its error (the SDK wants error values to be strings): `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from worker_transformers.serving.engine import Engine, usage
from worker_transformers.serving.events import Done
from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
from worker_transformers.serving.schema import RequestError, describe

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions")
OWNER = "worker-transformers"


def is_openai_job(job_input: Any) -> bool:
    return isinstance(job_input, dict) and "openai_route" in job_input


def error_result(
    message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, str]:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": json.dumps(body)}


class OpenAIRoutes:
    def __init__(self, engine: Engine, max_new_tokens: int) -> None:
        self.engine = engine
        self.max_new_tokens = max_new_tokens
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
            request = parsed.to_request(self.max_new_tokens)
            ids = await asyncio.to_thread(self.engine.prompt_ids, request)
        except ValidationError as error:
            yield error_result(describe(error), _first_param(error))
            return
        except RequestError as error:
            yield error_result(str(error), str(error).split(":", 1)[0])
            return
        shape = _Chat if route == "/v1/chat/completions" else _Completion
        formatter = shape(self.engine.model_name)
        events = self.engine.stream(request, ids)
        if request.stream:
            async for chunk in _sse(formatter, events, parsed.include_usage()):
                yield chunk
        else:
            yield await _whole(formatter, events)

    def models(self) -> dict[str, Any]:
        model = {"id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": OWNER}
        return {"object": "list", "data": [model]}


def _first_param(error: ValidationError) -> str | None:
    loc = error.errors()[0]["loc"]
    return str(loc[0]) if loc else None


class _Chat:
    """Shapes of /v1/chat/completions: chat.completion and chat.completion.chunk."""

    def __init__(self, model: str) -> None:
        self.model, self.id, self.created = model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done.finish_reason}
        return self._envelope("chat.completion", [choice], usage=usage(done))

    def preamble(self) -> list[dict[str, Any]]:
        """Chunks sent before any text: the chat stream names the speaker first."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return [self._envelope("chat.completion.chunk", [choice])]

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return self._envelope("chat.completion.chunk", [], usage=usage(done))

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

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def whole(self, text: str, done: Done) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return self._envelope("text_completion", [choice], usage=usage(done))

    def preamble(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, done: Done) -> dict[str, Any]:
        return self._envelope("text_completion", [], usage=usage(done))


async def _whole(formatter: _Chat, events: AsyncIterator) -> dict[str, Any]:
    pieces = []
    async for event in events:
        pieces.append(event.text)
        if isinstance(event, Done):
            return formatter.whole("".join(pieces), event)
    raise RuntimeError("the generation ended without a final event")


async def _sse(formatter: _Chat, events: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    for chunk in formatter.preamble():
        yield _data(chunk)
    async for event in events:
        if isinstance(event, Done):
            yield _data(formatter.chunk(event.text, event.finish_reason))
            if include_usage:
                yield _data(formatter.usage_chunk(event))
        else:
            yield _data(formatter.chunk(event.text))
    yield "data: [DONE]\n\n"


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
