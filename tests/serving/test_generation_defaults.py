"""GENERATION_CONFIG_DEFAULTS: the model's generation_config.json sampling values for what a request leaves out,
in the native job format and the OpenAI bodies alike; a value the request sends, even the format's own default,
wins."""

import asyncio
import json
import shutil

import pytest

from worker_transformers.config import Settings
from worker_transformers.serving.handlers import make_handler
from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
from worker_transformers.serving.schema import parse_request, sampling_defaults
from worker_transformers.worker import setup

MODEL = {"temperature": 0.0, "top_k": 5, "top_p": 0.5, "repetition_penalty": 1.2}


def test_a_left_out_field_takes_the_models_default_and_a_sent_one_wins():
    request = parse_request({"prompt": "x", "temperature": 0.7}, 64, MODEL)
    assert (request.temperature, request.top_k, request.top_p, request.repetition_penalty) == (0.7, 5, 0.5, 1.2)
    assert parse_request({"prompt": "x"}, 64, {}).temperature == 0.7  # the job format's own default


def test_the_openai_bodies_take_the_models_defaults_else_openais():
    body = ChatCompletionBody.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 1.0}
    )
    request = body.to_request(64, MODEL)
    assert (request.temperature, request.top_p, request.top_k) == (0.0, 1.0, 5)
    plain = CompletionBody.model_validate({"model": "m", "prompt": "x"}).to_request(64, {})
    assert (plain.temperature, plain.top_k) == (1.0, 0)


def test_values_a_job_could_not_send_are_left_out_with_a_warning(caplog):
    values = {"temperature": 0.6, "top_p": 3.0, "top_k": None, "do_sample": True}
    assert sampling_defaults(values, "generation_config.json") == {"temperature": 0.6}
    assert "generation_config.json: top_p=3.0 is not usable" in caplog.text


@pytest.fixture(scope="module")
def greedy_by_default(tiny_model_dir, tmp_path_factory):
    """The tiny model with a generation_config.json that makes it greedy."""
    folder = tmp_path_factory.mktemp("greedy") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    return folder


def answer(handler, job_input):
    async def collect():
        return [item async for item in handler({"id": "t", "input": job_input})]

    [output] = asyncio.run(collect())
    return output["text"]


@pytest.mark.parametrize("honoured", [True, False])
def test_the_handler_samples_with_the_models_defaults_unless_turned_off(greedy_by_default, honoured):
    env = {"MODEL_NAME": str(greedy_by_default), "GENERATION_CONFIG_DEFAULTS": str(honoured).lower()}
    settings = Settings.from_env(env)
    engine = setup(settings)
    try:
        handler = make_handler(engine, settings)
        job = {"prompt": "The capital of France is", "max_new_tokens": 12, "seed": 5}
        left_out = answer(handler, job)
        expected = answer(handler, {**job, "temperature": 0.0 if honoured else 0.7})
        assert left_out == expected
        assert answer(handler, {**job, "temperature": 0.7}) != answer(handler, {**job, "temperature": 0.0})
    finally:
        engine.close()
