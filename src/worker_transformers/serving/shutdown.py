"""SIGTERM on a deployed worker: stop taking jobs, give the running ones SHUTDOWN_GRACE_S to finish, fail the
rest with a message saying the worker was stopped, then exit.

The runpod SDK handles SIGTERM itself by no longer fetching jobs and then waiting, with no bound, for every
job it holds; the platform sends SIGKILL some seconds later, and a job cut off that way is never answered.
So the SDK's handler is kept and chained: it stops the fetching, and this module bounds the wait. The SDK
installs its handler as its job loop starts, so this one is put in front of it at the first call of the
concurrency modifier, which the SDK makes from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from worker_transformers.serving import renderer

log = logging.getLogger("worker_transformers")

# After the last job is answered or cut off: time for the SDK to send those answers before the process exits.
REPORT_S = 2.0


class Shutdown:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.stopping = threading.Event()
        self._idle = threading.Event()  # set while no job runs
        self._idle.set()
        self._running = 0
        self._cut_off = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sdk_handler: Any = None

    def install(self) -> None:
        """Chain SIGTERM in front of the SDK's own handler; called from the SDK's event loop, once is enough."""
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            return
        self._loop = asyncio.get_running_loop()
        self._sdk_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def guard(self, handler):
        """`handler` with each job cut off once the grace period after SIGTERM is over."""

        async def guarded(job: dict[str, Any]) -> AsyncIterator[Any]:
            if self.stopping.is_set():  # taken by the SDK before SIGTERM, started after it
                yield {"error": "the worker was stopped (SIGTERM) before this job started; send it again"}
                return
            self._running += 1
            self._idle.clear()
            try:
                async for item in self._until_cut_off(handler(job)):
                    yield item
            finally:
                self._running -= 1
                if self._running == 0:
                    self._idle.set()

        return guarded

    async def _until_cut_off(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        cut_off = asyncio.ensure_future(self._cut_off.wait())
        next_item: asyncio.Future | None = None
        try:
            while True:
                next_item = asyncio.ensure_future(anext(items))
                await asyncio.wait((next_item, cut_off), return_when=asyncio.FIRST_COMPLETED)
                if cut_off.done():
                    next_item.cancel()  # the engine takes the request out of the batch
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await next_item
                    yield {
                        "error": f"the worker was stopped (SIGTERM) before this job finished: it ran past "
                        f"SHUTDOWN_GRACE_S={self.grace_s:g} s; send it again"
                    }
                    return
                try:
                    item = next_item.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            cut_off.cancel()
            if next_item is not None and not next_item.done():  # this job was cancelled, or its stream closed
                next_item.cancel()

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        log.info("SIGTERM: taking no more jobs; running ones have %g s to finish", self.grace_s)
        if callable(self._sdk_handler):
            self._sdk_handler(signum, frame)  # the SDK stops fetching jobs
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.call_later, self.grace_s, self._cut_off.set)
        threading.Thread(target=self._exit_when_done, args=(128 + signum,), name="shutdown", daemon=True).start()

    def _exit_when_done(self, code: int) -> None:
        """The SDK can keep the process for a minute and more after its last job (a job request it is still
        waiting on), past the platform's SIGKILL: exit once every job is answered."""
        self._idle.wait(self.grace_s + REPORT_S)
        threading.Event().wait(REPORT_S)
        exit_now(code, "SIGTERM: exiting")


def exit_now(code: int, why: str) -> NoReturn:
    """End the process without the interpreter's teardown. There, a daemon thread that comes back from native
    code (the engine's, mid-forward in torch) is ended by pthread_exit, whose unwinding through C++ frames
    aborts the process (`terminate called without an active exception`, seen with torch 2.8 on Python 3.12)."""
    log.info("%s", why)
    renderer.kill_all()  # os._exit runs no atexit, and a child busy in a looping template would outlive it
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
