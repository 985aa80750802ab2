"""The real default model, found in the Hugging Face cache by the same resolver that serves RunPod's cache,
and the real runpod local API server in front of it."""

import json
import os
from pathlib import Path

import pytest
import requests
from api_server import api_server as serve

from worker_transformers.config import DEFAULT_MODEL, Settings

ROOT = Path(__file__).resolve().parents[2]
TEST_INPUT = json.loads((ROOT / "test_input.json").read_text())

pytestmark = pytest.mark.slow


def test_the_default_model_knows_the_capital_of_france(default_model_path):
    from worker_transformers.serving.schema import parse_request
    from worker_transformers.worker import setup

    settings = Settings.from_env({**os.environ, "MODEL_NAME": DEFAULT_MODEL, "MODEL_SOURCE": "auto"})
    engine = setup(settings)
    out = engine.generate(parse_request(TEST_INPUT["input"], settings.max_new_tokens))
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert out["model"] == DEFAULT_MODEL


@pytest.fixture
def api_server(default_model_path):
    with serve({"MODEL_NAME": DEFAULT_MODEL}) as server:
        yield server.url


def test_runsync_on_the_local_api_server_answers_paris(api_server):
    reply = requests.post(f"{api_server}/runsync", json=TEST_INPUT, timeout=120)
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "COMPLETED", body
    [answer] = body["output"]  # the handler streams, so outputs come back aggregated in a list
    assert "Paris" in answer["text"]


def test_runsync_returns_every_chunk_of_a_streaming_job(api_server):
    job = {"input": {**TEST_INPUT["input"], "stream": True}}
    body = requests.post(f"{api_server}/runsync", json=job, timeout=120).json()
    chunks = body["output"]
    assert len(chunks) > 2
    assert "Paris" in "".join(c["text"] for c in chunks)
    assert chunks[-1]["finish_reason"] == "stop"


def test_runsync_with_a_bad_job_reports_the_field(api_server):
    reply = requests.post(f"{api_server}/runsync", json={"input": {"prompt": "x", "seed": "abc"}}, timeout=60)
    body = reply.json()
    # The SDK's local server reports a generator's error as output; a deployed worker fails the job with it
    # (rp_job.handle_job; see tests/test_worker.py).
    assert body["output"] == [{"error": "seed: Input should be a valid integer"}]


@pytest.fixture(scope="module")
def float32_engine(default_model_path):
    from worker_transformers.worker import setup

    engine = setup(Settings.from_env({**os.environ, "MODEL_NAME": DEFAULT_MODEL, "DTYPE": "float32"}))
    yield engine
    engine.close()


def test_batched_greedy_answers_equal_one_at_a_time_on_real_weights(float32_engine):
    import threading

    from worker_transformers.serving.schema import parse_request

    questions = ["What is 2+2?", "Name three colors.", "Describe a cat.", "What is the capital of Italy?"]
    requests_ = [
        parse_request(
            {"messages": [{"role": "user", "content": q}], "max_new_tokens": 12 + 6 * i, "temperature": 0}, 64
        )
        for i, q in enumerate(questions)
    ]
    serial = [float32_engine.generate(r) for r in requests_]
    batched = [None] * len(requests_)

    def run(i):
        batched[i] = float32_engine.generate(requests_[i])

    float32_engine.generation.engine.peak_batch = 0
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float32_engine.generation.engine.peak_batch > 1
    assert batched == serial


def test_the_engine_decodes_exactly_like_transformers_generate(float32_engine):
    """Greedy, one request: the batcher's decode loop (cache, positions, masks) against transformers' own
    generate, on real weights, where an off-by-one position changes the words."""
    import torch

    from worker_transformers.serving.schema import parse_request

    engine = float32_engine
    job = {"prompt": "The history of Paris began", "max_new_tokens": 40, "temperature": 0}
    ids = engine.tokenizer(job["prompt"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        reference = engine.generation.engine.model.generate(ids, max_new_tokens=40, do_sample=False)
    expected = engine.tokenizer.decode(reference[0, ids.shape[1] :], skip_special_tokens=True)
    assert engine.generate(parse_request(job, 64))["text"] == expected


def test_runsync_answers_an_openai_chat_completion(api_server):
    from openai.types.chat import ChatCompletion

    job = {
        "input": {
            "openai_route": "/v1/chat/completions",
            "openai_input": {"model": DEFAULT_MODEL, "max_tokens": 32, **TEST_INPUT["input"]},
        }
    }
    job["input"]["openai_input"].pop("max_new_tokens")
    body = requests.post(f"{api_server}/runsync", json=job, timeout=120).json()
    [completion] = body["output"]
    assert "Paris" in ChatCompletion.model_validate(completion).choices[0].message.content
