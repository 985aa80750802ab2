"""The init budget: RUNPOD_INIT_TIMEOUT as a deadline, and the startup timeline measured against it.

The platform kills a worker whose startup runs past RUNPOD_INIT_TIMEOUT and retries it, for days, without
telling anyone why. So the worker keeps its own clock, from the start of its process: every phase is
timed, a warning is logged when startup passes 50 % and 80 % of the budget, a transfer that cannot finish
in time stops early with the numbers and the fixes, and at ready one table shows where the time went.
Light on purpose (no torch): it runs before the heavy imports it measures.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WARN_AT = (0.5, 0.8)
# What a transfer must leave for everything after it: imports, reading the weights from local disk into the
# device, warm-up. Generous on purpose: a GPU image imports in 10-30 s, and a local disk reads >= 500 MB/s.
RESERVE_FIXED_S = 30.0
RESERVE_BYTES_PER_S = 500e6
# A transfer is judged on its average rate once it has run this long; earlier rates are mostly ramp-up.
MIN_OBSERVE_S = 5.0
# Progress may come in large steps (huggingface_hub reports plain HTTP downloads every 10 MB), so a
# transfer is called stalled only after this long without a byte.
STALL_S = 30.0


class InitTooSlow(Exception):
    """Startup cannot finish within RUNPOD_INIT_TIMEOUT. The message gives the numbers and the fixes."""


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), so that interpreter start-up is counted too."""
    try:
        # Field 22 of /proc/self/stat is the start time in clock ticks after boot; fields are counted after
        # the command name, which is in parentheses and may itself hold spaces.
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass(frozen=True)
class Phase:
    name: str
    start_s: float  # seconds after process start
    end_s: float | None  # None while it runs (a background phase may still run at ready)


class InitBudget:
    """The deadline and the timeline of one startup. Thread-safe: background phases record into it too."""

    def __init__(self, timeout_s: float, *, clock: Callable[[], float] = time.monotonic, age_s: float = 0.0) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._origin = clock() - age_s
        self._phases: list[Phase] = []
        self._current = "startup"
        self._lock = threading.Lock()
        self._alarms: list[threading.Timer] = []

    @classmethod
    def from_process_start(cls, timeout_s: float) -> InitBudget:
        return cls(timeout_s, age_s=process_age_s())

    def elapsed(self) -> float:
        return self._clock() - self._origin

    def remaining(self) -> float:
        return self.timeout_s - self.elapsed()

    @property
    def phases(self) -> list[Phase]:
        with self._lock:
            return list(self._phases)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the main startup path."""
        index = self.begin(name)
        with self._lock:
            self._current = name
        try:
            yield
        finally:
            self.end(index)

    def begin(self, name: str) -> int:
        """Start a phase that ends elsewhere (a background thread); returns its handle for `end`."""
        with self._lock:
            self._phases.append(Phase(name, self.elapsed(), None))
            return len(self._phases) - 1

    def end(self, index: int) -> None:
        with self._lock:
            phase = self._phases[index]
            self._phases[index] = Phase(phase.name, phase.start_s, self.elapsed())

    def add(self, name: str, started: float, ended: float | None) -> None:
        """Record a phase timed elsewhere, by this budget's clock (time.monotonic), before the budget existed."""
        end_s = None if ended is None else ended - self._origin
        with self._lock:
            self._phases.append(Phase(name, started - self._origin, end_s))
            self._phases.sort(key=lambda phase: phase.start_s)

    def start_alarms(self) -> None:
        """Log a warning when startup passes each share of the budget in WARN_AT, wherever it then is."""
        for share in WARN_AT:
            timer = threading.Timer(max(0.0, share * self.timeout_s - self.elapsed()), self._warn, (share,))
            timer.daemon = True
            timer.start()
            self._alarms.append(timer)

    def stop_alarms(self) -> None:
        for timer in self._alarms:
            timer.cancel()
        self._alarms.clear()

    def _warn(self, share: float) -> None:
        log.warning(
            "startup has used %.0f %% of RUNPOD_INIT_TIMEOUT=%g s (%.0f s) and is still in phase %r; "
            "if it runs out the platform kills this worker: bake the model into the image, use a cached model, "
            "or raise RUNPOD_INIT_TIMEOUT",
            share * 100,
            self.timeout_s,
            self.elapsed(),
            self._current,
        )

    def ready(self) -> float:
        """Close the timeline, log it as one table and return the seconds startup took."""
        self.stop_alarms()
        total = self.elapsed()
        with self._lock:
            self._phases.append(Phase("ready", total, total))
        log.info("%s", self.table())
        if total > self.timeout_s:
            log.warning(
                "startup took %.1f s, more than RUNPOD_INIT_TIMEOUT=%g s: the platform kills such workers; "
                "raise RUNPOD_INIT_TIMEOUT to at least %d",
                total,
                self.timeout_s,
                suggest_timeout(total),
            )
        return total

    def table(self) -> str:
        """The timeline: each phase's start, seconds and share of the budget, one row each."""
        now = self.elapsed()
        rows = [
            f"startup timeline, RUNPOD_INIT_TIMEOUT={self.timeout_s:g} s:",
            f"  {'phase':<12}{'start s':>9}{'seconds':>9}{'budget':>9}",
        ]
        for phase in self.phases:
            end = phase.end_s if phase.end_s is not None else now
            seconds = end - phase.start_s if phase.name != "ready" else phase.start_s
            note = "" if phase.end_s is not None else "  (still running)"
            rows.append(f"  {phase.name:<12}{phase.start_s:>9.3f}{seconds:>9.3f}{seconds / self.timeout_s:>8.1%}{note}")
        return "\n".join(rows)


def human_bytes(n: float) -> str:
    """512 B, 92.9 kB, 1.2 GB: sizes and rates in messages, readable at any scale."""
    units = ("B", "kB", "MB", "GB")
    step = 0
    while n >= 1000 and step < len(units) - 1:
        n /= 1000
        step += 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def suggest_timeout(needed_s: float) -> int:
    """A RUNPOD_INIT_TIMEOUT that covers `needed_s` with a quarter to spare, in whole minutes."""
    return int(math.ceil(needed_s * 1.25 / 60) * 60)


def reserve_after_transfer_s(total_bytes: int) -> float:
    """Seconds to leave, once the weights are local, for imports, placement and warm-up."""
    return RESERVE_FIXED_S + total_bytes / RESERVE_BYTES_PER_S


class TransferWatch:
    """Measures a transfer's rate (a Hub download, a volume fill) and says, as soon as it can tell, that the
    transfer cannot finish within the budget. `add` may be called from any thread."""

    def __init__(self, budget: InitBudget, model: str, what: str, total_bytes: int) -> None:
        self.budget = budget
        self.model = model
        self.what = what
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self.reserve_s = reserve_after_transfer_s(total_bytes)
        self._started = budget.elapsed()
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def add(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n

    def rate(self) -> float:
        """Average bytes per second since the transfer started."""
        seconds = self.budget.elapsed() - self._started
        return self.done_bytes / seconds if seconds > 0 else 0.0

    def too_slow(self) -> str | None:
        """The message to stop with, or None while the transfer can still finish in time."""
        elapsed = self.budget.elapsed()
        running = elapsed - self._started
        left = self.total_bytes - self.done_bytes
        timeout = f"RUNPOD_INIT_TIMEOUT={self.budget.timeout_s:g} s"
        fixes = "Fix: bake the model into the image, or select it as the endpoint's cached model, or "
        if left <= 0:
            return None
        if self.budget.remaining() <= self.reserve_s:
            return (
                f"{self.model}: no time is left for the {self.what} of {human_bytes(self.total_bytes)}: loading "
                f"needs ~{self.reserve_s:.0f} s after it and {timeout} has {max(0.0, self.budget.remaining()):.0f} s "
                f"left (startup has used {elapsed:.0f} s). {fixes}raise RUNPOD_INIT_TIMEOUT"
            )
        if self.done_bytes == 0:
            if running < STALL_S:
                return None
            return (
                f"{self.model}: the {self.what} of {human_bytes(self.total_bytes)} has received nothing in "
                f"{running:.0f} s; it cannot finish within {timeout}. {fixes}raise RUNPOD_INIT_TIMEOUT"
            )
        if running < MIN_OBSERVE_S:
            return None  # too early to judge: the first seconds are mostly ramp-up
        rate = self.rate()
        eta = left / rate
        if elapsed + eta + self.reserve_s <= self.budget.timeout_s:
            return None
        return (
            f"{self.model}: the {self.what} of {human_bytes(self.total_bytes)} needs ~{eta:.0f} s more at "
            f"{human_bytes(rate)}/s ({human_bytes(self.done_bytes)} in {running:.0f} s) and loading needs "
            f"~{self.reserve_s:.0f} s after it, past {timeout} (startup has used {elapsed:.0f} s). "
            f"{fixes}set RUNPOD_INIT_TIMEOUT={suggest_timeout(elapsed + eta + self.reserve_s)}"
        )

    def check(self) -> None:
        """Raise InitTooSlow, and tell the transfer's threads to stop, once the transfer cannot make it."""
        message = self.too_slow()
        if message is not None:
            self.stopped.set()
            raise InitTooSlow(message)
