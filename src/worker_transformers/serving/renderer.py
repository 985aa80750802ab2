"""Chat templates rendered in processes of their own, none of them forked from the worker.

A chat template is code (Jinja) that ships with the model, and the messages it runs on are the caller's: a
template that loops, always or only on some content, would hold a thread for good, and Python cannot stop a
thread. So templates render in child processes, each one killed when a render runs past its limit; the job
fails, and a fresh child takes its place. The worker runs threads (the engine's, the SDK's, OpenMP's) and holds
torch, and a forked copy of such a process can deadlock on a lock some other thread held: children are started
as new interpreters (subprocess, which execs at once) and get the tokenizer pickled, never forked.

A child costs an interpreter, transformers' import and the tokenizer's unpickling (1-2 s, ~100 MB): the first
starts at the very beginning of startup, so that cost runs beside the worker's own imports, and it gets the
tokenizer once it is loaded. Children are kept for the worker's life and shared, one render at a time each;
when a render finds none idle for GROW_AFTER_S, one more is started (up to `max_children`) while it waits for
whichever is free first, so no request waits behind a slow render for long.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The package's folder for a child's PYTHONPATH: handler.py runs the worker from src/ without installing it.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
# How long one render may take before its child is killed and the job fails (prompt.TemplateTimeout).
TEMPLATE_TIMEOUT_S = 5.0
# How long a render waits for a busy child before it starts another.
GROW_AFTER_S = 0.05
# How long a child may take to import transformers and unpickle the tokenizer before it counts as failed.
START_LIMIT_S = 120.0


# Every child alive, whichever pool started it: killed at exit (atexit, or kill_all before os._exit).
_LIVE: set[_Child] = set()


class RenderTimeout(Exception):
    """The template did not finish within the limit; its child was killed."""


class RenderFailed(Exception):
    """The template raised (its own raise_exception, or a broken template); the message is the template's."""


class RendererUnavailable(RuntimeError):
    """No child could be started or given the tokenizer: a fault of the worker or its environment."""


class _Child:
    """One renderer process and the worker's end of its socket."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        warnings = [f"-W{option}" for option in sys.warnoptions]  # -W error and the like, as the worker runs
        command = [sys.executable, *warnings, "-m", __name__, str(theirs.fileno())]
        self.process = subprocess.Popen(command, pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self.connection = Connection(ours.detach())
        _LIVE.add(self)

    def bring_up(self, state: tuple[bytes, bytes], limit_s: float) -> None:
        """Hand the child the tokenizer and block until it has unpickled it (the child reads it once its imports
        are done); RendererUnavailable when it fails or takes too long."""
        try:
            for part in state:
                self.connection.send_bytes(part)
            ready = self.connection.poll(limit_s)
            answer = self.connection.recv() if ready else ("failed", f"not ready within {limit_s:.0f} s")
        except (EOFError, OSError):
            answer = ("failed", f"it exited with code {self.process.wait()}")
        if answer[0] != "ready":
            self.kill()
            raise RendererUnavailable(f"the chat-template renderer could not start: {answer[1]}")

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list | None,
        variables: dict[str, Any],
        limit_s: float,
        add_generation_prompt: bool = True,
    ) -> str:
        self.connection.send((messages, tools, variables, add_generation_prompt))
        if not self.connection.poll(limit_s):
            raise RenderTimeout
        kind, detail = self.connection.recv()
        if kind == "error":
            raise RenderFailed(detail)
        return detail

    def alive(self) -> bool:
        return self.process.poll() is None and not self.connection.closed

    def terminate(self) -> None:
        """SIGKILL, from any thread: whoever is using the connection sees its end of file and then calls `kill`."""
        self.process.kill()

    def kill(self) -> None:
        """SIGKILL, reaped, and the connection closed: by the one thread that holds this child (its render, its
        start, or the pool while it is idle), never while another thread reads the socket."""
        _LIVE.discard(self)
        self.process.kill()
        self.process.wait()
        self.connection.close()


class TemplateRenderers:
    """The pool of renderer children. `start` begins the first child's imports; `serve` hands the children the
    tokenizer; `render` is safe from any number of threads at once."""

    def __init__(self, limit_s: float, max_children: int) -> None:
        self.limit_s = limit_s
        self.max_children = max(1, max_children)
        self._state: tuple[bytes, bytes] | None = None  # the search path and the tokenizer, pickled once
        self._changed = threading.Condition()
        self._idle: list[_Child] = []
        self._unserved: list[_Child] = []  # started before the tokenizer was known
        self._members: set[_Child] = set()  # children alive: ready, rendering or starting
        self._starting = 0
        self._failure: str | None = None
        self._closed = False

    @classmethod
    def start(cls, limit_s: float, max_children: int = 1) -> TemplateRenderers:
        """A pool whose first child starts importing now."""
        renderers = cls(limit_s, max_children)
        with renderers._changed:
            child = _Child()
            renderers._members.add(child)
            renderers._unserved.append(child)
        return renderers

    def serve(self, tokenizer: Any) -> None:
        """Give the children this tokenizer (its chat template, special tokens); they are ready for renders once
        they have unpickled it, which `render` waits for."""
        # The tokenizer's class may come from the model's own code (transformers_modules, on a path transformers
        # added to sys.path): the child takes the worker's search path before it unpickles the tokenizer.
        state = (pickle.dumps(sys.path), pickle.dumps(tokenizer))
        with self._changed:
            self._state = state
            waiting, self._unserved = self._unserved, []
            self._starting += len(waiting)
            if not waiting:
                self._start_one()
        for child in waiting:
            self._bring_up_later(child)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list | None = None,
        variables: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The chat template applied to `messages` (and `tools`, and the template's own `variables` such as
        `enable_thinking`), with the generation prompt unless told otherwise. Raises RenderTimeout past the limit,
        RenderFailed when the template raises, RendererUnavailable when no child can start."""
        child = self._take()
        try:
            text = child.render(messages, tools, variables or {}, self.limit_s, add_generation_prompt)
        except RenderTimeout:
            self._replace(child)
            raise
        except (EOFError, OSError):  # the child died (killed by hand, out of memory, or by `close`)
            self._replace(child)
            if self._closed:
                raise RendererUnavailable("the worker is shutting down") from None
            log.error("a chat-template renderer died (exit code %s); started another", child.process.returncode)
            raise RendererUnavailable("the chat-template renderer died while rendering; send the request again")
        except RenderFailed:
            self._release(child)
            raise
        self._release(child)
        return text

    def close(self) -> None:
        with self._changed:
            self._closed = True
            held = self._idle + self._unserved
            busy = self._members.difference(held)
            self._members, self._idle, self._unserved = set(), [], []
            self._changed.notify_all()
        for child in held:
            child.kill()
        for child in busy:  # rendering or starting: its own thread sees the end of file and closes it
            child.terminate()

    @property
    def children(self) -> int:
        """Children alive: ready, rendering or starting."""
        return len(self._members)

    def pids(self) -> list[int]:
        """The process ids of every child alive."""
        with self._changed:
            return sorted(child.process.pid for child in self._members)

    def idle_pids(self) -> list[int]:
        """The process ids of the children waiting for a render."""
        with self._changed:
            return [child.process.pid for child in self._idle]

    def _take(self) -> _Child:
        """An idle child. With none idle, wait for one; one more is started only when none came back within
        GROW_AFTER_S (a render is ~0.1 ms), so bursts of fast renders share the children there are."""
        now = time.monotonic()
        deadline, grow_at = now + START_LIMIT_S, now + GROW_AFTER_S
        with self._changed:
            while True:
                if self._closed:
                    raise RendererUnavailable("the worker is shutting down")
                while self._idle:
                    child = self._idle.pop()
                    if child.alive():
                        return child
                    # It died while idle (killed by hand, or by the kernel for memory): no render is lost to it.
                    log.error("a chat-template renderer died while idle (exit code %s)", child.process.poll())
                    self._members.discard(child)
                    child.kill()
                if self._state is None:
                    raise RendererUnavailable("the chat-template renderers have no tokenizer yet")
                now = time.monotonic()
                if self._starting == 0:
                    if self._failure is not None:  # told once: the next render tries a new child again
                        failure, self._failure = self._failure, None
                        raise RendererUnavailable(failure)
                    if len(self._members) < self.max_children and now >= grow_at:
                        self._start_one()
                if now >= deadline:
                    raise RendererUnavailable(f"no chat-template renderer was free within {START_LIMIT_S:.0f} s")
                self._changed.wait((grow_at if now < grow_at else deadline) - now)

    def _start_one(self) -> None:
        """Start a child in the background (the caller holds the lock); it joins the idle ones once ready."""
        child = _Child()
        self._members.add(child)
        self._starting += 1
        self._bring_up_later(child)

    def _bring_up_later(self, child: _Child) -> None:
        threading.Thread(target=self._bring_up, args=(child,), name="template-renderer", daemon=True).start()

    def _bring_up(self, child: _Child) -> None:
        try:
            child.bring_up(self._state, START_LIMIT_S)
        except RendererUnavailable as error:
            with self._changed:
                if self._closed:  # killed by `close` while it started: nothing failed
                    return
                log.error("%s", error)
                self._members.discard(child)
                self._starting -= 1
                self._failure = str(error)
                self._changed.notify_all()
            return
        with self._changed:
            self._starting -= 1
            self._failure = None
        self._release(child)

    def _release(self, child: _Child) -> None:
        with self._changed:
            if not self._closed:
                self._idle.append(child)
                self._changed.notify()
                return
        child.kill()

    def _replace(self, child: _Child) -> None:
        """Kill a child that overran or died, and start its successor now, so the next render need not wait."""
        child.kill()
        with self._changed:
            self._members.discard(child)
            if not self._closed:
                self._start_one()


def kill_all() -> None:
    """Kill every renderer child of this process: for an exit that skips `close` and atexit (os._exit), since a
    child busy in a looping template would never see the worker go."""
    for child in list(_LIVE):
        child.terminate()


def _serve(connection: Connection) -> None:
    """The child: imports first (while the worker imports too), then the tokenizer, then one render per message
    until the worker closes its end or exits."""
    import transformers.tokenization_utils_base  # noqa: F401  (the tokenizers' code, without torch)

    try:
        search_path, tokenizer_state = connection.recv_bytes(), connection.recv_bytes()
    except EOFError:  # the worker closed its end before it had a tokenizer (a failed startup)
        return
    sys.path[:] = pickle.loads(search_path)
    try:
        tokenizer = pickle.loads(tokenizer_state)
    except Exception as error:  # a tokenizer class the child cannot import: the worker reports it
        connection.send(("failed", f"the tokenizer could not be unpickled ({type(error).__name__}: {error})"))
        return
    connection.send(("ready", ""))
    while True:
        try:
            messages, tools, variables, add_generation_prompt = connection.recv()
        except EOFError:  # the worker closed its end, or exited
            return
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False, **variables
            )
        except Exception as error:  # jinja2's TemplateError from raise_exception, or a template that is broken
            connection.send(("error", f"{type(error).__name__}: {error}"))
        else:
            connection.send(("text", text))


atexit.register(kill_all)

if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
