import dataclasses
import re
from pathlib import Path

import pytest

from worker_transformers.config import DEFAULT_MODEL, ConfigError, Settings, settings_table

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_need_no_environment():
    settings = Settings.from_env({"HOME": "/home/someone"})
    assert settings.model_name == DEFAULT_MODEL
    assert settings.model_revision is None
    assert settings.model_source == "auto"
    assert settings.baked_model_dir == Path("/models")
    assert settings.runpod_cache_dir == Path("/runpod-volume/huggingface-cache/hub")
    assert settings.volume_model_dir == Path("/runpod-volume/models")
    assert (settings.dtype, settings.device) == ("auto", "auto")
    assert settings.trust_remote_code is False
    assert settings.init_timeout_s == 420
    assert settings.fast_load is True
    assert settings.hf_token is None
    assert settings.hf_endpoint is None
    assert settings.hf_hub_cache == Path("/home/someone/.cache/huggingface/hub")


def test_values_are_parsed_from_the_environment():
    settings = Settings.from_env(
        {
            "MODEL_NAME": "/srv/models/mine",
            "MODEL_REVISION": "v1.0",
            "MODEL_SOURCE": "Volume",
            "DTYPE": "float16",
            "DEVICE": "cpu",
            "MAX_NEW_TOKENS": "77",
            "MAX_INPUT_TOKENS": "99",
            "TRUST_REMOTE_CODE": "yes",
            "RUNPOD_INIT_TIMEOUT": "600",
            "FAST_LOAD": "off",
            "HF_ENDPOINT": "https://hub.example.com",
            "HF_HOME": "/data/hf",
        }
    )
    assert settings.model_name == "/srv/models/mine" and settings.model_is_folder
    assert settings.model_revision == "v1.0"
    assert settings.model_source == "volume"
    assert (settings.dtype, settings.device) == ("float16", "cpu")
    assert (settings.max_new_tokens, settings.max_input_tokens) == (77, 99)
    assert settings.trust_remote_code is True
    assert settings.init_timeout_s == 600
    assert settings.fast_load is False
    assert settings.hf_endpoint == "https://hub.example.com"
    assert settings.hf_hub_cache == Path("/data/hf/hub")


def test_hf_hub_cache_takes_precedence_over_hf_home():
    settings = Settings.from_env({"HF_HUB_CACHE": "/a/cache", "HF_HOME": "/b"})
    assert settings.hf_hub_cache == Path("/a/cache")


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("MODEL_SOURCE", "s3", "auto, baked, cached, volume, hub"),
        ("DTYPE", "fp8", "auto, bfloat16, float16, float32"),
        ("DEVICE", "tpu", "auto, cuda, cpu"),
        ("MAX_NEW_TOKENS", "lots", "whole number from 1"),
        ("MAX_NEW_TOKENS", "0", "whole number from 1"),
        ("RUNPOD_INIT_TIMEOUT", "-5", "whole number from 1"),
        ("TRUST_REMOTE_CODE", "maybe", "true or false"),
        ("BAKED_MODEL_DIR", "models", "absolute folder"),
        ("MODEL_NAME", "../my-model", "model id (org/name) or an absolute folder"),
        ("MODEL_NAME", "   ", "model id (org/name) or an absolute folder"),
    ],
)
def test_a_bad_value_names_the_variable_the_value_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: value})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{name}={value!r} is not allowed")
    assert allowed in message


def test_settings_are_frozen():
    settings = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model_name = "other/model"


def test_the_token_never_shows_in_a_repr():
    settings = Settings.from_env({"HF_TOKEN": "hf_supersecret123"})
    assert settings.hf_token == "hf_supersecret123"
    assert "hf_supersecret123" not in repr(settings)
    assert "hf_supersecret123" not in str(settings)


def test_hub_is_allowed_only_for_auto_or_hub_and_when_online():
    assert Settings.from_env({}).hub_allowed
    assert Settings.from_env({"MODEL_SOURCE": "hub"}).hub_allowed
    assert not Settings.from_env({"MODEL_SOURCE": "cached"}).hub_allowed
    assert not Settings.from_env({"HF_HUB_OFFLINE": "1"}).hub_allowed
    assert not Settings.from_env({"MODEL_NAME": "/srv/model"}).hub_allowed


def test_readme_environment_table_is_generated_from_settings():
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, "regenerate the table with: python -m worker_transformers.config"
    # and the README names no other variable in that table
    table_vars = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.M))
    settings_vars = {f.metadata["env"] for f in dataclasses.fields(Settings) if "env" in f.metadata}
    assert table_vars == settings_vars


def test_chat_template_is_inline_jinja_or_a_file_that_must_be_readable(tmp_path):
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert Settings.from_env({"CHAT_TEMPLATE": inline}).chat_template == inline
    template = tmp_path / "chat.jinja"
    template.write_text(inline)
    assert Settings.from_env({"CHAT_TEMPLATE": str(template)}).chat_template == inline
    with pytest.raises(ConfigError, match=r"^CHAT_TEMPLATE='/nowhere/chat.jinja': cannot read the file \(No such file"):
        Settings.from_env({"CHAT_TEMPLATE": "/nowhere/chat.jinja"})
