"""OpenAI's Responses API (/v1/responses) on the chat path: the body becomes a chat completion body
(responses_bodies.py), and the answer's pieces (answer.py) become output items, whole or streamed.

An answer's output is its items in the order the model wrote them: a `reasoning` item for its reasoning, a `message`
for its text and a `function_call` per tool call. The whole answer and the streamed one are made by the same
`_Output`, so they always agree. A stream is Server-Sent Events, each with its `event:` line as OpenAI sends them,
numbered by `sequence_number`: response.created, response.in_progress, each item's events, then
response.completed (or response.incomplete, cut short by max_output_tokens), and `data: [DONE]` last, as every
stream of this worker ends (the `openai` client stops there). A failure midway sends an `error` event and
response.failed before it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from worker_transformers.generation.errors import GenerationFailed
from worker_transformers.generation.events import Done
from worker_transformers.serving.answer import Logprobs, Piece, read, usage
from worker_transformers.serving.openai.bodies import ChatCompletionBody
from worker_transformers.serving.openai.protocol import (
    DONE,
    error_result,
    failure_code,
    first_param,
    model_not_served,
    param_of,
)
from worker_transformers.serving.openai.responses_bodies import FieldNames, ResponsesBody, TextConfig
from worker_transformers.serving.schema import GenerationRequest, RequestError, check_text, describe
from worker_transformers.serving.tools.reader import Call, CallArguments, CallStart, Reasoning, ToolCallFailed


async def handle(routes, body: dict[str, Any]) -> AsyncIterator[Any]:
    """Answer a Responses body with `routes` (routes.OpenAIRoutes: its frontend, token cap, sampling defaults and
    tool format): one Response object, or its stream."""
    names: FieldNames | None = None  # once the chat body is made, its problems are renamed
    try:
        check_text(body)
        parsed = ResponsesBody.model_validate(body)
        if parsed.model != routes.frontend.model_name:
            yield model_not_served(parsed.model, routes.frontend.model_name)
            return
        chat, names = parsed.chat_body()
        request = _request(chat, routes.max_new_tokens, routes.sampling_defaults)
        routes.tool_format.check(request)
        prepared = await asyncio.to_thread(routes.frontend.prepare, request)
    except ValidationError as error:
        yield error_result(describe(error), first_param(error))
        return
    except RequestError as error:
        message = names.rename(str(error)) if names is not None else str(error)
        yield error_result(message, param_of(message))
        return
    shape = _Shape(parsed, request, routes.frontend.model_name)
    pieces = read(routes.frontend, request, prepared, routes.tool_format)
    if request.stream:
        async for event in _stream(shape, pieces):
            yield event
        return
    try:
        yield await _whole(shape, pieces)
    except ToolCallFailed as error:
        yield error_result(str(error), None, error.code, "server_error")


def _request(chat: dict[str, Any], cap: int, model_defaults) -> GenerationRequest:
    try:
        return ChatCompletionBody.model_validate(chat).to_request(cap, model_defaults)
    except ValidationError as error:  # named as the chat body names its fields; the caller renames them
        raise RequestError(describe(error)) from None


async def _whole(shape: _Shape, pieces: AsyncIterator[Piece | Done]) -> dict[str, Any]:
    output = _Output()
    async for piece in pieces:
        output.take(piece)
        if isinstance(piece, Done):
            return shape.response(output, piece)
    raise RuntimeError("the generation ended without a final event")


async def _stream(shape: _Shape, pieces: AsyncIterator[Piece | Done]) -> AsyncIterator[str]:
    """The response as Server-Sent Events. A failure of the model is raised after the stream's end, for the handler
    to count."""
    numbers = itertools.count()

    def sse(event: dict[str, Any]) -> str:
        event["sequence_number"] = next(numbers)
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    output = _Output()
    for kind in ("response.created", "response.in_progress"):
        yield sse({"type": kind, "response": shape.response(output)})
    try:
        async for piece in pieces:
            for event in output.take(piece):
                yield sse(event)
            if isinstance(piece, Done):
                response = shape.response(output, piece)
                yield sse({"type": f"response.{response['status']}", "response": response})
    except ToolCallFailed as error:
        for event in shape.failure(output, str(error), error.code):
            yield sse(event)
        yield DONE
        return
    except GenerationFailed as error:
        for event in shape.failure(output, str(error), failure_code(error)):
            yield sse(event)
        yield DONE
        raise
    yield DONE


class _Shape:
    """The Response object of one request: its id, and the settings it echoes."""

    def __init__(self, body: ResponsesBody, request: GenerationRequest, model: str) -> None:
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        choice = body.tool_choice or "auto"
        self.echoed = {
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "model": model,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
            "temperature": request.temperature,
            "text": {"format": (body.text or TextConfig()).format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": request.top_p,
            "truncation": "disabled",
            "user": body.user,
            "background": False,
        }

    def response(self, output: _Output, done: Done | None = None, error: str | None = None) -> dict[str, Any]:
        """The Response as it stands: in progress until `done`, then completed or incomplete; failed with `error`."""
        if error is not None:
            status = "failed"
        elif done is None:
            status = "in_progress"
        else:
            status = "incomplete" if done.finish_reason == "length" else "completed"
        response = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **self.echoed,
            "output": [item.json() for item in output.items],
            "usage": _usage(done) if done is not None else None,
        }
        if status == "completed":
            response["completed_at"] = int(time.time())
        # Only a failed response has an error: the handler (handlers.py) takes a result with an `error` key for a
        # refused job, and `error: null` is the type's default anyway.
        if error is not None:
            response["error"] = {"code": "server_error", "message": error}
        return response

    def failure(self, output: _Output, message: str, code: str) -> list[dict[str, Any]]:
        """The events that end a stream that failed: the error, then the response as far as it got."""
        return [
            {"type": "error", "code": code, "message": message, "param": None},
            {"type": "response.failed", "response": self.response(output, error=message)},
        ]


def _usage(done: Done) -> dict[str, Any]:
    counts = usage([done])
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},  # not counted apart from the answer's
        "total_tokens": counts["total_tokens"],
    }


@dataclass
class _Item:
    """One output item as it grows: a reasoning, a message, or a function call."""

    kind: str  # "reasoning" | "message" | "function_call"
    index: int  # its place in the output
    text: list[str] = field(default_factory=list)  # the reasoning's or message's text, or the call's arguments
    call: CallStart | None = None  # a function call's id and name
    status: str = "in_progress"
    whole: bool = False  # a function call whose whole Call came
    id: str = field(init=False)

    def __post_init__(self) -> None:
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[self.kind]
        self.id = f"{prefix}_{uuid.uuid4().hex}"

    def json(self, opening: bool = False) -> dict[str, Any]:
        """The item as the output shows it; `opening`: as the event that adds it shows it, before its parts."""
        text = "".join(self.text)
        if self.kind == "function_call":
            call = {"call_id": self.call.id, "name": self.call.name, "arguments": text}
            return {"id": self.id, "type": "function_call", **call, "status": self.status}
        content = [] if opening else [self.part(text)]
        if self.kind == "reasoning":
            return {"id": self.id, "type": "reasoning", "summary": [], "content": content, "status": self.status}
        return {"id": self.id, "type": "message", "role": "assistant", "status": self.status, "content": content}

    def part(self, text: str) -> dict[str, Any]:
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Output:
    """The output items of one answer, made as its pieces come, and the stream events that tell each step. A
    reasoning or a message opens at its first piece and closes when a piece of another item comes or the answer
    ends; a function call opens at its CallStart and closes after its whole Call, at the next piece that is not
    another call's whole Call. Whitespace that no message has taken yet is held: it begins the next message, or
    is dropped around calls, as the chat path drops an answer's whitespace beside its calls."""

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.open: _Item | None = None  # the reasoning or message that text goes to now
        self.call: _Item | None = None  # the call whose arguments stream now
        self.calls: dict[str, _Item] = {}  # every call, by its id
        self.held = ""

    def take(self, piece: Piece | Done) -> list[dict[str, Any]]:
        if isinstance(piece, Logprobs):
            return []
        if isinstance(piece, Done):
            return self._end("incomplete" if piece.finish_reason == "length" else "completed")
        if isinstance(piece, Call):
            return self._whole_call(piece)
        events = self._close_calls("completed")
        if isinstance(piece, Reasoning):
            self.held = ""
            return events + self._text("reasoning", piece.text)
        if isinstance(piece, CallStart):
            self.held = ""
            return events + self._close_open("completed") + self._open_call(piece)
        if isinstance(piece, CallArguments):
            return events + self._arguments(piece.text)
        if (self.open is None or self.open.kind != "message") and not piece.strip():
            self.held += piece
            return events
        text, self.held = self.held + piece, ""
        return events + self._text("message", text)

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self.open is None or self.open.kind != kind:
            events = self._close_open("completed") + self._open(kind)
        self.open.text.append(text)
        delta = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [*events, {"type": delta, **self._place(self.open), "content_index": 0, "delta": text, **extra}]

    def _open(self, kind: str) -> list[dict[str, Any]]:
        self.open = item = self._add(kind)
        added = {"type": "response.content_part.added", **self._place(item), "content_index": 0, "part": item.part("")}
        return [self._added(item), added]

    def _close_open(self, status: str) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        item.status, text = status, "".join(item.text)
        kind = "response.reasoning_text.done" if item.kind == "reasoning" else "response.output_text.done"
        extra = {} if item.kind == "reasoning" else {"logprobs": []}
        place = {**self._place(item), "content_index": 0}
        return [
            {"type": kind, **place, "text": text, **extra},
            {"type": "response.content_part.done", **place, "part": item.part(text)},
            self._done(item),
        ]

    def _open_call(self, start: CallStart) -> list[dict[str, Any]]:
        self.call = item = self._add("function_call", start)
        self.calls[start.id] = item
        return [self._added(item)]

    def _arguments(self, text: str) -> list[dict[str, Any]]:
        if self.call is None or not text:
            return []
        self.call.text.append(text)
        return [{"type": "response.function_call_arguments.delta", **self._place(self.call), "delta": text}]

    def _whole_call(self, call: Call) -> list[dict[str, Any]]:
        """A call's whole arguments: the rest of what its fragments did not send, then its end."""
        events = []
        if call.id not in self.calls:  # a call that came whole, with no start of its own
            events = self._close_calls("completed") + self._close_open("completed")
            events += self._open_call(CallStart(call.id, call.name))
        item = self.call = self.calls[call.id]
        events += self._arguments(call.arguments[len("".join(item.text)) :])
        item.text, item.whole = [call.arguments], True
        arguments = {"type": "response.function_call_arguments.done", **self._place(item), "arguments": call.arguments}
        return [*events, arguments]

    def _close_calls(self, status: str, cut: bool = False) -> list[dict[str, Any]]:
        """The end of the calls whose whole Call came; with `cut`, of those whose whole Call never came too."""
        events = []
        for item in self.calls.values():
            if item.status != "in_progress" or not (item.whole or cut):
                continue
            if not item.whole:
                done = {"type": "response.function_call_arguments.done", **self._place(item)}
                events.append({**done, "arguments": "".join(item.text)})
            item.status = status
            events.append(self._done(item))
        return events

    def _end(self, status: str) -> list[dict[str, Any]]:
        events = self._close_open(status) + self._close_calls(status) + self._close_calls("incomplete", cut=True)
        if not self.calls and (self.held or not self.items):  # an answer of whitespace, or of nothing, is a message
            events += self._open("message")
            if self.held:
                events += self._text("message", self.held)
            events += self._close_open(status)
        return events

    def _add(self, kind: str, call: CallStart | None = None) -> _Item:
        item = _Item(kind, len(self.items), call=call)
        self.items.append(item)
        return item

    def _added(self, item: _Item) -> dict[str, Any]:
        return {"type": "response.output_item.added", "output_index": item.index, "item": item.json(opening=True)}

    def _done(self, item: _Item) -> dict[str, Any]:
        return {"type": "response.output_item.done", "output_index": item.index, "item": item.json()}

    @staticmethod
    def _place(item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": item.index}
