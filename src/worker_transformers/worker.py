"""Startup: everything before the first job, then handing the handler to the runpod SDK.

Startup runs against RUNPOD_INIT_TIMEOUT (startup/budget.py): find the weights, start reading them into the page
cache, import torch, transformers and runpod while that read runs, load, warm up, then take jobs. When
startup fails (a bad setting, no model, a download too slow, damaged weights, out of memory), the worker
does not exit into a crash loop: it logs one line saying what to do, takes jobs anyway, and answers each
with that line as its error, so the caller sees why.
The handlers themselves are in serving/handlers.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker_transformers.config import ConfigError, Settings, compile_cache_folder, is_deployed
from worker_transformers.model import weights
from worker_transformers.model.errors import ModelNotFound, UnsupportedWeights
from worker_transformers.model.sources import resolve
from worker_transformers.serving.handlers import Handler, failed_init_handler, make_handler
from worker_transformers.serving.images import ImageLimits
from worker_transformers.serving.renderer import TEMPLATE_TIMEOUT_S, TemplateRenderers
from worker_transformers.serving.shutdown import Shutdown, exit_now
from worker_transformers.startup import prefetch
from worker_transformers.startup.budget import InitBudget, InitTooSlow, human_bytes
from worker_transformers.startup.collector import collector_paused
from worker_transformers.startup.readahead import Readahead
from worker_transformers.startup.sdk import import_runpod, quiet_runpod_logs

log = logging.getLogger("worker_transformers")

# COMPILE=before_ready: seconds of RUNPOD_INIT_TIMEOUT left unused by the compile, for handing over to the SDK.
COMPILE_RESERVE_S = 10.0


def import_libraries() -> None:
    """Startup's heavy imports (torch, transformers, runpod), in one place: setup runs them while the weights
    prefetch, and record_readahead runs them to learn which pages of which files they read."""
    from worker_transformers.loading import loader  # noqa: F401
    from worker_transformers.serving import frontend  # noqa: F401

    import_runpod()


def setup(settings: Settings, budget: InitBudget | None = None):
    """Find the weights, load them, start generation (its engine) and warm up, each step a phase of `budget`'s
    timeline. Raises on any failure."""
    from worker_transformers.model.download import download_from_hub

    budget = budget or InitBudget(settings.init_timeout_s)
    with budget.phase("resolve"):
        location = resolve(settings, download=lambda s: download_from_hub(s, budget))
        # No safetensors files: pickle weights, which sources let through only with ALLOW_PICKLE_WEIGHTS.
        files = weights.inspect(location.path, location.model_id) if weights.weight_paths(location.path) else []
    log.info("model %s found: %s at %s", location.model_id, location.source, location.path)
    reading = prefetch.start([f.path for f in files], budget)
    # The chat-template renderer's interpreter imports beside the worker's own imports (serving/renderer.py).
    renderers = TemplateRenderers.start(TEMPLATE_TIMEOUT_S, settings.max_concurrency)
    try:
        with collector_paused():
            with budget.phase("imports"):
                import_libraries()
                from worker_transformers.loading import loader
                from worker_transformers.generation.service import Generation
                from worker_transformers.serving.frontend import Frontend
                from worker_transformers.serving.tools import formats

                loader.import_model_code(location, settings)
            with budget.phase("tokenizer"):
                tokenizer = loader.load_tokenizer(location, settings)
                processor = loader.load_processor(location, settings, tokenizer)
                if processor is not None and not tokenizer.chat_template:  # kept with the processor's files
                    tokenizer.chat_template = processor.chat_template
                if settings.chat_template is not None:
                    use_chat_template(tokenizer, settings.chat_template)
                # A RESPONSE_TEMPLATE that names no format stops startup here, before the weights load; the
                # format is chosen once the chat template has rendered the warm-up (it may loop: bounded there).
                formats.check(settings.response_template)
        with budget.phase("model"):
            empty = loader.build_model(location, settings, files)
        with budget.phase("weights"):
            model = loader.load_weights(location, settings, files, empty)
        with budget.phase("warm-up"):
            images = image_prompts(processor, tokenizer)
            generation = Generation(
                model,
                tokenizer,
                settings.max_input_tokens,
                settings.max_concurrency,
                settings.max_new_tokens,
                settings.engine,
                images.sample(_render_sample(tokenizer)) if images is not None else None,
                settings.compile,
                _compile_artifacts(settings, location, model),
            )
            model_name = settings.served_model_name or location.model_id
            limits = ImageLimits.from_settings(settings)
            frontend = Frontend(generation, model_name, settings.max_input_tokens, renderers, images, limits)
            try:
                ids = frontend.warm_up_ids()  # the chat template renders, or startup stops here
                frontend.choose_tool_format(settings.response_template)
                if not generation.warmed_up:
                    loader.warm_up(model, tokenizer, ids)
            except BaseException:
                frontend.close()
                raise
        if settings.compile == "before_ready" and generation.decode_graph is not None:
            with budget.phase("compile"):
                compile_before_ready(generation.decode_graph, budget)
    except BaseException:
        renderers.close()
        raise
    finally:
        reading.stop()
    return frontend


def compile_before_ready(graph, budget: InitBudget) -> None:
    """COMPILE=before_ready: the decode step compiled before the worker takes jobs, unless that would overrun
    RUNPOD_INIT_TIMEOUT; then the worker is ready on the eager step and the compile goes on behind it."""
    graph.start()
    if not graph.wait(max(0.0, budget.remaining() - COMPILE_RESERVE_S)):
        log.warning(
            "the decode step is still compiling with %.0f s of RUNPOD_INIT_TIMEOUT left: ready on the eager step, "
            "the compiled one takes over once built",
            budget.remaining(),
        )


def _compile_artifacts(settings: Settings, location, model):
    """The file the compiled decode step is kept in (COMPILE_CACHE_DIR), named for this model's files."""
    from worker_transformers.generation.batch.compiled import artifacts_file

    folder = compile_cache_folder(settings, location.source)
    return artifacts_file(folder, model, f"{location.model_id}|{location.revision}|{location.path}")


def image_prompts(processor, tokenizer):
    """The processor's way in for image requests; None when the model takes none, or has no chat template to
    place its images with (then it serves text only, and says so)."""
    if processor is None:
        return None
    if not tokenizer.chat_template:
        log.warning("the model has an image processor but no chat template to place images with: it serves text only")
        return None
    from worker_transformers.serving.processing import ImagePrompts

    return ImagePrompts(processor)


def _render_sample(tokenizer):
    """The chat template applied to startup's own sample chat, in this process: its content is the worker's."""
    return lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def use_chat_template(tokenizer, template: str) -> None:
    """CHAT_TEMPLATE in place of the model's own: refused at startup, naming the setting, when it cannot render
    a one-message chat, rather than failing every chat job later."""
    from jinja2 import TemplateError

    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    except TemplateError as error:
        raise ConfigError(
            f"CHAT_TEMPLATE: the template cannot render a one-message chat ({type(error).__name__}: {error}); "
            "fix it, or unset CHAT_TEMPLATE to use the model's own"
        ) from None


# Startup failures a user can fix; their message says how. Anything else is a fault in the worker.
USER_ERRORS = (ConfigError, ModelNotFound, UnsupportedWeights, InitTooSlow)


def _user_fixable(error: Exception) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    from worker_transformers.loading.loader import LoadError  # needs torch, so it is not in USER_ERRORS

    return isinstance(error, LoadError)


@dataclass(frozen=True)
class Started:
    """What startup leaves to serve: the handler, how many jobs to take at once, and how to stop."""

    handler: Handler
    concurrency: int
    close: Callable[[], None]
    sdk_log_level: str = "info"
    shutdown_grace_s: int = 0  # a failed startup answers every job at once


def start_worker(
    env: Mapping[str, str],
    on_unhealthy: Callable[[], None] = lambda: None,
    reading_ahead: Readahead | None = None,
    compile_behind: bool = True,
) -> Started:
    """Run startup and return the engine's handler, or the failed-startup one. `reading_ahead`, started by
    the entry point, joins the timeline. `compile_behind`: COMPILE=background starts its compile at ready (not
    for a process that runs one job and exits)."""
    try:
        settings = Settings.from_env(env)
    except ConfigError as error:
        log.error("%s", error)
        return Started(failed_init_handler(str(error)), 1, lambda: None)
    budget = InitBudget.from_process_start(settings.init_timeout_s)
    budget.start_alarms()
    try:
        frontend = setup(settings, budget)
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
        return Started(failed_init_handler(message), 1, lambda: None, settings.runpod_log_level)
    if reading_ahead is not None:
        budget.add("readahead", reading_ahead.started, reading_ahead.ended)
        gone = reading_ahead.files_missing
        if reading_ahead.already_cached:
            log.info("read nothing ahead for the imports: their pages were in the page cache already")
        else:
            log.info(
                "read ahead %s of library pages for the imports%s",
                human_bytes(reading_ahead.bytes_requested),
                f"; {gone} files of its manifest are gone: run python -m worker_transformers.startup.record_readahead"
                if gone
                else "",
            )
    graph = frontend.generation.decode_graph
    if settings.compile == "background" and graph is not None and compile_behind:
        compiling = budget.begin("compile")  # the timeline shows it still running at ready
        graph.start(lambda: budget.end(compiling))
    budget.ready()
    handler = make_handler(frontend, settings, on_unhealthy)
    concurrency = frontend.generation.concurrency
    return Started(handler, concurrency, frontend.close, settings.runpod_log_level, settings.shutdown_grace_s)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(env: Mapping[str, str] = os.environ, argv: list[str] = sys.argv, readahead: Readahead | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # As a container's PID 1, Python is sent no SIGTERM it has no handler for, and the SDK installs its own
    # only once it takes jobs: without this, a worker stopped while loading waits for the SIGKILL.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # For a generator handler the SDK ignores a returned "refresh_worker"; it stops the worker after a job only
    # when its config says so (rp_job.handle_job), so the out-of-memory guard sets it there.
    config: dict[str, Any] = {"return_aggregate_stream": True}
    from worker_transformers.local import LocalJobError, local_job, run_local

    try:
        job = local_job(argv, deployed=is_deployed(env))
    except LocalJobError as error:
        log.error("%s", error)
        sys.exit(1)
    # One local job and exit: a compile in the background would only slow it down, and be cut off at exit.
    started = start_worker(env, lambda: config.update(refresh_worker=True), readahead, compile_behind=job is None)
    if job is not None:
        exit_code = asyncio.run(run_local(started.handler, job))
        started.close()
        sys.exit(exit_code)

    runpod = import_runpod()
    quiet_runpod_logs(started.sdk_log_level)
    shutdown = Shutdown(started.shutdown_grace_s)
    config["handler"] = shutdown.guard(started.handler)

    def concurrency(current: int) -> int:
        """Called on every fetch loop, from the SDK's event loop: a constant, since the SDK only resizes its
        queue when idle; the first call is where SIGTERM is chained in front of the SDK's handler."""
        shutdown.install()
        return started.concurrency

    config["concurrency_modifier"] = concurrency
    code = 0
    try:
        runpod.serverless.start(config)
    except SystemExit as stop:  # the SDK's own exit once its job loop has ended (after SIGTERM)
        code = stop.code if isinstance(stop.code, int) else 1
    exit_now(code, f"the SDK's job loop ended: exiting with code {code}")
