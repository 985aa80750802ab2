"""The advisor on vision-language models: the weights' bytes are every tensor in the files, the vision tower's
included, and the KV cache per token is the language model's, from config.json's nested text_config (the top
level has no decoder shape), or from its class's defaults where text_config leaves them out, as Hub configs do."""

import json
import math
import os
from collections import Counter

import pytest
import torch
from safetensors import safe_open
from tiny_vlms import FAMILIES, make_tiny_vlm
from transformers import AutoModelForImageTextToText

from worker_transformers.advisor.cli import main
from worker_transformers.advisor.footprint import footprint, read_parameters, shape_from_config, shape_from_folder

SIZES = {"F32": 4, "BF16": 2, "F16": 2}
VISION = ("visual.", "vision_tower.", "vision_model.", "multi_modal_projector.", "connector.", "embed_vision.")


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def header_counts(folder) -> tuple[Counter, int]:
    """Parameters per dtype from the safetensors header, and how many of them are the vision side's."""
    counts, vision = Counter(), 0
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        for name in weights.keys():
            piece = weights.get_slice(name)
            count = math.prod(piece.get_shape())
            counts[piece.get_dtype()] += count
            vision += count if any(part in name for part in VISION) else 0
    return counts, vision


@pytest.mark.parametrize("family", FAMILIES)
def test_the_weights_of_a_vlm_are_every_tensor_in_its_files_the_vision_towers_included(vlm_dirs, family):
    folder = vlm_dirs[family]
    counts, vision = header_counts(folder)
    assert vision > 0
    assert read_parameters(folder) == dict(counts)
    need = footprint(shape_from_folder(folder), "auto", 1, 1, 1)
    assert need.weights == sum(n * SIZES[dtype] for dtype, n in counts.items())
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    loaded = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once; persistent buffers too
    assert need.weights == sum(t.numel() * t.element_size() for t in loaded.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kv_cache_per_token_of_a_vlm_is_its_text_configs(vlm_dirs, family):
    folder = vlm_dirs[family]
    config = json.loads((folder / "config.json").read_text())
    assert "num_hidden_layers" not in config  # only text_config has the decoder's shape
    text = config["text_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    kinds = text.get("layer_types") or ["full_attention"] * text["num_hidden_layers"]
    attention = sum(kind != "linear_attention" for kind in kinds)  # Qwen 3.5's linear layers keep no keys
    expected = 2 * attention * text["num_key_value_heads"] * head_dim * 4  # float32
    assert footprint(shape_from_folder(folder), "auto", 1, 1, 1).kv_per_token == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_kv_estimate_is_the_cache_the_vlm_builds_for_text(vlm_dirs, family):
    folder = vlm_dirs[family]
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    tokens = 3  # within every tiny model's sliding window
    ids = torch.tensor([[5, 17, 42]])
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    attention = [layer for layer in cache.layers if hasattr(layer, "keys")]  # not a linear layer's fixed state
    built = sum(layer.keys.nbytes + layer.values.nbytes for layer in attention) / tokens
    assert footprint(shape_from_folder(folder), "auto", 1, 1, 1).kv_per_token == built


# Published configs whose text_config leaves the decoder's shape to the class's defaults.
LLAVA_1_5_7B = {
    "model_type": "llava",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "num_attention_heads": 16},
}
GEMMA_3_4B = {
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "vision_config": {"model_type": "siglip_vision_model"},
}


@pytest.mark.parametrize(
    "config, layers, kv_heads, head_dim",
    [(LLAVA_1_5_7B, 32, 32, 128), (GEMMA_3_4B, 34, 4, 256)],  # Llama's defaults; Gemma 3's: 4 of 8 heads, 256
    ids=["llava-1.5-7b", "gemma-3-4b"],
)
def test_a_text_config_that_leaves_its_shape_to_defaults_takes_its_class_s(config, layers, kv_heads, head_dim):
    shape = shape_from_config(config, {"BF16": 1})
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (layers, kv_heads, head_dim)
    assert footprint(shape, "bfloat16", 1, 1, 1).kv_per_token == 2 * layers * kv_heads * head_dim * 2


def test_the_advisor_sizes_a_vlm_folder(vlm_dirs, tmp_path, capsys):
    folder = vlm_dirs["qwen2_5_vl"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUNPOD_CACHE_DIR": str(tmp_path / "runpod-cache")}
    code = main(["--requests-per-minute", "6", "--request-seconds", "30", "--model", str(folder), "--json"], env=env)
    assert code == 0
    counts, _ = header_counts(folder)
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["stored_bytes"] == sum(n * SIZES[dtype] for dtype, n in counts.items())
