"""The async handlers the runpod SDK calls for every job: the engine's, and the one a worker whose startup
failed serves instead.

Both are async generators, because the SDK streams only from functions written with `yield`. Generation
happens in the batcher's thread, so the SDK's event loop keeps fetching jobs, heartbeats and cancellations
while the model computes, and up to MAX_CONCURRENCY jobs share each forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from worker_transformers.config import Settings
from worker_transformers.serving.schema import RequestError, parse_request, sampling_defaults

log = logging.getLogger("worker_transformers")

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any] | str]]


# Out-of-memory events in a row after which the worker asks to be replaced: one can be a burst of long
# requests, several in a row mean this worker's device is in a bad state or too small for the traffic.
OOM_LIMIT = 3


class OomGuard:
    """Counts consecutive out-of-memory events and, past OOM_LIMIT, asks the platform for a fresh worker. One
    event that fails several requests (a decode step that sheds three) counts once."""

    def __init__(self, on_unhealthy: Callable[[], None]) -> None:
        self.on_unhealthy = on_unhealthy
        self.streak = 0
        self._counted: int | None = None

    def failed(self, event: int | None) -> None:
        if event is not None and event == self._counted:
            return
        self._counted = event
        self.streak += 1
        if self.streak >= OOM_LIMIT:
            log.error("%d out-of-memory failures in a row: asking the platform to replace this worker", self.streak)
            self.on_unhealthy()

    def succeeded(self) -> None:
        self.streak = 0


def make_handler(engine, settings: Settings, on_unhealthy: Callable[[], None] = lambda: None) -> Handler:
    from worker_transformers.generation.service import DeviceFailed, GenerationFailed, OutOfMemory
    from worker_transformers.generation.events import Done
    from worker_transformers.serving.openai.routes import DONE, OpenAIRoutes, error_result, is_openai_job
    from worker_transformers.serving.tools import (
        Call,
        Logprobs,
        Reasoning,
        ToolCallFailed,
        ToolFormat,
        call_reader,
        finish_reason,
        read_calls,
    )

    model_defaults = {}
    if settings.generation_config_defaults:
        model_defaults = sampling_defaults(engine.generation_config.to_dict(), "the model's generation_config.json")
        if model_defaults:
            log.info("requests that leave them out sample with the model's own %s", model_defaults)
    tool_format = ToolFormat.of(engine.tokenizer, engine.model_type)
    openai = OpenAIRoutes(engine, settings.max_new_tokens, model_defaults, tool_format)
    oom = OomGuard(on_unhealthy)

    async def answer(job_input: Any) -> AsyncIterator[dict[str, Any] | str]:
        if is_openai_job(job_input):
            async for item in openai.handle(job_input):
                yield item
            return
        # Everything the caller can get wrong is checked before the first chunk: a stream's consumers never
        # see an error yielded after it.
        try:
            request = parse_request(job_input, settings.max_new_tokens, model_defaults)
            tool_format.check(request)
            prepared = await asyncio.to_thread(engine.prepare, request)
        except RequestError as error:
            yield {"error": str(error)}
            return
        prompt = engine.tokenizer.decode(prepared.ids) if request.calls_tools else ""
        reader = call_reader(tool_format, request, prompt)
        # A whole answer is gathered here; a stream's chunk of text carries the log-probabilities gathered so far.
        text, reasoning, calls, logprobs = "", "", [], []
        try:
            async for piece in read_calls(engine.stream(request, prepared), reader):
                if isinstance(piece, Logprobs):
                    logprobs.extend(piece.items)
                elif isinstance(piece, Done):
                    response = engine.response(
                        "" if request.stream else text, piece, logprobs if request.logprobs else None
                    )
                    if reasoning:
                        response["reasoning_content"] = reasoning
                    if calls:  # a stream has sent its calls already
                        response["finish_reason"] = finish_reason(piece, len(calls))
                        if not request.stream:
                            response["tool_calls"] = calls
                    yield response
                elif isinstance(piece, Call):
                    calls.append(piece.openai())
                    if request.stream:
                        yield {"tool_calls": [piece.openai()]}
                elif isinstance(piece, Reasoning):
                    if request.stream:
                        yield {"reasoning_content": piece.text}
                    else:
                        reasoning += piece.text
                elif request.stream:
                    yield {"text": piece, **({"logprobs": engine.logprobs_json(logprobs)} if request.logprobs else {})}
                    logprobs = []
                else:
                    text += piece
        except ToolCallFailed as error:
            yield {"error": str(error)}

    async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
        job_input = job.get("input")
        generated = False  # a refused job says nothing about the device's health
        item: Any = None
        try:
            async for item in answer(job_input):
                generated = generated or not (isinstance(item, dict) and "error" in item)
                yield item
        except GenerationFailed as error:
            if isinstance(error, DeviceFailed):
                log.error("%s: asking the platform to replace this worker", error.__cause__ or error)
                on_unhealthy()
            elif isinstance(error, OutOfMemory):
                oom.failed(error.event)
            if item == DONE:  # an OpenAI stream, already ended with the error
                return
            if not isinstance(error, (OutOfMemory, DeviceFailed)):
                raise
            if is_openai_job(job_input):
                code = "out_of_memory" if isinstance(error, OutOfMemory) else "device_error"
                yield error_result(str(error), code=code, kind="server_error")
            else:
                yield {"error": str(error)}
            return
        if generated:
            oom.succeeded()

    return handler


def failed_init_handler(message: str) -> Handler:
    """The handler of a worker whose startup failed: every job fails with the reason and the fix."""

    async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"error": message}

    return handler
