"""The background read of weight files: real files, a real thread, the budget's timeline."""

import os

from worker_transformers.startup import prefetch
from worker_transformers.startup.budget import InitBudget


def write_files(folder, sizes):
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"model-{i}.safetensors"
        path.write_bytes(os.urandom(size))
        paths.append(path)
    return paths


def test_every_file_is_read_and_the_read_is_a_phase_of_the_timeline(tmp_path):
    paths = write_files(tmp_path, [3 << 20, 1 << 20, 17])
    budget = InitBudget(60)
    reading = prefetch.start(paths, budget)
    reading.join(60)
    assert reading.bytes_read == sum(p.stat().st_size for p in paths)
    [phase] = budget.phases
    assert phase.name == "prefetch" and phase.end_s is not None


def test_the_read_stops_at_its_memory_limit(tmp_path):
    paths = write_files(tmp_path, [2 << 20, 2 << 20])
    reading = prefetch.Prefetch(paths, InitBudget(60), limit_bytes=(1 << 20) + 5).start()
    reading.join(60)
    assert reading.bytes_read == (1 << 20) + 5


def test_a_stopped_read_ends(tmp_path):
    paths = write_files(tmp_path, [1 << 20] * 4)
    reading = prefetch.Prefetch(paths, InitBudget(60), limit_bytes=4 << 20)
    reading.stop()
    reading.start().join(60)
    assert reading.bytes_read == 0


def test_a_file_that_cannot_be_read_ends_the_read_without_raising(tmp_path, caplog):
    paths = write_files(tmp_path, [1 << 20])
    paths.append(tmp_path / "gone.safetensors")
    reading = prefetch.Prefetch(paths, InitBudget(60), limit_bytes=8 << 20).start()
    reading.join(60)
    assert reading.bytes_read == 1 << 20
    assert "prefetch stopped after 1048576 bytes" in caplog.text


def test_the_page_cache_has_room_on_this_machine():
    total = prefetch._meminfo()["MemTotal"]
    assert 0 < prefetch.cache_room() < total
