"""The worker's two phases: `setup` (once, before the first job) and the async handler (every job).

The handler is an async generator, because the runpod SDK streams only from functions written with `yield`.
Generation happens in the batcher's thread, so the SDK's event loop keeps fetching jobs, heartbeats and
cancellations while the model computes, and up to MAX_CONCURRENCY jobs share each forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from .config import ConfigError, Settings
from .schema import RequestError, parse_request
from .sources import ModelNotFound, UnsupportedWeights, resolve

log = logging.getLogger("worker_transformers")

Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any] | str]]


def setup(settings: Settings):
    """Find the weights, load them and build the engine. Raises on any failure."""
    from .engine import Engine  # torch and transformers load here, after the configuration is known good
    from .loading import load

    location = resolve(settings)
    log.info("model %s found: %s at %s", location.model_id, location.source, location.path)
    loaded = load(location, settings)
    return Engine(
        loaded.model, loaded.tokenizer, location.model_id, settings.max_input_tokens, settings.max_concurrency
    )


# Out-of-memory failures in a row after which the worker asks to be replaced: one can be a burst of long
# requests, several in a row mean this worker's device is in a bad state or too small for the traffic.
OOM_LIMIT = 3


class OomGuard:
    """Counts consecutive out-of-memory failures and, past OOM_LIMIT, asks the platform for a fresh worker."""

    def __init__(self, on_unhealthy: Callable[[], None]) -> None:
        self.on_unhealthy = on_unhealthy
        self.streak = 0

    def failed(self) -> None:
        self.streak += 1
        if self.streak >= OOM_LIMIT:
            log.error("%d out-of-memory failures in a row: asking the platform to replace this worker", self.streak)
            self.on_unhealthy()

    def succeeded(self) -> None:
        self.streak = 0


def make_handler(engine, settings: Settings, on_unhealthy: Callable[[], None] = lambda: None) -> Handler:
    from .batcher import Done
    from .engine import OutOfMemory
    from .openai_routes import OpenAIRoutes, error_result, is_openai_job

    openai = OpenAIRoutes(engine, settings.max_new_tokens)
    oom = OomGuard(on_unhealthy)

    async def answer(job_input: Any) -> AsyncIterator[dict[str, Any] | str]:
        if is_openai_job(job_input):
            async for item in openai.handle(job_input):
                yield item
            return
        # Everything the caller can get wrong is checked before the first chunk: a stream's consumers never
        # see an error yielded after it.
        try:
            request = parse_request(job_input, settings.max_new_tokens)
            ids = await asyncio.to_thread(engine.prompt_ids, request)
        except RequestError as error:
            yield {"error": str(error)}
            return
        text = ""  # a whole (non-streamed) answer is gathered here
        async for event in engine.stream(request, ids):
            if isinstance(event, Done):
                yield engine.response(event.text if request.stream else text + event.text, event)
            elif request.stream:
                yield {"text": event.text}
            else:
                text += event.text

    async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any] | str]:
        job_input = job.get("input")
        generated = False  # a refused job says nothing about the device's health
        try:
            async for item in answer(job_input):
                generated = generated or not (isinstance(item, dict) and "error" in item)
                yield item
        except OutOfMemory as error:
            oom.failed()
            if is_openai_job(job_input):
                yield error_result(str(error), code="out_of_memory", kind="server_error")
            else:
                yield {"error": str(error)}
            return
        if generated:
            oom.succeeded()

    return handler


def main(env: Mapping[str, str] = os.environ, argv: list[str] = sys.argv) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(env)
        engine = setup(settings)
    except (ConfigError, ModelNotFound, UnsupportedWeights) as error:
        log.error("%s", error)
        sys.exit(1)
    # For a generator handler the SDK ignores a returned "refresh_worker"; it stops the worker after a job only
    # when its config says so (rp_job.handle_job), so the guard sets it there.
    config: dict[str, Any] = {"return_aggregate_stream": True}
    handler = make_handler(engine, settings, on_unhealthy=lambda: config.update(refresh_worker=True))

    from .local import LocalJobError, local_job, run_local

    try:
        job = local_job(argv, settings)
    except LocalJobError as error:
        log.error("%s", error)
        sys.exit(1)
    if job is not None:
        exit_code = asyncio.run(run_local(handler, job))
        engine.close()
        sys.exit(exit_code)

    import runpod

    concurrency = settings.max_concurrency
    config["handler"] = handler
    # Called on every fetch loop; a constant, since the SDK only resizes its queue when idle.
    config["concurrency_modifier"] = lambda current: concurrency
    runpod.serverless.start(config)
