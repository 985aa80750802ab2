"""The engine's thread: a thread that hands it work gives back its own idle OpenMP team."""

import subprocess
import sys
from pathlib import Path

import pytest

from worker_transformers.generation import engine

SRC = Path(__file__).resolve().parents[2] / "src"

# In a fresh process, so that no other test's threads come and go while the process's threads are counted.
SUBMITTING_THREAD = """
import os, time, torch
from types import SimpleNamespace
from worker_transformers.generation.engine import Engine
from worker_transformers.generation.events import Sequence

def threads():
    return len(os.listdir("/proc/self/task"))

torch.set_num_threads(2)
alone = threads()
torch.ones(1 << 22).add_(1)  # parallel work: this thread now keeps a team of OpenMP threads, idle
with_team = threads()
class Idle(Engine):  # an engine whose thread never starts: only the submitting thread is watched
    def _run(self): pass
    def in_flight(self): return 0

idle = Idle("engine", SimpleNamespace(device=torch.device("cpu")), set())
idle.submit(Sequence([1], 1, sampling=None, text=None, emit=print))
for _ in range(500):  # the team's threads are told to end; on a loaded machine they take a moment to go
    if threads() == alone:
        break
    time.sleep(0.01)
print(alone, with_team, threads())
"""


@pytest.mark.skipif(engine._openmp_pause is None, reason="torch does not run on GNU OpenMP here")
def test_a_thread_that_submits_work_ends_its_idle_openmp_team():
    run = subprocess.run(
        [sys.executable, "-c", SUBMITTING_THREAD], env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    alone, with_team, after_submit = map(int, run.stdout.split())
    assert with_team > alone
    assert after_submit == alone
