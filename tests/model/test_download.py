"""Hub downloads against a local stand-in for the Hub (real HTTP on 127.0.0.1, the real huggingface_hub
client): a fast one lands in the cache, a slow one stops early with the numbers, and a worker whose only
source is that slow download answers its job with the message.

huggingface_hub reports a plain HTTP download every 10 MB (DOWNLOAD_CHUNK_SIZE); the tiny model's weights
are 100 kB, so in-process tests set that step to 4 kB for the rate to be measured on the weights too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import COMMIT, FakeHub

from worker_transformers.config import Settings
from worker_transformers.model.download import download_from_hub
from worker_transformers.model.errors import ModelNotFound
from worker_transformers.startup.budget import InitBudget, InitTooSlow

ROOT = Path(__file__).resolve().parents[2]
REPO = "Org/Tiny"
SLOW = 2000  # bytes per second: the tiny model's ~100 kB of weights would take about a minute


@pytest.fixture
def small_steps(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)


def settings_env(tmp_path, hub) -> dict[str, str]:
    return {"MODEL_NAME": REPO, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": hub.url}


def settings(tmp_path, hub, **env) -> Settings:
    return Settings.from_env({**settings_env(tmp_path, hub), **env})


def test_a_download_that_fits_the_budget_lands_in_the_cache(tiny_model_dir, tmp_path):
    with FakeHub(REPO, tiny_model_dir) as hub:
        path = download_from_hub(settings(tmp_path, hub))
    assert path == tmp_path / "cache" / "models--Org--Tiny" / "snapshots" / COMMIT
    assert (path / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "cache" / "models--Org--Tiny" / "refs" / "main").read_text() == COMMIT


def test_a_download_that_cannot_finish_in_time_stops_early_with_the_numbers(tiny_model_dir, tmp_path, small_steps):
    with FakeHub(REPO, tiny_model_dir, weights_bytes_per_s=SLOW) as hub:
        budget = InitBudget(60)
        with pytest.raises(InitTooSlow) as caught:
            download_from_hub(settings(tmp_path, hub, RUNPOD_INIT_TIMEOUT="60"), budget)
        stopped_at = budget.elapsed()
    message = str(caught.value)
    assert re.match(
        rf"{REPO}@main: the download from the Hub of 1\d\d\.\d kB needs ~\d+ s more at \d\.\d kB/s", message
    )
    assert "past RUNPOD_INIT_TIMEOUT=60 s" in message
    assert (
        "bake the model into the image, or select it as the endpoint's cached model, or set RUNPOD_INIT_TIMEOUT="
        in message
    )
    assert stopped_at < 30, "stopped no earlier than halfway: not early"


def test_a_repo_the_hub_does_not_have_is_not_found(tiny_model_dir, tmp_path):
    with FakeHub("Org/Other", tiny_model_dir) as hub:
        with pytest.raises(ModelNotFound, match="could not be downloaded from the Hub"):
            download_from_hub(settings(tmp_path, hub))


@pytest.mark.slow
def test_a_worker_whose_download_is_too_slow_answers_its_job_with_the_reason(tiny_model_dir, tmp_path):
    job = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 2}})
    with FakeHub(REPO, tiny_model_dir, weights_bytes_per_s=SLOW) as hub:
        env = {**os.environ, **settings_env(tmp_path, hub), "MODEL_SOURCE": "hub", "RUNPOD_INIT_TIMEOUT": "60"}
        proc = subprocess.Popen(
            [sys.executable, "handler.py", "--test_input", job], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            # The job's answer is the point; the process then waits for the abandoned download's threads
            # to reach their next 10 MB step (the whole file, here) before it exits, so it is not awaited.
            output = ""
            for line in proc.stdout:
                output += line
                if "job local_test failed" in line:
                    break
        finally:
            proc.kill()
            proc.wait()
    assert f"job local_test failed: {REPO}@main: the download from the Hub of " in output
    assert "Traceback" not in output


def test_a_download_cut_short_is_completed_at_the_next_start(tiny_model_dir, tmp_path):
    """What an interrupted download leaves: a snapshot with its small files and no weights. The next start
    must neither load it nor stop at it: the download runs again and fills in what is missing."""
    from worker_transformers.model.sources import resolve

    with FakeHub(REPO, tiny_model_dir) as hub:
        snapshot = download_from_hub(settings(tmp_path, hub))
        (snapshot / "model.safetensors").unlink()  # as if cut short before the weights landed
        location = resolve(settings(tmp_path, hub, MODEL_SOURCE="auto"))
    assert (location.source, location.path) == ("hub", snapshot)
    assert (snapshot / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_a_download_cut_short_is_reported_when_the_hub_may_not_be_asked(tiny_model_dir, tmp_path):
    from worker_transformers.model.errors import UnsupportedWeights
    from worker_transformers.model.sources import resolve

    with FakeHub(REPO, tiny_model_dir) as hub:
        snapshot = download_from_hub(settings(tmp_path, hub))
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(UnsupportedWeights, match="has no .safetensors weights"):
        resolve(settings(tmp_path, hub, HF_HUB_OFFLINE="1"))
