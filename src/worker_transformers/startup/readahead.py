"""Ask the kernel for the pages startup's imports will read, before the imports ask for them one at a time.

With a cold page cache (a fresh host, an image just pulled), importing torch and transformers waits on the
disk: each page fault of a shared library and each of thousands of small .py files is one small read,
and the next waits for it. The disk could deliver the same bytes far faster as many requests at once. So
the image build records which page ranges of which files one startup's imports read (record_readahead.py,
into the manifest), and at start a background thread hands those ranges to the kernel
(`posix_fadvise(WILLNEED)`: asynchronous, no copy into Python) in the order the imports first need them,
while the imports run. Ranges, not whole files: a CUDA build of torch maps gigabytes of libraries at
import and touches a fraction of them.

The manifest is only a hint: a missing manifest, a missing file or a stale range costs nothing but the
speed-up. Light on purpose (no torch, only the core of the standard library): the entry point starts it
before the heavy imports.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Next to handler.py: the repository root in a checkout, /app in the image.
MANIFEST = Path(__file__).resolve().parents[2] / "readahead.txt"
# Opening a file with a cold cache waits on the disk for its directory entry and inode; several threads keep
# several such waits in flight. Past a few, the imports lose more CPU to them than the disk gains.
THREADS = 8
BATCH_FILES = 16
# Ranges probed, spread over the manifest, to tell a warm page cache (nothing to do) from a cold one.
PROBES = 16


@dataclass(frozen=True)
class Range:
    path: str
    offset: int
    length: int


@dataclass
class Readahead:
    """One background pass over a manifest's ranges. Its figures are for the startup timeline."""

    ranges: list[Range] = field(repr=False)
    started: float = 0.0  # time.monotonic()
    ended: float | None = None  # when the last thread finished
    bytes_requested: int = 0
    files_missing: int = 0
    already_cached: bool = False  # the probed pages were in the page cache, so nothing was asked for
    _batches: list[list[Range]] = field(default_factory=list, repr=False)
    _next: int = 0
    _running: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def start(self, threads: int = THREADS) -> Readahead:
        self.started = time.monotonic()
        if _looks_cached(self.ranges, PROBES):
            # A warm cache (a worker restarted on the same host): thousands of requests for nothing would only
            # take CPU from the imports.
            self.already_cached = True
            self.ended = self.started
            self._done.set()
            return self
        self._batches = _batches(self.ranges, BATCH_FILES)
        self._running = threads
        for number in range(threads):
            threading.Thread(target=self._run, name=f"readahead-{number}", daemon=True).start()
        return self

    def wait(self, timeout: float) -> bool:
        """True once every range has been asked for (for tests and benchmarks)."""
        return self._done.wait(timeout)

    def _take(self) -> list[Range] | None:
        with self._lock:
            if self._next == len(self._batches):
                return None
            self._next += 1
            return self._batches[self._next - 1]

    def _run(self) -> None:
        requested = missing = 0
        try:
            while (batch := self._take()) is not None:
                path, fd = None, -1
                try:
                    for entry in batch:
                        if entry.path != path:
                            if fd >= 0:
                                os.close(fd)
                            path, fd = entry.path, _open_or_none(entry.path)
                            missing += fd < 0
                        if fd >= 0:
                            # Queues the reads and returns: the kernel reads while this asks for the next range.
                            os.posix_fadvise(fd, entry.offset, entry.length, os.POSIX_FADV_WILLNEED)
                            requested += entry.length
                finally:
                    if fd >= 0:
                        os.close(fd)
        except OSError:
            pass  # a hint only: the imports read whatever this did not
        finally:
            with self._lock:
                self.bytes_requested += requested
                self.files_missing += missing
                self._running -= 1
                if self._running == 0:
                    self.ended = time.monotonic()
                    self._done.set()


def _looks_cached(ranges: list[Range], probes: int) -> bool:
    """Whether the first page of each of `probes` ranges spread over the manifest is in the page cache: a
    one-byte read that fails rather than wait for the disk (RWF_NOWAIT) tells, in microseconds."""
    if not ranges:
        return False
    byte = bytearray(1)
    for entry in ranges[:: max(1, len(ranges) // probes)]:
        try:
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            os.preadv(fd, [byte], entry.offset, os.RWF_NOWAIT)
        except OSError:  # BlockingIOError: not cached; others: cannot tell
            return False
        finally:
            os.close(fd)
    return True


def _batches(ranges: list[Range], files_per_batch: int) -> list[list[Range]]:
    """The ranges cut into batches of whole files, in order: threads take the next batch as they finish one,
    so the files the imports need first are asked for first."""
    batches: list[list[Range]] = []
    files = 0
    for i, entry in enumerate(ranges):
        if i == 0 or entry.path != ranges[i - 1].path:
            if files % files_per_batch == 0:
                batches.append([])
            files += 1
        batches[-1].append(entry)
    return batches


def _open_or_none(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:  # gone or changed since the recording: nothing to read ahead
        return -1


def read_manifest(manifest: Path) -> list[Range]:
    """The manifest's ranges, in order; lines are `offset length path`, and # starts a comment."""
    ranges = []
    for line in manifest.read_text().splitlines():
        if line and not line.startswith("#"):
            offset, length, path = line.split(" ", 2)
            ranges.append(Range(path, int(offset), int(length)))
    return ranges


def start(manifest: Path = MANIFEST) -> Readahead | None:
    """Begin reading ahead what `manifest` lists; None when there is no usable manifest."""
    try:
        ranges = read_manifest(manifest)
    except (OSError, ValueError):
        return None
    return Readahead(ranges).start() if ranges else None
