"""The engine: what every way of running the model is to the rest of the worker, declared once.

Three engines implement it: the batcher (batch/batcher.py), transformers' continuous batching (continuous.py) and one
request at a time through `generate` (serial.py). The ENGINE setting, or choice.py when it is `auto`, picks one
at startup, and service.py holds it. Each runs on a thread of its own: `submit` queues a request (a Sequence,
events.py) and wakes the thread, which hands the request its tokens as it generates them; `cancel` marks a
request nobody waits for any more; `close` stops the thread once every request submitted so far is done. An
out-of-memory error fails the requests it hit as one numbered event, after the device's cached memory is given
back, so the handler counts it once however many requests it failed.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable

import torch
from transformers import PreTrainedModel

from worker_transformers.generation.events import Sequence
from worker_transformers.generation.sampling import TokenLogprobs

_oom_events = itertools.count(1)


class Engine(ABC):
    """Requests in, each request's tokens out to its Sequence, on the engine's own thread. Engines write `_run`
    (the thread's loop) and `in_flight`."""

    max_batch: int  # the most requests it runs at once: what the SDK should hand this worker
    # The largest reservation (prompt and new tokens) one request can have here; None: no limit.
    max_request_tokens: int | None = None
    peak_batch = 0  # the most requests run together so far (for tests and benchmarks)

    def __init__(self, thread_name: str, model: PreTrainedModel, eos_ids: set[int]) -> None:
        self.model = model
        # Read once: the model's own properties look through its parameters each time, a cost in every step.
        self.device = model.device
        self.eos_ids = eos_ids
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    @abstractmethod
    def _run(self) -> None:
        """The engine's thread: generate for the requests submitted until `close`."""

    @abstractmethod
    def in_flight(self) -> int:
        """Requests submitted and not yet done, those still waiting included."""

    def submit(self, sequence: Sequence) -> None:
        release_openmp_team()  # the submitting thread (startup's, the event loop's) computes nothing itself
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()

    def one_turn(self) -> threading.Condition:
        """A block whose submissions the engine takes together: its thread waits for the block to end (for tests
        and benchmarks that need several requests in one prefill)."""
        return self._wake

    def cancel(self, sequence: Sequence) -> None:
        """Nobody wants the rest of this request: it leaves at the engine's next step."""
        sequence.cancelled = True
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _accept(
        self, sequences: Iterable[Sequence], tokens: Iterable[int], reports: Iterable[TokenLogprobs | None]
    ) -> None:
        """Each sequence takes its chosen token (and its log-probabilities, when it asked for them)."""
        for sequence, token, report in zip(sequences, tokens, reports):
            if not sequence.finished:
                sequence.accept(token, self.eos_ids, report)

    def _release_memory(self) -> None:
        """The device's cached memory given back, after a failure that may have left it full."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _out_of_memory(self) -> int:
        """The memory given back after an out-of-memory error; the number of that new event."""
        self._release_memory()
        return new_oom_event()


def new_oom_event() -> int:
    """A number for an out-of-memory event: the requests one event fails share it, so it is counted once."""
    return next(_oom_events)


def _gnu_openmp_pause() -> Callable[[int], int] | None:
    process = ctypes.CDLL(None)  # torch has loaded its OpenMP into the process's global symbols
    if hasattr(process, "kmp_set_blocktime") or not hasattr(process, "omp_pause_resource_all"):
        return None  # LLVM's or Intel's OpenMP (their pause stops every thread's team), or none
    return process.omp_pause_resource_all


_openmp_pause = _gnu_openmp_pause()
_OMP_PAUSE_SOFT = 1


def release_openmp_team() -> None:
    """End the calling thread's idle OpenMP team (GNU OpenMP, which torch's Linux wheels use; elsewhere nothing).

    GNU OpenMP gives each thread that runs parallel work a team of its own, and once the teams' threads
    outnumber the CPUs, a thread waiting at a barrier sleeps at once instead of spinning: each of a forward's
    hundreds of small parallel operations then pays for wake-ups, and an engine thread's forward takes up to
    twice as long as the same forward on the main thread. The thread that loaded and warmed up the model keeps
    such a team, idle; the engine's thread must be the only one with a team for the model to run at full speed.
    """
    if _openmp_pause is not None:
        _openmp_pause(_OMP_PAUSE_SOFT)
