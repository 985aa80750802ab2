"""The memory estimate against real models: what transformers loads and the KV cache the model really builds."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from worker_transformers.advisor.footprint import (
    FootprintError,
    footprint,
    read_parameters,
    shape_from_config,
    shape_from_folder,
)

TORCH_TO_SAFETENSORS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def loaded(folder: Path, dtype="auto"):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cache_bytes_per_token(model, tokens: int) -> float:
    ids = torch.arange(tokens).unsqueeze(0) % model.config.vocab_size
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return total / tokens


@pytest.fixture(scope="module")
def models(tiny_model_dir, default_model_path):
    return {
        "tiny": (tiny_model_dir, loaded(tiny_model_dir)),
        "default": (default_model_path, loaded(default_model_path)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_parameter_count_per_dtype_is_what_transformers_loads(models, which):
    folder, model = models[which]
    counts = Counter()
    for p in model.parameters():
        counts[TORCH_TO_SAFETENSORS[p.dtype]] += p.numel()
    assert read_parameters(folder) == dict(counts)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_weights_estimate_is_the_loaded_models_bytes(models, which):
    folder, model = models[which]
    need = footprint(shape_from_folder(folder), "auto", 1, 1, 1)
    assert need.weights == parameter_bytes(model)
    assert need.dtype == str(model.dtype).removeprefix("torch.")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_kv_estimate_per_token_is_the_cache_the_model_builds(models, which):
    folder, model = models[which]
    assert footprint(shape_from_folder(folder), "auto", 1, 1, 1).kv_per_token == cache_bytes_per_token(model, 7)


def test_dtype_casts_the_float_weights_and_the_cache(tiny_model_dir):
    shape = shape_from_folder(tiny_model_dir)  # saved in float32
    as_f32, as_bf16 = footprint(shape, "auto", 1, 1, 1), footprint(shape, "bfloat16", 1, 1, 1)
    assert (as_f32.dtype, as_bf16.dtype) == ("float32", "bfloat16")
    assert as_bf16.weights == parameter_bytes(loaded(tiny_model_dir, torch.bfloat16))
    assert as_bf16.kv_per_token * 2 == as_f32.kv_per_token


def test_the_kv_cache_grows_with_jobs_and_tokens_per_job(tiny_model_dir):
    shape = shape_from_folder(tiny_model_dir)
    one = footprint(shape, "auto", 1, 100, 28).kv_cache
    assert footprint(shape, "auto", 8, 100, 28).kv_cache == 8 * one
    assert footprint(shape, "auto", 1, 200, 56).kv_cache == 2 * one


def test_a_sharded_checkpoint_counts_every_shard_once(tiny_model_dir, tmp_path):
    model = loaded(tiny_model_dir)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert read_parameters(tmp_path) == read_parameters(tiny_model_dir)


def test_a_truncated_weight_file_is_named_with_the_fix(tmp_path):
    folder = make_tiny_model(tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(FootprintError, match=r"model\.safetensors has 4 bytes, too few for a safetensors header; .* fetch the model again"):
        read_parameters(folder)


def test_a_folder_without_safetensors_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FootprintError, match="no .safetensors weights"):
        shape_from_folder(tmp_path)


def test_a_config_without_the_shape_names_the_missing_key():
    with pytest.raises(FootprintError, match="no integer num_hidden_layers"):
        shape_from_config({"hidden_size": 64, "num_attention_heads": 4}, {"BF16": 1})


def test_a_multimodal_config_is_read_from_its_text_config(tiny_model_dir):
    text = json.loads((tiny_model_dir / "config.json").read_text())
    nested = shape_from_config({"model_type": "some_vlm", "text_config": text}, {"F32": 1})
    assert nested == shape_from_config(text, {"F32": 1})


def test_weights_that_are_not_floats_keep_their_size_under_any_dtype():
    shape = shape_from_config(
        {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2}, {"I8": 1000, "BF16": 10}
    )
    assert footprint(shape, "float32", 1, 1, 1).weights == 1000 + 10 * 4
