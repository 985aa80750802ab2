"""Faults at the engine boundary: the device running out of memory mid-generation (injected, as this
machine has no GPU to exhaust)."""

import asyncio

import pytest
import torch
from startup_faults import bake, copy_model, run, startup_error

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import OOM_LIMIT, make_handler
from worker_transformers.serving.schema import parse_request
from worker_transformers.worker import setup


@pytest.fixture
def engine(tiny_model_dir):
    engine = setup(Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_CONCURRENCY": "4"}))
    yield engine
    engine.close()


def out_of_memory_for(model, calls: int, when=lambda input_ids: True):
    """Make the model's next `calls` forward passes whose input_ids satisfy `when` raise what CUDA raises when
    memory runs out."""
    real_forward = model.forward
    left = {"calls": calls}

    def forward(*args, **kwargs):
        if left["calls"] > 0 and when(kwargs["input_ids"]):
            left["calls"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    model.forward = forward


JOB = {"prompt": "Hello world", "max_new_tokens": 5, "temperature": 0}


def test_out_of_memory_fails_the_job_clearly_frees_the_batch_and_the_next_job_succeeds(engine, tiny_model_dir):
    handler = make_handler(engine, Settings.from_env({"MODEL_NAME": str(tiny_model_dir)}))
    out_of_memory_for(engine.generation.engine.model, calls=1)
    [failed] = run(handler, JOB)
    assert failed["error"].startswith("out of memory on the device while generating")
    assert "MAX_CONCURRENCY" in failed["error"] and "Traceback" not in failed["error"]
    assert engine.generation.engine.in_flight() == 0 and engine.generation.engine.active == []
    [ok] = run(handler, JOB)
    assert ok["usage"]["completion_tokens"] == 5


LONG_PROMPT = "Stop here, then go on: one, two, three, four, five, six, seven, eight."


def test_out_of_memory_at_one_prefill_fails_that_request_only_and_the_stream_decoding_goes_on(engine, tiny_model_dir):
    handler = make_handler(engine, Settings.from_env({"MODEL_NAME": str(tiny_model_dir)}))
    alone = run(handler, {**JOB, "max_new_tokens": 40})

    async def scenario():
        first = handler({"id": "a", "input": {**JOB, "max_new_tokens": 40, "stream": True}})
        head = await first.__anext__()  # job a is decoding
        # The long prompt's prefill runs out of memory, alone or together with others.
        long_ids = len(engine.prepare(parse_request({"prompt": LONG_PROMPT}, 64)).ids)
        out_of_memory_for(engine.generation.engine.model, calls=1, when=lambda ids: ids.shape[1] == long_ids)
        a_rest = asyncio.create_task(_drain(first))
        b = asyncio.create_task(_drain(handler({"id": "b", "input": {**JOB, "prompt": LONG_PROMPT}})))
        return [head, *await a_rest], await b

    a_items, [b_error] = asyncio.run(scenario())
    assert b_error["error"].startswith("out of memory on the device while generating; the request was dropped")
    assert "".join(item["text"] for item in a_items) == alone[0]["text"]  # job a never noticed
    [ok] = run(handler, {**JOB, "prompt": LONG_PROMPT})
    assert ok["finish_reason"] == "length"


def test_out_of_memory_at_a_decode_step_sheds_the_newest_requests_and_the_rest_go_on(engine, tiny_model_dir):
    asked = []
    handler = make_handler(
        engine, Settings.from_env({"MODEL_NAME": str(tiny_model_dir)}), on_unhealthy=lambda: asked.append(1)
    )
    alone = run(handler, {**JOB, "max_new_tokens": 40})

    async def scenario():
        old = handler({"id": "old", "input": {**JOB, "max_new_tokens": 40, "stream": True}})
        head = await old.__anext__()
        newer = [
            handler({"id": f"new{i}", "input": {**JOB, "max_new_tokens": 40, "stream": True}}) for i in range(OOM_LIMIT)
        ]
        heads = [await stream.__anext__() for stream in newer]  # all joined the batch
        assert engine.generation.engine.peak_batch == OOM_LIMIT + 1
        # Decode steps (one token per row) run out of memory until only one row is left.
        batch = engine.generation.engine.active
        out_of_memory_for(
            engine.generation.engine.model, calls=OOM_LIMIT, when=lambda ids: ids.shape == (len(batch), 1) != (1, 1)
        )
        rest = await asyncio.gather(*(_drain(stream) for stream in [old, *newer]))
        return [head, *rest[0]], [[h, *r] for h, r in zip(heads, rest[1:])]

    old_items, newer_items = asyncio.run(scenario())
    assert "".join(item["text"] for item in old_items) == alone[0]["text"]
    for items in newer_items:
        assert items[-1]["error"].startswith("out of memory on the device while generating; the request, the newest")
    assert asked == []  # one out-of-memory event, however many requests (OOM_LIMIT here) it shed
    [ok] = run(handler, JOB)
    assert ok["finish_reason"] == "length"


async def _drain(stream):
    return [item async for item in stream]


def test_repeated_out_of_memory_asks_for_a_fresh_worker_and_a_success_resets_the_count(engine, tiny_model_dir):
    asked = []
    handler = make_handler(
        engine, Settings.from_env({"MODEL_NAME": str(tiny_model_dir)}), on_unhealthy=lambda: asked.append(1)
    )
    for _ in range(OOM_LIMIT - 1):
        out_of_memory_for(engine.generation.engine.model, calls=1)
        run(handler, JOB)
    run(handler, JOB)  # a success in between
    for _ in range(OOM_LIMIT - 1):
        out_of_memory_for(engine.generation.engine.model, calls=1)
        run(handler, JOB)
    assert asked == []
    out_of_memory_for(engine.generation.engine.model, calls=1)
    run(handler, JOB)
    assert asked == [1]


def test_an_openai_job_out_of_memory_gets_an_openai_server_error(engine, tiny_model_dir):
    import json

    handler = make_handler(engine, Settings.from_env({"MODEL_NAME": str(tiny_model_dir)}))
    out_of_memory_for(engine.generation.engine.model, calls=1)
    body = {"model": str(tiny_model_dir), "prompt": "Hello", "max_tokens": 3}
    [item] = run(handler, {"openai_route": "/v1/completions", "openai_input": body})
    error = json.loads(item["error"])["error"]
    assert (error["type"], error["code"]) == ("server_error", "out_of_memory")


# Damaged and incomplete model folders: one actionable line at startup, served to every job, no crash loop.


def test_a_model_without_its_tokenizer_says_the_copy_is_incomplete(tiny_model_dir, tmp_path):
    folder = copy_model(tiny_model_dir, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    error = startup_error({"MODEL_NAME": str(folder)})
    assert error.startswith(f"{folder}: {folder} has no tokenizer")
    assert "fetch the model again" in error


def test_a_baked_file_of_the_wrong_size_is_refused_with_what_the_manifest_says(tiny_model_dir, tmp_path):
    folder, env = bake(tiny_model_dir, tmp_path)
    with (folder / "model.safetensors").open("ab") as weights:
        weights.write(b"extra")
    error = startup_error(env)
    assert "model.safetensors is" in error and "the manifest says" in error
    assert f"baked: {folder}" in error


def test_a_baked_file_whose_hash_differs_is_refused_when_verifying(tiny_model_dir, tmp_path):
    folder, env = bake(tiny_model_dir, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed: only the hash can tell
    weights.write_bytes(bytes(data))
    error = startup_error({**env, "VERIFY_WEIGHTS": "true"})
    assert error == (
        f"Org/Baked: {weights} does not match the sha256 in {folder / 'manifest.json'}; the copy is damaged: "
        "rebuild the image (baked) or delete the folder so it is filled again (volume)"
    )


def pickle_only_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    folder = copy_model(tiny_model_dir, tmp_path / "pickled")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_allowed(tiny_model_dir, tmp_path):
    folder = pickle_only_model(tiny_model_dir, tmp_path)
    error = startup_error({"MODEL_NAME": str(folder)})
    assert "has only pickle weights (pytorch_model.bin)" in error and "ALLOW_PICKLE_WEIGHTS=true" in error


def test_pickle_weights_load_when_allowed_and_answer_like_their_safetensors_twin(tiny_model_dir, tmp_path, tiny_engine):
    from worker_transformers.serving.schema import parse_request
    from worker_transformers.worker import start_worker

    folder = pickle_only_model(tiny_model_dir, tmp_path)
    started = start_worker({"MODEL_NAME": str(folder), "ALLOW_PICKLE_WEIGHTS": "true"})
    try:
        [answer] = run(started.handler, JOB)
    finally:
        started.close()
    assert answer["usage"]["completion_tokens"] == 5
    assert answer["text"] == tiny_engine.generate(parse_request(JOB, 64))["text"]
