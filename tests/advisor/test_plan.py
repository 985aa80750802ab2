"""The advisor's rules, one by one: the checklist's arithmetic and the choices made from it."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker_transformers.advisor import plan
from worker_transformers.advisor.footprint import Footprint
from worker_transformers.advisor.gpus import POOLS, usable_gb


def test_the_worked_example_6_requests_a_minute_of_30_s_needs_3_active_workers():
    assert plan.active_workers(6, 30, jobs_per_worker=1).value == 3


@given(
    requests_per_minute=st.integers(1, 10_000),
    request_seconds=st.integers(1, 3_600),
    jobs_per_worker=st.integers(1, 64),
)
def test_active_workers_are_the_fewest_that_carry_the_average_load(
    requests_per_minute, request_seconds, jobs_per_worker
):
    # Exact integer arithmetic: the load in job-seconds per minute against what n workers carry in a minute.
    load, per_worker = requests_per_minute * request_seconds, 60 * jobs_per_worker
    n = plan.active_workers(requests_per_minute, request_seconds, jobs_per_worker).value
    assert n * per_worker >= load > (n - 1) * per_worker


def test_light_traffic_still_rounds_up_and_says_what_zero_would_mean():
    setting = plan.active_workers(1, 10, jobs_per_worker=1)
    assert setting.value == 1
    assert "scales to zero" in setting.reason


@pytest.mark.parametrize(
    ("peak", "active", "jobs_per_worker", "expected"),
    [
        (10, 3, 1, 12),  # 20 % above the peak
        (11, 3, 1, 14),  # 13.2, rounded up
        (3, 3, 1, 4),  # 3.6 -> 4, which is also one above the active workers
        (3, 5, 1, 6),  # the peak rule says 4; one above the 5 always-on workers wins
        (40, 2, 8, 6),  # 48 jobs at the peak, 8 per worker
    ],
)
def test_max_workers_are_20_percent_above_the_peak_and_above_the_active_ones(peak, active, jobs_per_worker, expected):
    assert plan.max_workers(peak, peak, active, jobs_per_worker).value == expected


def test_without_a_peak_the_average_stands_in_and_the_reason_says_so():
    setting = plan.max_workers(None, 3.0, 3, 1)
    assert setting.value == 4 and "average stands in" in setting.reason


@pytest.mark.parametrize(
    ("average", "peak", "expected"),
    [(3, None, 4), (3, 3, 4), (3, 5.9, 4), (3, 6, 3), (3, 11.9, 3), (3, 12, 2), (0.5, 30, 2)],
)
def test_queue_delay_is_shorter_the_spikier_the_traffic(average, peak, expected):
    assert plan.queue_delay(average, peak).value == expected


def need(total_gb: float) -> Footprint:
    return Footprint("bfloat16", int(total_gb * 1e9) - 10**9, 0, 1, 0, 10**9)


def test_the_gpu_pools_are_the_cheapest_three_that_hold_the_model():
    assert plan.gpu_pools(need(4), 8, 5120).value == ["AMPERE_16", "AMPERE_24", "ADA_24"]
    # 20 GB does not fit AMPERE_24, whose smallest card has 20 GB, 18 of them usable
    assert plan.gpu_pools(need(20), 8, 5120).value == ["ADA_24", "AMPERE_48", "ADA_48_PRO"]
    assert plan.gpu_pools(need(100), 8, 5120).value == ["HOPPER_141"]


def test_every_chosen_pool_holds_the_need_and_no_cheaper_pool_was_skipped():
    for total in (1, 14.4, 14.5, 21.6, 43, 44, 72, 126.9):
        chosen = plan.gpu_pools(need(total), 1, 1).value
        fitting = [p.pool_id for p in POOLS if usable_gb(p) >= total]
        assert chosen == fitting[:3]


def test_a_model_no_gpu_holds_gets_no_pools_and_the_fix():
    setting = plan.gpu_pools(need(500), 64, 100_000)
    assert setting.value == [] and "MAX_CONCURRENCY" in setting.reason


@pytest.mark.parametrize(("ready_s", "expected"), [(95.2, 191), (60, 120), (12, 120), (300, 600)])
def test_init_timeout_is_twice_the_measured_cold_start_and_at_least_two_minutes(ready_s, expected):
    assert plan.init_timeout(ready_s, current_s=420).value == expected


def test_without_a_measurement_the_init_timeout_in_force_stays():
    assert plan.init_timeout(None, current_s=420).value == 420
    assert plan.init_timeout(None, current_s=600).value == 600


GB = 10**9


@pytest.mark.parametrize(
    ("stored", "on_hub", "private", "expected"),
    [
        (1 * GB, True, False, "cached"),
        (140 * GB, True, False, "cached"),  # RunPod's cache takes public models of any size
        (1 * GB, True, None, "cached"),
        (16 * GB, True, True, "baked"),
        (16 * GB, False, None, "baked"),
        (61 * GB, True, True, "volume"),
        (61 * GB, False, None, "volume"),
    ],
)
def test_model_source_cached_for_public_baked_for_private_volume_past_60_gb(stored, on_hub, private, expected):
    assert plan.model_source(stored, on_hub, private).value == expected


def test_a_model_whose_privacy_is_unknown_is_assumed_public_and_the_reason_says_how_to_correct_it():
    assert "--private" in plan.model_source(GB, on_hub=True, private=None).reason
