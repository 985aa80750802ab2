"""The init budget's arithmetic and messages, on a clock the test moves by hand."""

import logging

import pytest

from worker_transformers.startup.budget import (
    InitBudget,
    InitTooSlow,
    TransferWatch,
    human_bytes,
    process_age_s,
    reserve_after_transfer_s,
    suggest_timeout,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_elapsed_counts_from_process_start_and_remaining_from_the_timeout(clock):
    budget = InitBudget(100, clock=clock, age_s=2.0)
    assert budget.elapsed() == 2.0
    clock.now += 8
    assert budget.elapsed() == 10.0
    assert budget.remaining() == 90.0


def test_this_process_has_an_age():
    assert 0 < process_age_s() < 3600


def test_phases_are_timed_and_tabled_with_their_share_of_the_budget(clock):
    budget = InitBudget(200, clock=clock)
    clock.now += 1
    with budget.phase("resolve"):
        clock.now += 3
    background = budget.begin("prefetch")
    with budget.phase("imports"):
        clock.now += 16
    budget.end(background)
    phases = {p.name: (p.start_s, p.end_s) for p in budget.phases}
    assert phases == {"resolve": (1, 4), "prefetch": (4, 20), "imports": (4, 20)}
    table = budget.table()
    assert "RUNPOD_INIT_TIMEOUT=200 s" in table
    assert "  resolve         1.000    3.000    1.5%" in table
    assert "  imports         4.000   16.000    8.0%" in table


def test_a_background_phase_still_running_is_shown_as_such(clock):
    budget = InitBudget(100, clock=clock)
    budget.begin("prefetch")
    clock.now += 5
    assert "  prefetch        0.000    5.000    5.0%  (still running)" in budget.table()


def test_a_phase_timed_before_the_budget_existed_takes_its_place_in_the_timeline(clock):
    started = clock.now  # e.g. the readahead, begun by the entry point
    clock.now += 0.5
    budget = InitBudget(100, clock=clock, age_s=1.0)
    with budget.phase("resolve"):
        clock.now += 1
    budget.add("readahead", started, started + 2)
    budget.add("late", clock.now, None)
    clock.now += 1
    assert [(p.name, p.start_s, p.end_s) for p in budget.phases] == [
        ("readahead", 0.5, 2.5),
        ("resolve", 1.0, 2.0),
        ("late", 2.0, None),
    ]
    assert "  late            2.000    1.000    1.0%  (still running)" in budget.table()


def test_ready_logs_the_table_and_warns_when_past_the_timeout(clock, caplog):
    budget = InitBudget(10, clock=clock)
    with budget.phase("imports"):
        clock.now += 12
    with caplog.at_level(logging.INFO, logger="worker_transformers.startup.budget"):
        assert budget.ready() == 12
    assert "startup timeline" in caplog.records[0].getMessage()
    assert "  ready          12.000   12.000  120.0%" in caplog.records[0].getMessage()
    assert "raise RUNPOD_INIT_TIMEOUT to at least 60" in caplog.records[1].getMessage()


def test_a_warning_is_logged_once_startup_passes_half_the_budget(caplog):
    budget = InitBudget(100, age_s=60)  # already past 50 %, not yet at 80 %
    with caplog.at_level(logging.WARNING, logger="worker_transformers.startup.budget"), budget.phase("weights"):
        budget.start_alarms()
        budget._alarms[0].join(5)
    budget.stop_alarms()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("startup has used 50 % of RUNPOD_INIT_TIMEOUT=100 s")
    assert "still in phase 'weights'" in warnings[0]


def test_suggested_timeout_has_a_quarter_to_spare_in_whole_minutes():
    assert suggest_timeout(100) == 180
    assert suggest_timeout(48) == 60


def test_sizes_read_well_at_any_scale():
    assert [human_bytes(n) for n in (512, 92_900, 3.4e6, 1.23e9, 2e12)] == [
        "512 B", "92.9 kB", "3.4 MB", "1.2 GB", "2000.0 GB"
    ]  # fmt: skip


GB = 10**9


def test_a_transfer_is_not_judged_before_it_has_run_a_while(clock):
    budget = InitBudget(420, clock=clock)
    watch = TransferWatch(budget, "org/model", "download", 100 * GB)
    clock.now += 2
    watch.add(1)  # hopeless, but two seconds in: ramp-up
    assert watch.too_slow() is None


def test_a_transfer_that_cannot_finish_in_time_stops_with_the_numbers_and_fixes(clock):
    budget = InitBudget(420, clock=clock, age_s=10)
    watch = TransferWatch(budget, "org/model@main", "download from the Hub", 16 * GB)
    clock.now += 10
    watch.add(int(0.25 * GB))  # 25 MB/s: 15.75 GB more takes 630 s, plus 62 s to load, from 20 s in
    with pytest.raises(InitTooSlow) as caught:
        watch.check()
    message = str(caught.value)
    assert message.startswith("org/model@main: the download from the Hub of 16.0 GB needs ~630 s more at 25.0 MB/s")
    assert "loading needs ~62 s after it, past RUNPOD_INIT_TIMEOUT=420 s (startup has used 20 s)" in message
    assert "bake the model into the image" in message and "cached model" in message
    assert message.endswith(f"set RUNPOD_INIT_TIMEOUT={suggest_timeout(20 + 630 + 62)}")
    assert watch.stopped.is_set()


def test_a_transfer_fast_enough_goes_on(clock):
    budget = InitBudget(420, clock=clock)
    watch = TransferWatch(budget, "org/model", "download", 16 * GB)
    clock.now += 10
    watch.add(2 * GB)  # 200 MB/s: 70 s more
    watch.check()
    assert not watch.stopped.is_set()


def test_a_transfer_that_received_nothing_is_called_stalled_only_after_a_while(clock):
    budget = InitBudget(420, clock=clock)
    watch = TransferWatch(budget, "org/model", "download", GB)
    clock.now += 29
    assert watch.too_slow() is None  # progress may come 10 MB at a time
    clock.now += 1
    assert watch.too_slow().startswith("org/model: the download of 1.0 GB has received nothing in 30 s")


def test_no_time_left_for_loading_stops_a_transfer_before_it_starts(clock):
    budget = InitBudget(420, clock=clock, age_s=400)
    watch = TransferWatch(budget, "org/model", "download", GB)
    assert watch.reserve_s == reserve_after_transfer_s(GB) > budget.remaining()
    message = watch.too_slow()
    assert message.startswith("org/model: no time is left for the download of 1.0 GB: loading needs ~32 s after it")
    assert "RUNPOD_INIT_TIMEOUT=420 s has 20 s left" in message
