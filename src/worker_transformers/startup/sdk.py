"""The runpod SDK, imported and configured the way this worker needs it: without its slow processor probe,
and with its logger kept from printing every job's output."""

from __future__ import annotations

from pathlib import Path


def quiet_runpod_logs(level: str) -> None:
    """The SDK logs at DEBUG unless told otherwise, and at DEBUG it logs every job's output; this worker
    runs it at RUNPOD_LOG_LEVEL (info by default), so answers stay out of the logs."""
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().level = level.upper()


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
