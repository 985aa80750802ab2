"""Local runs: `python handler.py --test_input JSON`, or ./test_input.json when not deployed.

The runpod SDK's own local mode does not iterate generator handlers (it prints the generator object and
exits 0 without running it), so the worker runs the local job itself: each chunk is printed as one JSON line
as it comes, and the exit code is 1 when the job fails, as the SDK's is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("worker_transformers")

DEFAULT_JOB_FILE = Path("test_input.json")


def local_job(argv: list[str], deployed: bool) -> dict[str, Any] | None:
    """The job to run locally, or None when the SDK should run (the API server, or a deployed worker)."""
    if "--rp_serve_api" in argv:
        return None
    for i, arg in enumerate(argv):
        if arg == "--test_input" and i + 1 < len(argv):
            return _parse(argv[i + 1], "--test_input")
        if arg.startswith("--test_input="):
            return _parse(arg.split("=", 1)[1], "--test_input")
    if not deployed and DEFAULT_JOB_FILE.is_file():
        return _parse(DEFAULT_JOB_FILE.read_text(), str(DEFAULT_JOB_FILE))
    return None


class LocalJobError(ValueError):
    """The local job cannot be run: not JSON, or no "input"."""


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        job = json.loads(text)
    except json.JSONDecodeError as error:
        raise LocalJobError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(job, dict) or job.get("input") is None:
        raise LocalJobError(f'{where}: the job has no "input"; send {{"input": {{...}}}}')
    return job


async def run_local(handler: Callable[[dict], AsyncIterator[Any]], job: dict[str, Any]) -> int:
    job.setdefault("id", "local_test")
    async for chunk in handler(job):
        print(chunk if isinstance(chunk, str) else json.dumps(chunk, ensure_ascii=False), flush=True)
        if isinstance(chunk, dict) and "error" in chunk:
            log.error("job %s failed: %s", job["id"], chunk["error"])
            return 1
    log.info("job %s completed", job["id"])
    return 0
