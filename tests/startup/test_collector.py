"""The cyclic garbage collector around startup's imports."""

import gc

import pytest

from worker_transformers.startup.collector import collector_paused


@pytest.fixture(autouse=True)
def restore_the_collector():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_no_collection_runs_inside_and_what_survives_is_frozen_after():
    gc.enable()
    frozen_before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        survivors = [[i] for i in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= frozen_before + len(survivors)


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_the_collector_comes_back_when_startup_raises():
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("startup failed")
    assert gc.isenabled()
