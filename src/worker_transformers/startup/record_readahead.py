"""Record the readahead manifest: which page ranges of which files the worker's startup imports read.

    python -m worker_transformers.startup.record_readahead [--output PATH]

The image build runs it (Dockerfile), and so does `make bench-coldstart` for a checkout. It takes 10-15 s:
1. a fresh process runs the startup imports (worker.import_libraries) and notes every file it opens or maps,
   in the order it first uses them;
2. those files are evicted from the page cache (posix_fadvise DONTNEED: no privileges needed);
3. a second fresh process runs the same imports, reading back exactly what they need;
4. mincore says which pages of each file are now cached: those ranges, in that order, are the manifest.
Pages that could not be evicted (the recording process's own libraries) count as read: too much is
harmless, too little only slower.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

from worker_transformers.startup.readahead import MANIFEST, Range

PAGE = os.sysconf("SC_PAGE_SIZE")
# Cached runs closer than this many pages are read as one range: fewer, larger requests.
MERGE_GAP_PAGES = 16
# What the recording imports: exactly the worker's own startup imports.
IMPORTS = "from worker_transformers.worker import import_libraries; import_libraries()"


def _files_used() -> list[str]:
    """The files a fresh process's startup imports open or map, in the order it first used them."""
    probe = f"""
import json, os, sys
used, busy = {{}}, [False]

def note_mapped():
    # Shared libraries are mapped by the dynamic loader, which raises no audit event: read them off the maps.
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    for line in b"".join(chunks).decode().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            used.setdefault(parts[5], None)

def hook(event, args):
    if event == "open" and not busy[0]:
        busy[0] = True
        try:
            note_mapped()
            if isinstance(args[0], str):
                used.setdefault(os.path.abspath(args[0]), None)
        finally:
            busy[0] = False

sys.addaudithook(hook)
{IMPORTS}
busy[0] = True
note_mapped()
print(json.dumps(list(used)))
"""
    output = _run_python(probe).stdout.splitlines()[-1]
    kernel = ("/proc/", "/sys/", "/dev/")  # not files on a disk
    return [path for path in json.loads(output) if not path.startswith(kernel) and os.path.isfile(path)]


def _run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this package from where this file is."""
    package_parent = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)


def evict(path: str | Path) -> None:
    """Drop `path`'s clean pages from the page cache (dirty ones stay until written: sync first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_ranges(path: str, merge_gap_pages: int = MERGE_GAP_PAGES) -> list[Range]:
    """The runs of `path`'s pages now in the page cache (mincore), runs less than `merge_gap_pages` apart
    merged into one."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    with open(path, "rb") as f:
        # A private mapping, so ctypes can take its address; nothing is read or written through it.
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    vector = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
    anchor = ctypes.c_char.from_buffer(mapped)
    try:
        if libc.mincore(ctypes.addressof(anchor), size, vector) != 0:
            raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    finally:
        del anchor
        mapped.close()
    runs: list[list[int]] = []  # [first page, last page + 1]
    for page, flags in enumerate(bytes(vector)):
        if flags & 1:
            if runs and page - runs[-1][1] < merge_gap_pages:
                runs[-1][1] = page + 1
            else:
                runs.append([page, page + 1])
    return [Range(path, first * PAGE, min(size, end * PAGE) - first * PAGE) for first, end in runs]


def record(output: Path = MANIFEST) -> list[Range]:
    """Learn which pages startup's imports read, and write them to `output` as the manifest."""
    files = _files_used()
    os.sync()
    for path in files:
        evict(path)
    _run_python(IMPORTS)
    ranges = [r for path in files for r in resident_ranges(path)]
    total = sum(r.length for r in ranges)
    header = (
        f"# worker_transformers.startup.readahead: the page ranges startup's imports read, in the order they need them.\n"
        f"# {len(ranges)} ranges of {len(files)} files, {total / 1e6:.1f} MB. Recorded for this image's files;\n"
        f"# rewrite it with `python -m worker_transformers.startup.record_readahead` after they change.\n"
    )
    body = "".join(f"{r.offset} {r.length} {r.path}\n" for r in ranges)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(header + body)
    tmp.replace(output)
    return ranges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=MANIFEST, help=f"the manifest (default {MANIFEST})")
    args = parser.parse_args(argv)
    started = time.monotonic()
    ranges = record(args.output)
    files = len({r.path for r in ranges})
    print(
        f"wrote {args.output}: {len(ranges)} ranges in {files} files, "
        f"{sum(r.length for r in ranges) / 1e6:.1f} MB, in {time.monotonic() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
