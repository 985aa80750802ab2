"""The worker's two phases: `setup` (once, before the first job) and the async handler (every job).

Blocking generation runs in a worker thread, so the SDK's event loop keeps fetching jobs, heartbeats and
cancellations while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .config import ConfigError, Settings
from .schema import RequestError, parse_request
from .sources import ModelNotFound, UnsupportedWeights, resolve

log = logging.getLogger("worker_transformers")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def setup(settings: Settings):
    """Find the weights, load them and build the engine. Raises on any failure."""
    from .engine import Engine  # torch and transformers load here, after the configuration is known good
    from .loading import load

    location = resolve(settings)
    log.info("model %s found: %s at %s", location.model_id, location.source, location.path)
    loaded = load(location, settings)
    return Engine(loaded.model, loaded.tokenizer, location.model_id, settings.max_input_tokens)


def make_handler(engine, settings: Settings) -> Handler:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        try:
            request = parse_request(job.get("input"), settings.max_new_tokens)
            return await asyncio.to_thread(engine.generate, request)
        except RequestError as error:
            return {"error": str(error)}

    return handler


def main(env: Mapping[str, str] = os.environ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(env)
        engine = setup(settings)
    except (ConfigError, ModelNotFound, UnsupportedWeights) as error:
        log.error("%s", error)
        sys.exit(1)

    import runpod

    runpod.serverless.start({"handler": make_handler(engine, settings), "return_aggregate_stream": True})
