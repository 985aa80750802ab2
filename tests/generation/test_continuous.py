"""ENGINE=continuous on the tiny Llama: what a failure inside transformers' continuous batching does.

Its behaviour when all goes well is the per-engine suite's (test_architectures.py)."""

import asyncio
import logging

import pytest
import torch

from worker_transformers.config import Settings
from worker_transformers.generation.errors import OutOfMemory
from worker_transformers.serving.schema import parse_request
from worker_transformers.worker import setup


@pytest.fixture
def engine(tiny_model_dir, caplog):
    settings = Settings.from_env(
        {"MODEL_NAME": str(tiny_model_dir), "ENGINE": "continuous", "MAX_CONCURRENCY": "2", "MAX_NEW_TOKENS": "64"}
    )
    with caplog.at_level(logging.INFO, logger="worker_transformers"):
        engine = setup(settings)
    yield engine
    engine.close()


def test_it_serves_and_says_so(engine, caplog):
    assert (engine.generation.engine_kind, engine.generation.concurrency) == ("continuous", 2)
    startup = [record.getMessage() for record in caplog.get_records("setup")]
    assert any(
        line.startswith("engine: continuous (ENGINE=continuous), up to 2 sequences per step") for line in startup
    )


def test_an_out_of_memory_fails_the_batch_as_one_event_and_the_next_job_is_served(engine, monkeypatch):
    model = engine.generation.engine.model
    forward = model.forward
    calls = []

    def runs_out_on_the_third_forward(*args, **kwargs):
        calls.append(None)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", runs_out_on_the_third_forward)
    requests = [parse_request({"prompt": p, "max_new_tokens": 32, "temperature": 0}, 64) for p in ("Hello", "Stop")]

    async def both():
        async def one(request):
            try:
                return [event async for event in engine.stream(request, engine.prepare(request))]
            except OutOfMemory as error:
                return error

        return await asyncio.gather(*(one(request) for request in requests))

    failures = asyncio.run(both())
    assert all(isinstance(failure, OutOfMemory) for failure in failures), failures
    assert failures[0].event is not None and failures[0].event == failures[1].event
    assert engine.generate(requests[0])["usage"]["completion_tokens"] > 0
    assert engine.generation.engine.in_flight() == 0
