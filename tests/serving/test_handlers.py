"""Streaming and continuous batching through the real handler, on the tiny model in float32 (where batched
and one-at-a-time arithmetic agree, so greedy and seeded outputs must be equal)."""

import asyncio
import time

import pytest

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler
from worker_transformers.serving.schema import parse_request
from worker_transformers.worker import setup


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = setup(Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_CONCURRENCY": "8"}))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def settings(tiny_model_dir):
    return Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_CONCURRENCY": "8", "MAX_NEW_TOKENS": "64"})


async def collect(handler, job_input):
    return [item async for item in handler({"id": "t", "input": job_input})]


def run(handler, job_input):
    return asyncio.run(collect(handler, job_input))


# Different prompts, lengths and sampling settings, the kind of mix that is in flight together.
JOBS = [
    {"prompt": "Hello world", "max_new_tokens": 12, "temperature": 0},
    {"prompt": "The capital of France is", "max_new_tokens": 30, "temperature": 0},
    {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_new_tokens": 20,
        "temperature": 0,
    },
    {"prompt": "one, two, three, four, five, six, seven", "max_new_tokens": 5, "temperature": 0},
    {"prompt": "A small model says", "max_new_tokens": 25, "temperature": 0.9, "top_p": 0.8, "seed": 7},
    {"prompt": "Stop here", "max_new_tokens": 18, "temperature": 1.3, "top_k": 20, "seed": 99},
    {"prompt": "the world answers", "max_new_tokens": 16, "temperature": 0, "repetition_penalty": 1.5},
    {"prompt": "go on:", "max_new_tokens": 40, "temperature": 0.7, "seed": 3, "stop": ["seven"]},
]


def test_a_stream_is_text_chunks_then_a_final_chunk_that_adds_up_to_the_whole_answer(engine, settings):
    handler = make_handler(engine, settings)
    job = {"prompt": "Hello world", "max_new_tokens": 10, "temperature": 0}
    [whole] = run(handler, job)
    chunks = run(handler, {**job, "stream": True})
    assert len(chunks) > 2
    assert all(set(c) == {"text"} for c in chunks[:-1])
    final = chunks[-1]
    assert final["finish_reason"] == whole["finish_reason"] == "length"
    assert final["usage"] == whole["usage"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_a_streamed_stop_string_never_shows_even_in_part(engine, settings):
    handler = make_handler(engine, settings)
    job = {"prompt": "Hello world", "max_new_tokens": 24, "temperature": 0}
    [free] = run(handler, job)
    stop = free["text"][len(free["text"]) // 2 :][:4]
    chunks = run(handler, {**job, "stop": [stop], "stream": True})
    streamed = "".join(c["text"] for c in chunks)
    assert streamed == free["text"][: free["text"].find(stop)]
    assert chunks[-1]["finish_reason"] == "stop"


def test_a_bad_streaming_job_fails_before_any_chunk(engine, settings):
    chunks = run(make_handler(engine, settings), {"prompt": "x", "stream": True, "temperature": 3})
    assert chunks == [{"error": "temperature: Input should be less than or equal to 2"}]


def test_concurrent_jobs_are_batched_and_equal_the_same_jobs_one_at_a_time(engine, settings):
    handler = make_handler(engine, settings)
    serial = [run(handler, job) for job in JOBS]

    async def together():
        return await asyncio.gather(*(collect(handler, job) for job in JOBS))

    engine.generation.engine.peak_batch = 0
    batched = asyncio.run(together())
    assert engine.generation.engine.peak_batch > 1, "the jobs were not decoded together"
    for job, one, many in zip(JOBS, serial, batched):
        assert one == many, f"batched output differs for {job}"
    # each finished on its own terms: different lengths came back
    assert len({out[0]["usage"]["completion_tokens"] for out in batched}) > 2


def test_streams_in_flight_together_interleave(engine, settings):
    handler = make_handler(engine, settings)
    order = []

    async def consume(name, job):
        async for chunk in handler({"id": name, "input": {**job, "stream": True}}):
            order.append(name)

    async def together():
        job = {"prompt": "Hello world", "max_new_tokens": 12, "temperature": 0}
        await asyncio.gather(consume("a", job), consume("b", job))

    asyncio.run(together())
    first_b = order.index("b")
    assert "a" in order[first_b:], f"stream a finished before stream b started: {order}"


@pytest.mark.parametrize("how", ["closed", "task cancelled"])
def test_a_cancelled_job_frees_its_place_for_the_next(tiny_model_dir, how):
    settings = Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_CONCURRENCY": "1", "MAX_NEW_TOKENS": "5000"})
    engine = setup(settings)
    try:
        handler = make_handler(engine, settings)

        async def scenario():
            # Seconds of work for the tiny model, unless it is cancelled.
            long_job = {"prompt": "Hello world", "max_new_tokens": 5000, "temperature": 0, "stream": True}
            started = asyncio.Event()

            async def consume_long():
                async for _ in handler({"id": "long", "input": long_job}):
                    started.set()

            if how == "closed":
                stream = handler({"id": "long", "input": long_job})
                await stream.__anext__()  # the long job is generating and holds the only place
            else:
                consumer = asyncio.create_task(consume_long())
                await started.wait()
            waiting = asyncio.create_task(collect(handler, {"prompt": "hi", "max_new_tokens": 3, "temperature": 0}))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            if how == "closed":
                await stream.aclose()  # what happens to a generator abandoned mid-stream
            else:
                consumer.cancel()  # what the SDK does to the task of a job it cancels or times out
            return await asyncio.wait_for(waiting, timeout=30)

        [result] = asyncio.run(scenario())
        assert result["usage"]["completion_tokens"] == 3
        deadline = time.monotonic() + 5
        while engine.generation.engine.in_flight() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.generation.engine.in_flight() == 0
    finally:
        engine.close()


def test_engine_generate_matches_the_handler(engine, settings):
    job = {"prompt": "The capital of France is", "max_new_tokens": 9, "temperature": 0}
    [from_handler] = run(make_handler(engine, settings), job)
    assert engine.generate(parse_request(job, 64)) == from_handler
