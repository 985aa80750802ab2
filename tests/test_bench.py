"""The cold-start benchmark reads the worker's startup table from its log: the two must stay in step."""

import importlib.util
from pathlib import Path

from worker_transformers.budget import InitBudget

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("coldstart", ROOT / "bench" / "coldstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_benchmark_reads_every_phase_of_the_startup_table():
    clock = Clock()
    budget = InitBudget(420, clock=clock, age_s=0.25)
    with budget.phase("resolve"):
        clock.now += 0.5
    budget.begin("prefetch")  # still running at ready
    with budget.phase("warm-up"):
        clock.now += 1.25
    budget.ready()
    log = ["2026-01-01 00:00:00,000 INFO worker_transformers.budget: " + budget.table(), "INFO   | Job result"]
    phases = load_bench().parse_timeline("\n".join(log).splitlines())
    assert phases == [
        {"name": "resolve", "start_s": 0.25, "seconds": 0.5},
        {"name": "prefetch", "start_s": 0.75, "seconds": 1.25},
        {"name": "warm-up", "start_s": 0.75, "seconds": 1.25},
        {"name": "ready", "start_s": 2.0, "seconds": 2.0},
    ]
