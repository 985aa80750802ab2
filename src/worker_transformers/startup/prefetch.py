"""Read the weight files into the page cache in the background while Python imports torch and transformers.

Importing torch, transformers and runpod takes seconds of CPU and little disk; reading the weights takes
disk and little CPU. Run side by side, startup costs the larger of the two instead of their sum: by the time
the loader asks for the weights, they come from memory. Reads are large and sequential, in the order the
loader uses the files, and stop at what memory can hold: reading past that would only evict the first files
before they are used. Light on purpose (no torch): it starts before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from worker_transformers.startup.budget import InitBudget

log = logging.getLogger(__name__)

READ_BYTES = 16 << 20
KEEP_FREE_FRACTION = 0.1  # of total memory, for everything else the worker allocates while loading


def _meminfo() -> dict[str, int]:
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values


def _cgroup_room() -> int | None:
    """Bytes left under this container's memory limit (cgroup v2), which page cache counts against."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def host_memory_free() -> int | None:
    """Bytes of host memory this process can still take: what the kernel counts available (reclaimable page
    cache included), or what is left under the container's limit when that is less. None: unknown."""
    try:
        available = _meminfo()["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None
    cgroup = _cgroup_room()
    return available if cgroup is None else min(available, cgroup)


def cache_room() -> int:
    """Bytes the page cache can take without pushing out what the worker needs."""
    try:
        keep_free = int(KEEP_FREE_FRACTION * _meminfo()["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        return 0
    return max(0, (host_memory_free() or 0) - keep_free)


class Prefetch:
    """One background pass over the files. `stop` ends it early; it is a daemon and never blocks exit."""

    def __init__(self, paths: list[Path], budget: InitBudget, limit_bytes: int) -> None:
        self.paths = paths
        self.limit_bytes = limit_bytes
        self.bytes_read = 0
        self._budget = budget
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        phase = self._budget.begin("prefetch")
        buffer = memoryview(bytearray(READ_BYTES))
        try:
            for path in self.paths:
                with open(path, "rb", buffering=0) as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while not self._stop.is_set() and self.bytes_read < self.limit_bytes:
                        n = f.readinto(buffer[: min(READ_BYTES, self.limit_bytes - self.bytes_read)])
                        if not n:
                            break
                        self.bytes_read += n
        except OSError as error:
            # Only a speed-up: the loader reads the same files and reports any real problem with them.
            log.warning("prefetch stopped after %d bytes: %s", self.bytes_read, error)
        finally:
            self._budget.end(phase)


def start(paths: list[Path], budget: InitBudget) -> Prefetch:
    """Begin reading `paths` in the background, up to what the page cache can hold."""
    total = sum(p.stat().st_size for p in paths)
    room = cache_room()
    if room < total:
        log.info("prefetch reads %.2f of %.2f GB of weights: that is what free memory holds", room / 1e9, total / 1e9)
    return Prefetch(paths, budget, min(total, room)).start()
