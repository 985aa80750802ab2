"""The worker's two phases: `setup` (once, before the first job) and the async handler (every job).

Startup runs against RUNPOD_INIT_TIMEOUT (budget.py): find the weights, start reading them into the page
cache, import torch, transformers and runpod while that read runs, load, warm up, then take jobs. When
startup fails (a bad setting, no model, a download too slow, damaged weights, out of memory), the worker
does not exit into a crash loop: it logs one line saying what to do, takes jobs anyway, and answers each
with that line as its error, so the caller sees why.

Blocking generation runs in a worker thread, so the SDK's event loop keeps fetching jobs, heartbeats and
cancellations while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from . import prefetch, weights
from .budget import InitBudget, InitTooSlow
from .config import ConfigError, Settings
from .schema import RequestError, parse_request
from .sources import ModelNotFound, UnsupportedWeights, resolve

log = logging.getLogger("worker_transformers")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def setup(settings: Settings, budget: InitBudget | None = None):
    """Find the weights, load them, warm up and build the engine, each step a phase of `budget`'s
    timeline. Raises on any failure."""
    from .download import download_from_hub

    budget = budget or InitBudget(settings.init_timeout_s)
    with budget.phase("resolve"):
        location = resolve(settings, download=lambda s: download_from_hub(s, budget))
        files = weights.inspect(location.path, location.model_id)
    log.info("model %s found: %s at %s", location.model_id, location.source, location.path)
    reading = prefetch.start([f.path for f in files], budget)
    try:
        with budget.phase("imports"):
            from . import loading
            from .engine import Engine

            loading.import_model_code(location, settings)
            import_runpod()
        with budget.phase("tokenizer"):
            tokenizer = loading.load_tokenizer(location, settings)
        with budget.phase("weights"):
            model = loading.load_model(location, settings, files)
        with budget.phase("warm-up"):
            loading.warm_up(model, tokenizer)
    finally:
        reading.stop()
    return Engine(model, tokenizer, location.model_id, settings.max_input_tokens)


def make_handler(engine, settings: Settings) -> Handler:
    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        try:
            request = parse_request(job.get("input"), settings.max_new_tokens)
            return await asyncio.to_thread(engine.generate, request)
        except RequestError as error:
            return {"error": str(error)}

    return handler


def failed_init_handler(message: str) -> Handler:
    """The handler of a worker whose startup failed: every job fails with the reason and the fix.
    A plain async function, not a generator, so `--test_input` runs it and exits 1."""

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        return {"error": message}

    return handler


def import_runpod():
    """Import the runpod SDK without its one-second processor probe. At import, runpod's rp_debugger calls
    py-cpuinfo's get_cpu_info(), which runs a second Python process, for one field of `--rp_debugger`
    output: the processor's name. /proc/cpuinfo gives that name at once; the probe is swapped only for the
    duration of this import."""
    try:
        import cpuinfo
    except ImportError:  # a runpod release without py-cpuinfo has nothing to skip
        import runpod

        return runpod
    probe = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": processor_name()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = probe
    return runpod


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


# Startup failures a user can fix; their message says how. Anything else is a fault in the worker.
USER_ERRORS = (ConfigError, ModelNotFound, UnsupportedWeights, InitTooSlow)


def _user_fixable(error: Exception) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    from .loading import LoadError  # needs torch, so it is not in USER_ERRORS

    return isinstance(error, LoadError)


def start_worker(env: Mapping[str, str]) -> Handler:
    """Run startup and return the handler to serve: the engine's, or the failed-startup one."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as error:
        log.error("%s", error)
        return failed_init_handler(str(error))
    budget = InitBudget.from_process_start(settings.init_timeout_s)
    budget.start_alarms()
    try:
        engine = setup(settings, budget)
    except Exception as error:
        budget.stop_alarms()
        if _user_fixable(error):
            message = str(error)
            log.error("startup failed after %.1f s: %s", budget.elapsed(), message)
        else:
            first_line = (str(error).splitlines() or [""])[0][:300]
            message = (
                f"startup failed unexpectedly ({type(error).__name__}: {first_line}); the worker log has the traceback"
            )
            log.exception("startup failed unexpectedly after %.1f s", budget.elapsed())
        return failed_init_handler(message)
    budget.ready()
    return make_handler(engine, settings)


def main(env: Mapping[str, str] = os.environ) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = start_worker(env)
    runpod = import_runpod()
    runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
