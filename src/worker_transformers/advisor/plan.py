"""From a workload and a model to endpoint settings, each with the reason it was chosen.

The rules are the checklist of RunPod's endpoint optimization guide, which users otherwise apply by hand:
active workers from requests per minute x request seconds / 60, max workers about 20 % above the peak,
a shorter queue delay for spiky traffic, several GPU pools in priority order. Pure arithmetic: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from worker_transformers.advisor.footprint import Footprint
from worker_transformers.advisor.gpus import USABLE_SHARE, pools_that_fit

PEAK_HEADROOM = 1.2  # max workers: about 20 % above the expected peak
DEFAULT_QUEUE_DELAY_S = 4  # RunPod's default for the queue-delay scaler
SPIKY, VERY_SPIKY = 2, 4  # peak / average jobs in flight at which traffic counts as spiky, very spiky
PREFERRED_POOLS = 3  # more pools: more hosts to start on; each later one costs more per second
INIT_MARGIN, INIT_FLOOR_S = 2, 120
# Past this, a private model is not baked: RunPod's GitHub builds stop at 80 GB images and 30 minutes, and the
# CUDA/PyTorch base takes about 10 GB of that; pulling such an image on every new host is slow as well.
VOLUME_ABOVE_BYTES = 60 * 10**9


@dataclass(frozen=True)
class Setting:
    key: str  # the --json key
    label: str  # as the RunPod console names it
    value: Any
    shown: str
    reason: str


def _ceil(x: float) -> int:
    # 6 x 30 / 60 must round up to 3: without the tolerance a float error such as 3.0000000000000004 gives 4.
    return math.ceil(x - 1e-9)


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def jobs_in_flight(requests_per_minute: float, request_seconds: float) -> float:
    """The average number of jobs running at once (Little's law)."""
    return requests_per_minute * request_seconds / 60


def active_workers(requests_per_minute: float, request_seconds: float, jobs_per_worker: int) -> Setting:
    average = jobs_in_flight(requests_per_minute, request_seconds)
    value = _ceil(average / jobs_per_worker)
    reason = (
        f"{requests_per_minute:g} requests/min x {request_seconds:g} s / 60 = {average:.2f} jobs in flight on "
        f"average, / {jobs_per_worker} per worker, rounded up: always-on workers never cold-start"
    )
    if average < jobs_per_worker:
        reason += "; 0 instead scales to zero and pays only for use, at the price of cold starts"
    return Setting("active_workers", "Active workers", value, str(value), reason)


def max_workers(peak: float | None, average: float, active: int, jobs_per_worker: int) -> Setting:
    expected = peak if peak is not None else average
    above_peak = _ceil(expected * PEAK_HEADROOM / jobs_per_worker)
    value = max(above_peak, active + 1)
    reason = f"peak {expected:g} jobs x {PEAK_HEADROOM:g} / {jobs_per_worker} per worker = {above_peak}"
    if peak is None:
        reason = f"no --peak-concurrency, so the average stands in: {reason}"
    if value > above_peak:
        reason += f"; raised to one more than the {active} active workers, so the endpoint can still scale out"
    return Setting("max_workers", "Max workers", value, str(value), reason)


def queue_delay(average: float, peak: float | None) -> Setting:
    if peak is None:
        value = DEFAULT_QUEUE_DELAY_S
        reason = "RunPod's default; give --peak-concurrency to tune it to how spiky the traffic is"
    else:
        ratio = peak / average
        value = 2 if ratio >= VERY_SPIKY else 3 if ratio >= SPIKY else DEFAULT_QUEUE_DELAY_S
        shape = "very spiky" if ratio >= VERY_SPIKY else "spiky" if ratio >= SPIKY else "steady"
        reason = (
            f"peak {peak:g} / average {average:.2f} = {ratio:.1f}x: {shape} traffic "
            f"(spiky from {SPIKY}x, very spiky from {VERY_SPIKY}x); a shorter delay starts workers sooner "
            "in a burst, at the price of more cold starts"
        )
    return Setting("queue_delay_s", "Queue delay", value, f"{value} s", reason)


def gpu_pools(need: Footprint, concurrency: int, tokens_per_job: int) -> Setting:
    fitting = pools_that_fit(need.total / 1e9)
    chosen = [p.pool_id for p in fitting[:PREFERRED_POOLS]]
    sizes = (
        f"needs {_gb(need.total)} at worst: weights {_gb(need.weights)} ({need.dtype}) + KV cache "
        f"{_gb(need.kv_cache)} ({concurrency} jobs x {tokens_per_job} tokens x {need.kv_per_token / 1024:.1f} kB, "
        f"+ one layer's copy while the batch is rebuilt) + activations {_gb(need.activations)} + runtime {_gb(need.runtime)}"
    )
    if not chosen:
        reason = (
            f"{sizes}: no single GPU holds that (this worker uses one); lower MAX_CONCURRENCY or "
            "MAX_INPUT_TOKENS, or choose a smaller model"
        )
        return Setting("gpu_pools", "GPUs", [], "none fits", reason)
    reason = (
        f"{sizes}; the {len(chosen)} cheapest pools whose smallest card holds it with "
        f"{100 - USABLE_SHARE * 100:.0f} % to spare, in priority order: more pools, more hosts to start on"
    )
    return Setting("gpu_pools", "GPUs", chosen, ",".join(chosen), reason)


def init_timeout(ready_s: float | None, current_s: int) -> Setting:
    if ready_s is None:
        reason = "no cold-start measurement (--coldstart-json); the value in force, RunPod's default unless set"
        return Setting("init_timeout_s", "RUNPOD_INIT_TIMEOUT", current_s, f"{current_s} s", reason)
    value = max(INIT_FLOOR_S, _ceil(ready_s * INIT_MARGIN))
    reason = (
        f"measured cold start {ready_s:g} s x {INIT_MARGIN}, at least {INIT_FLOOR_S} s: the margin covers a "
        "colder disk and a busier host than the measurement had; a stuck start then fails in minutes, not 7"
    )
    return Setting("init_timeout_s", "RUNPOD_INIT_TIMEOUT", value, f"{value} s", reason)


def model_source(stored_bytes: int, on_hub: bool, private: bool | None) -> Setting:
    size = _gb(stored_bytes)
    if on_hub and not private:
        value = "cached"
        reason = (
            f"public on the Hub ({size}): select it as the endpoint's cached model; RunPod starts workers on "
            "hosts that hold it, does not bill the download, and the image stays small"
        )
        if private is None:
            reason += "; assumed public as the Hub could not be asked: pass --private if it is private or gated"
    elif stored_bytes > VOLUME_ABOVE_BYTES:
        value = "volume"
        reason = (
            f"{size}, over {_gb(VOLUME_ABOVE_BYTES)}: too big to bake (RunPod builds stop at 80 GB images); "
            "fill a network volume once (MODEL_SOURCE=volume), which ties the endpoint to its data center"
        )
    else:
        value = "baked"
        why = "private or gated" if on_hub else "not on the Hub"
        reason = (
            f"{why} ({size}): bake it into the image (MODEL_SOURCE=baked): the fastest load, no token in the "
            "endpoint's environment, and the worker starts offline"
        )
    return Setting("model_source", "Model source", value, value, reason)
