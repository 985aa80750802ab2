"""OpenAI-compatible routes: jobs whose input is {"openai_route": ..., "openai_input": ...}.

A non-streaming request yields one OpenAI-shaped object; a streaming one yields Server-Sent Events strings,
`data: {...}`, ending with `data: [DONE]`. The job, and the error object of a refused or failed one, are
protocol.py's. Each choice's answer is read by answer.py, as the plain format's is.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from worker_transformers.generation.errors import GenerationFailed
from worker_transformers.generation.events import Done
from worker_transformers.serving.answer import (
    Answer,
    Logprobs,
    Piece,
    finish_reason,
    gather,
    logprobs_json,
    read,
    usage,
)
from worker_transformers.serving.frontend import Frontend
from worker_transformers.serving.openai import responses
from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
from worker_transformers.serving.openai.protocol import (
    DONE,
    ROUTES,
    error_body,
    error_result,
    failure_code,
    first_param,
    model_not_served,
    param_of,
)
from worker_transformers.serving.schema import GenerationRequest, RequestError, describe
from worker_transformers.serving.tools.reader import (
    Call,
    CallArguments,
    CallStart,
    Reasoning,
    ToolCallFailed,
    ToolFormat,
)

OWNER = "worker-transformers"


class OpenAIRoutes:
    def __init__(
        self, frontend: Frontend, max_new_tokens: int, sampling_defaults: Mapping[str, Any], tool_format: ToolFormat
    ) -> None:
        self.frontend = frontend
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
        if route == "/v1/responses":
            async for item in responses.handle(self, body):
                yield item
            return
        schema = ChatCompletionBody if route == "/v1/chat/completions" else CompletionBody
        try:
            parsed = schema.model_validate(body)
            if parsed.model != self.frontend.model_name:
                yield model_not_served(parsed.model, self.frontend.model_name)
                return
            request = parsed.to_request(self.max_new_tokens, self.sampling_defaults)
            self.tool_format.check(request)
            prepared = await asyncio.to_thread(self.frontend.prepare, request)
        except ValidationError as error:
            yield error_result(describe(error), first_param(error))
            return
        except RequestError as error:
            yield error_result(str(error), param_of(str(error)))
            return
        choices = [read(self.frontend, choice, prepared, self.tool_format) for choice in _choices(request, parsed.n)]
        shape = _Chat if route == "/v1/chat/completions" else _Completion
        formatter = shape(self.frontend, parsed.include_usage(), request.logprobs)
        if request.stream:
            async for chunk in _sse(formatter, choices):
                yield chunk
            return
        try:
            yield await _whole(formatter, choices)
        except ToolCallFailed as error:
            yield error_result(str(error), None, error.code, "server_error")

    def models(self) -> dict[str, Any]:
        model = {"id": self.frontend.model_name, "object": "model", "created": self.created, "owned_by": OWNER}
        return {"object": "list", "data": [model]}


def _choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The request of each of n choices: a seeded request's choice i draws from seed + i, so that each differs
    and the first is what the same request with n = 1 answers."""
    if n == 1 or request.seed is None:
        return [request] * n
    return [request] + [request.model_copy(update={"seed": (request.seed + i) % 2**64}) for i in range(1, n)]


class _Chat:
    """Shapes of /v1/chat/completions: chat.completion and chat.completion.chunk. With `include_usage`, every
    chunk has `usage: null` and one more chunk, with no choices, carries the usage of all choices."""

    chunk_kind = "chat.completion.chunk"

    def __init__(self, frontend: Frontend, include_usage: bool, logprobs: bool) -> None:
        self.tokenizer = frontend.tokenizer
        self.model, self.id, self.created = frontend.model_name, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.include_usage = include_usage
        self.logprobs = logprobs

    def whole(self, answers: list[Answer]) -> dict[str, Any]:
        choices = []
        for index, answer in enumerate(answers):
            text = "".join(answer.text)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if answer.calls and not text.strip() else text,
            }
            if answer.reasoning:
                message["reasoning_content"] = "".join(answer.reasoning)
            if answer.calls:
                message["tool_calls"] = [call.openai() for call in answer.calls]
            finish = finish_reason(answer.done, len(answer.calls))
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": self._logprobs(answer.logprobs),
                    "finish_reason": finish,
                }
            )
        return self._envelope("chat.completion", choices, usage=usage([a.done for a in answers]))

    def preamble(self, index: int) -> list[dict[str, Any]]:
        """Chunks sent before any text: the chat stream names the speaker first."""
        return [self._chunk(index, {"role": "assistant", "content": ""})]

    def piece(self, index: int, piece: str | Reasoning, logprobs: list) -> dict[str, Any]:
        """The chunk of a piece of the answer's text or reasoning."""
        if isinstance(piece, Reasoning):
            return self._chunk(index, {"reasoning_content": piece.text})
        return self._chunk(index, {"content": piece}, logprobs=logprobs)

    def call_start(self, index: int, call: int, start: CallStart) -> dict[str, Any]:
        """The chunk that opens tool call number `call` of the answer: its index, id, type and name."""
        function = {"name": start.name, "arguments": ""}
        return self._chunk(
            index, {"tool_calls": [{"index": call, "id": start.id, "type": "function", "function": function}]}
        )

    def call_arguments(self, index: int, call: int, text: str) -> dict[str, Any]:
        """A chunk of the arguments of tool call number `call`."""
        return self._chunk(index, {"tool_calls": [{"index": call, "function": {"arguments": text}}]})

    def last(self, index: int, done: Done, calls: int, logprobs: list) -> dict[str, Any]:
        return self._chunk(index, {}, finish_reason(done, calls), logprobs)

    def usage_chunk(self, dones: list[Done]) -> dict[str, Any]:
        return self._envelope(self.chunk_kind, [], usage=usage(dones))

    def _logprobs(self, logprobs: list) -> dict[str, Any] | None:
        return {"content": logprobs_json(self.tokenizer, logprobs), "refusal": None} if self.logprobs else None

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list = ()) -> dict:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if self.logprobs and (logprobs or finish):
            choice["logprobs"] = self._logprobs(logprobs)
        return self._stream_envelope([choice])

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
    """Shapes of /v1/completions: text_completion, streamed as text_completion objects too, with the legacy
    log-probabilities (tokens, token_logprobs, top_logprobs, text_offset)."""

    chunk_kind = "text_completion"

    def __init__(self, frontend: Frontend, include_usage: bool, logprobs: bool) -> None:
        super().__init__(frontend, include_usage, logprobs)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def whole(self, answers: list[Answer]) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "text": "".join(answer.text),
                "logprobs": self._logprobs(answer.logprobs),
                "finish_reason": answer.done.finish_reason,
            }
            for index, answer in enumerate(answers)
        ]
        return self._envelope("text_completion", choices, usage=usage([a.done for a in answers]))

    def preamble(self, index: int) -> list[dict[str, Any]]:
        return []

    def piece(self, index: int, piece: str | Reasoning, logprobs: list) -> dict[str, Any]:
        return self._text(index, piece, logprobs=logprobs)

    def last(self, index: int, done: Done, calls: int, logprobs: list) -> dict[str, Any]:
        return self._text(index, "", done.finish_reason, logprobs)

    def _logprobs(self, logprobs: list) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        entries = logprobs_json(self.tokenizer, logprobs)
        offsets, offset = [], 0
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def _text(self, index: int, text: str, finish: str | None = None, logprobs: list = ()) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        if self.logprobs:
            choice["logprobs"] = self._logprobs(logprobs)
        return self._stream_envelope([choice])


async def _whole(formatter: _Chat, choices: list[AsyncIterator[Piece | Done]]) -> dict[str, Any]:
    tasks = [asyncio.ensure_future(gather(pieces)) for pieces in choices]
    try:
        return formatter.whole(list(await asyncio.gather(*tasks)))
    finally:
        for task in tasks:  # one choice failed: the others are not wanted any more
            task.cancel()


async def _merged(choices: list[AsyncIterator[Piece | Done]]) -> AsyncIterator[tuple[int, Piece | Done]]:
    """The pieces of every choice as they come, each with its choice's index; a failure of one ends them all."""
    if len(choices) == 1:
        async for piece in choices[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, pieces: AsyncIterator[Piece | Done]) -> None:
        try:
            async for piece in pieces:
                queue.put_nowait((index, piece))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((index, error))

    tasks = [asyncio.ensure_future(pump(i, pieces)) for i, pieces in enumerate(choices)]
    try:
        for _ in range(len(choices)):
            while True:
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield index, item
                if isinstance(item, Done):
                    break
    finally:
        for task in tasks:
            task.cancel()


async def _sse(formatter: _Chat, choices: list[AsyncIterator[Piece | Done]]) -> AsyncIterator[str]:
    """The answer as Server-Sent Events, ending with `data: [DONE]` even when it fails midway: then an error
    event comes first, and a failure of the model is raised after it, for the handler to count."""
    for index in range(len(choices)):
        for chunk in formatter.preamble(index):
            yield _data(chunk)
    calls: list[list[str]] = [[] for _ in choices]  # the ids of each choice's tool calls begun, in order
    sent: list[dict[str, int]] = [{} for _ in choices]  # characters of each call's arguments sent, by its id
    logprobs: list[list] = [[] for _ in choices]  # each choice's, since its last chunk
    dones = []
    try:
        async for index, piece in _merged(choices):
            if isinstance(piece, Logprobs):
                logprobs[index].extend(piece.items)
            elif isinstance(piece, Done):
                yield _data(formatter.last(index, piece, len(calls[index]), logprobs[index]))
                dones.append(piece)
            elif isinstance(piece, CallStart):
                yield _data(formatter.call_start(index, len(calls[index]), piece))
                calls[index].append(piece.id)
                sent[index][piece.id] = 0
            elif isinstance(piece, (CallArguments, Call)):
                # Fragments are the latest call's; a whole call (which may come after later calls began) sends
                # what its fragments have not: all of it, when none streamed.
                call = calls[index][-1] if isinstance(piece, CallArguments) else piece.id
                text = piece.text if isinstance(piece, CallArguments) else piece.arguments[sent[index][call] :]
                sent[index][call] += len(text)
                if text:
                    yield _data(formatter.call_arguments(index, calls[index].index(call), text))
            else:
                yield _data(formatter.piece(index, piece, logprobs[index]))
                logprobs[index] = [] if isinstance(piece, str) else logprobs[index]
        if formatter.include_usage:
            yield _data(formatter.usage_chunk(dones))
    except ToolCallFailed as error:
        yield _data(error_body(str(error), None, error.code, "server_error"))
        yield DONE
        return
    except GenerationFailed as error:
        yield _data(error_body(str(error), None, failure_code(error), "server_error"))
        yield DONE
        raise
    yield DONE


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
