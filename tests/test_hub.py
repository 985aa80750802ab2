"""The RunPod Hub files (.runpod/hub.json, .runpod/tests.json) against the worker they describe.

Every input is a setting the worker reads, with the worker's own default and allowed values; the GPU pools
hold every preset's model; and every test job passes the schema and runs through the real handler with the
default model, as the Hub will run it on a GPU.
"""

import json
import os
import re
import time
from dataclasses import fields
from pathlib import Path

import pytest

from worker_transformers.advisor import gpus
from worker_transformers.advisor.footprint import footprint, shape_from_config, shape_from_folder
from worker_transformers.config import DTYPES, MODEL_SOURCES, Settings

ROOT = Path(__file__).resolve().parents[1]
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
INPUTS = {entry["key"]: entry.get("input") for entry in HUB["config"]["env"]}
SETTINGS = {f.metadata["env"]: f for f in fields(Settings) if "env" in f.metadata}

# Settings the Hub listing deliberately does not offer, and why.
NOT_ON_THE_HUB = {
    "BAKED_MODEL_DIR": "where an image's build put a baked model; the Hub builds the cached image, which has none",
    "RUNPOD_CACHE_DIR": "where RunPod mounts cached models: the platform fixes it",
    "DEVICE": "a GPU endpoint always has CUDA, which auto picks; cpu would leave the billed GPU idle",
}

# Qwen/Qwen2.5-7B-Instruct's config.json (the keys the estimate reads) and its parameter count, 7,615,616,512
# in bfloat16 (the model card's 7.61B; embeddings, lm_head and 28 layers of the shape below).
QWEN_7B_CONFIG = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4,
}  # fmt: skip
QWEN_7B_PARAMETERS = {"BF16": 7_615_616_512}


def parse(env: str, raw):
    return SETTINGS[env].metadata["parse"](env, str(raw))


def raw_value(env: str, value) -> str:
    """What the Hub puts in the environment for an input's value."""
    if isinstance(value, bool):
        return INPUTS[env]["trueValue"] if value else INPUTS[env]["falseValue"]
    return str(value)


def test_every_hub_variable_is_an_input_for_a_setting_the_worker_reads():
    assert all(entry.get("input") for entry in HUB["config"]["env"]), "a static value is not a user setting"
    assert set(INPUTS) <= set(SETTINGS), f"the worker reads none of {set(INPUTS) - set(SETTINGS)}"


def test_every_setting_is_on_the_hub_or_left_out_for_a_reason():
    assert set(NOT_ON_THE_HUB) <= set(SETTINGS), "an exclusion names a setting that no longer exists"
    assert set(SETTINGS) - set(NOT_ON_THE_HUB) == set(INPUTS)


def test_the_required_inputs_are_there_with_their_kinds():
    assert INPUTS["MODEL_NAME"]["type"] == "huggingface"
    for key in ("MODEL_REVISION", "MODEL_SOURCE", "DTYPE", "MAX_CONCURRENCY", "MAX_NEW_TOKENS", "RUNPOD_INIT_TIMEOUT"):
        assert key in INPUTS
    assert INPUTS["HF_TOKEN"]["type"] == "string" and "default" not in INPUTS["HF_TOKEN"]


@pytest.mark.parametrize("env", sorted(INPUTS))
def test_a_hub_default_is_the_settings_default(env):
    field, given = SETTINGS[env], INPUTS[env]
    if field.metadata["raw_default"] is None:
        assert "default" not in given, f"{env} is unset by default; the Hub must not set it"
    else:
        assert parse(env, raw_value(env, given["default"])) == field.default


@pytest.mark.parametrize("env", sorted(INPUTS))
def test_a_hub_input_offers_only_values_the_setting_accepts(env):
    given = INPUTS[env]
    for option in given.get("options", []):
        assert parse(env, option["value"]) == option["value"]
    for bound in ("min", "max"):
        if bound in given:
            parse(env, given[bound])
    if given["type"] == "boolean":
        assert (parse(env, given["trueValue"]), parse(env, given["falseValue"])) == (True, False)
    if given["type"] == "number":
        assert isinstance(SETTINGS[env].default, int) and given["min"] <= given["default"] <= given["max"]


def test_choices_offer_every_allowed_value():
    assert [o["value"] for o in INPUTS["MODEL_SOURCE"]["options"]] == list(MODEL_SOURCES)
    assert [o["value"] for o in INPUTS["DTYPE"]["options"]] == list(DTYPES)


def test_presets_set_hub_inputs_to_values_the_settings_accept():
    assert len(HUB["config"]["presets"]) >= 2
    for preset in HUB["config"]["presets"]:
        for env, value in preset["defaults"].items():
            assert env in INPUTS, f"preset {preset['name']!r} sets {env}, which is no input"
            parse(env, raw_value(env, value))


def preset_settings(preset) -> Settings:
    return Settings.from_env({env: raw_value(env, value) for env, value in preset["defaults"].items()})


def preset_shape(settings: Settings, default_model_path: Path):
    shapes = {
        "HuggingFaceTB/SmolLM2-135M-Instruct": lambda: shape_from_folder(default_model_path),
        "Qwen/Qwen2.5-7B-Instruct": lambda: shape_from_config(QWEN_7B_CONFIG, QWEN_7B_PARAMETERS),
    }
    assert settings.model_name in shapes, f"add {settings.model_name}'s shape here to check that it fits"
    return shapes[settings.model_name]()


@pytest.mark.parametrize("preset", HUB["config"]["presets"], ids=lambda p: p["name"])
def test_every_listed_gpu_pool_holds_every_preset(preset, default_model_path):
    settings = preset_settings(preset)
    shape = preset_shape(settings, default_model_path)
    need = footprint(
        shape, settings.dtype, settings.max_concurrency, settings.max_input_tokens, settings.max_new_tokens
    )
    listed = HUB["config"]["gpuIds"].split(",")
    assert listed == [p.pool_id for p in gpus.POOLS if p.pool_id in listed], "pools go cheapest first"
    for pool_id in listed:
        assert gpus.usable_gb(gpus.pool(pool_id)) >= need.total / 1e9, f"{preset['name']} does not fit {pool_id}"


def test_the_container_disk_holds_the_image_and_a_downloaded_preset(default_model_path):
    # The CUDA/PyTorch base image is about 10 GB unpacked; the worker's dependencies add a few. After a Hub
    # download the SDK's startup check still wants 10 % of the disk free.
    image_gb = 15
    disk = HUB["config"]["containerDiskInGb"]
    for preset in HUB["config"]["presets"]:
        settings = preset_settings(preset)
        weights_gb = preset_shape(settings, default_model_path).stored_bytes / 1e9
        assert disk - image_gb - weights_gb >= 0.1 * disk, f"{preset['name']} leaves too little free disk"


def test_cuda_versions_are_strings_and_no_older_than_the_image():
    versions = HUB["config"]["allowedCudaVersions"]
    assert versions == TESTS["config"]["allowedCudaVersions"]
    assert all(isinstance(v, str) and re.fullmatch(r"\d+\.\d+", v) for v in versions)
    dockerfile = ROOT / "Dockerfile"
    if not dockerfile.is_file():
        pytest.skip("no Dockerfile in this tree to read the base image's CUDA version from")
    base = re.search(r"^ARG BASE_IMAGE=.*?cu(\d\d)(\d)", dockerfile.read_text(), flags=re.MULTILINE)
    assert base, "the Dockerfile's BASE_IMAGE names no CUDA version (cuXYZ)"
    image_cuda = (int(base[1]), int(base[2]))
    assert all(tuple(map(int, v.split("."))) >= image_cuda for v in versions)


def test_the_test_gpu_is_in_a_listed_pool():
    listed = HUB["config"]["gpuIds"].split(",")
    assert any(TESTS["config"]["gpuTypeId"] in gpus.pool(p).examples for p in listed)


def test_the_tests_cover_a_prompt_a_chat_a_stream_and_an_openai_route():
    inputs = [t["input"] for t in TESTS["tests"]]
    assert any("prompt" in i for i in inputs)
    assert any("messages" in i and not i.get("stream") for i in inputs)
    assert any(i.get("stream") for i in inputs)
    assert any("openai_route" in i for i in inputs)
    assert any(i.get("openai_input", {}).get("tool_choice") == "required" for i in inputs)
    assert any(i.get("response_format", {}).get("type") == "json_schema" for i in inputs)
    assert all(isinstance(t["timeout"], int) and t["timeout"] > 0 for t in TESTS["tests"])


@pytest.fixture(scope="module")
def hub_test_handler(default_model_path):
    """The worker as the Hub's test endpoint runs it: tests.json's environment and the default model."""
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    hub_env = {item["key"]: item["value"] for item in TESTS["config"]["env"]}
    settings = Settings.from_env({**os.environ, **hub_env})
    engine = setup(settings)
    yield make_handler(engine, settings), settings
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", TESTS["tests"], ids=lambda t: t["name"])
def test_a_hub_test_job_passes_the_schema_and_runs_through_the_handler(case, hub_test_handler):
    import jsonschema
    from openai.types.chat import ChatCompletion
    from openai.types.responses import Response
    from test_worker import sdk_run

    from worker_transformers.serving.openai.bodies import ChatCompletionBody, CompletionBody
    from worker_transformers.serving.openai.responses_bodies import ResponsesBody
    from worker_transformers.serving.schema import parse_request

    handler, settings = hub_test_handler
    job = case["input"]
    if "openai_route" in job:
        bodies = {"/v1/chat/completions": ChatCompletionBody, "/v1/completions": CompletionBody}
        body = {**bodies, "/v1/responses": ResponsesBody}[job["openai_route"]]
        body.model_validate(job["openai_input"])
    else:
        parse_request(job, settings.max_new_tokens)

    started = time.monotonic()
    result = sdk_run(handler, job)
    assert time.monotonic() - started < case["timeout"] / 1000
    assert "error" not in result, result
    outputs = result["output"]
    if job.get("openai_route") == "/v1/responses":
        [response] = outputs
        text = Response.model_validate(response).output_text
    elif "openai_route" in job:
        [completion] = outputs
        message = ChatCompletion.model_validate(completion).choices[0].message
        if job["openai_input"].get("tools"):
            [call] = message.tool_calls
            assert call.function.name == "get_weather"
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, job["openai_input"]["tools"][0]["function"]["parameters"])
            text = arguments["city"]
        else:
            text = message.content
    elif job.get("stream"):
        assert len(outputs) > 1 and outputs[-1]["finish_reason"] in ("stop", "length")
        text = "".join(chunk["text"] for chunk in outputs)
    else:
        [answer] = outputs
        text = answer["text"]
        if "response_format" in job:
            jsonschema.validate(json.loads(text), job["response_format"]["json_schema"]["schema"])
    assert "Paris" in text, f"{case['name']}: {text!r}"
