"""The async handlers the runpod SDK calls for every job: the worker's (each job to its format, plain.py or
openai/routes.py), and the one a worker whose startup failed serves instead.

Both are async generators, because the SDK streams only from functions written with `yield`. Generation
happens on the engine's thread, so the SDK's event loop keeps fetching jobs, heartbeats and cancellations
while the model computes, and up to MAX_CONCURRENCY jobs share each forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from worker_transformers.config import Settings
from worker_transformers.serving.schema import sampling_defaults

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


def make_handler(frontend, settings: Settings, on_unhealthy: Callable[[], None] = lambda: None) -> Handler:
    """The engine's handler: an OpenAI job to the OpenAI routes, any other to the plain format, and each
    failure of the device counted towards asking for a fresh worker."""
    from worker_transformers.generation.errors import DeviceFailed, GenerationFailed, OutOfMemory
    from worker_transformers.serving.openai.protocol import DONE, error_result, failure_code, is_openai_job
    from worker_transformers.serving.openai.routes import OpenAIRoutes
    from worker_transformers.serving.plain import PlainJobs

    model_defaults = _model_defaults(frontend.generation.generation_config, settings)
    tool_format = frontend.tool_format
    formats = (
        OpenAIRoutes(frontend, settings.max_new_tokens, model_defaults, tool_format),
        PlainJobs(frontend, settings.max_new_tokens, model_defaults, tool_format),
    )
    oom = OomGuard(on_unhealthy)

    async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
        job_input = job.get("input")
        openai = is_openai_job(job_input)
        generated = False  # a refused job says nothing about the device's health
        item: Any = None
        try:
            async for item in formats[0 if openai else 1].handle(job_input):
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
            if openai:
                yield error_result(str(error), code=failure_code(error), kind="server_error")
            else:
                yield {"error": str(error)}
            return
        if generated:
            oom.succeeded()

    return handler


def _model_defaults(generation_config, settings: Settings) -> dict[str, Any]:
    """The model's own sampling values for what a request leaves out, when GENERATION_CONFIG_DEFAULTS asks."""
    if not settings.generation_config_defaults:
        return {}
    defaults = sampling_defaults(generation_config.to_dict(), "the model's generation_config.json")
    if defaults:
        log.info("requests that leave them out sample with the model's own %s", defaults)
    return defaults


def failed_init_handler(message: str) -> Handler:
    """The handler of a worker whose startup failed: every job fails with the reason and the fix."""

    async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"error": message}

    return handler
