"""Checkpoints whose tensor names transformers renames when it loads them (the legacy names many vision-language
checkpoints keep, and that transformers' own save_pretrained writes back): the fast path renames them as
from_pretrained does and loads the same parameters, and a damaged one is refused under the file's names; what
from_pretrained does more than rename (experts merged into one tensor) stays with from_pretrained."""

import logging

import pytest
import torch
from safetensors import safe_open
from startup_faults import copy_model, edit_weights, startup_error
from tiny_vlms import FAMILIES, make_tiny_vlm
from transformers import AutoModelForImageTextToText, MixtralConfig, MixtralForCausalLM

from worker_transformers.config import Settings
from worker_transformers.loading.placement import NotEligible, build_empty, fill
from worker_transformers.model.weights import inspect

CPU = torch.device("cpu")
FIX = "the copy is incomplete or its config.json was changed: fetch the model again (rebuild the image if it is baked)"
# What save_pretrained writes for these families, and the model's names for it.
LEGACY = {
    "qwen2_5_vl": ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    "gemma3": ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    "llava": ("language_model.lm_head.weight", "lm_head.weight"),
}


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    return {family: make_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def stored_names(folder) -> set[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        return set(weights.keys())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fast_path_loads_every_tiny_vlm_with_from_pretrained_s_parameters(vlm_dirs, family):
    folder = vlm_dirs[family]
    files = inspect(folder, family)
    fast = fill(build_empty(folder, files, CPU, None), files)
    reference = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    ours, theirs = dict(fast.state_dict()), dict(reference.state_dict())
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert different == []
    tied = reference.all_tied_weights_keys
    assert all(fast.get_parameter(target) is fast.get_parameter(source) for target, source in tied.items())


@pytest.mark.parametrize("family", sorted(LEGACY))
def test_legacy_names_in_the_file_go_to_the_models_parameters(vlm_dirs, family):
    folder = vlm_dirs[family]
    stored, model_name = LEGACY[family]
    assert stored in stored_names(folder) and model_name not in stored_names(folder)
    files = inspect(folder, family)
    empty = build_empty(folder, files, CPU, None)
    assert empty.names[stored] == model_name
    fast = fill(empty, files)
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        assert torch.equal(fast.get_parameter(model_name), weights.get_tensor(stored))


@pytest.mark.parametrize("family", FAMILIES)
def test_startup_loads_every_tiny_vlm_by_the_fast_path(vlm_dirs, family, caplog):
    from worker_transformers.worker import setup

    with caplog.at_level(logging.INFO, logger="worker_transformers.loading.loader"):
        started = setup(Settings.from_env({"MODEL_NAME": str(vlm_dirs[family])}))
    started.close()
    assert "by fast path" in caplog.text
    assert "fast loading does not apply" not in caplog.text


def refusal(folder, what: str) -> str:
    return f"{folder}: {folder} does not match its config.json: {what}; {FIX}"


@pytest.fixture(params=sorted(LEGACY))
def damaged(request, vlm_dirs, tmp_path):
    return request.param, copy_model(vlm_dirs[request.param], tmp_path / "model")


# A language-model tensor under each family's legacy name, as the file has it.
LAYER = {"qwen2_5_vl": "model.layers", "gemma3": "language_model.model.layers", "llava": "language_model.model.layers"}


@pytest.mark.parametrize("fast_load", ["true", "false"])
def test_a_tensor_dropped_from_a_renamed_checkpoint_is_named_as_the_file_names_it(damaged, fast_load):
    family, folder = damaged
    dropped = f"{LAYER[family]}.0.mlp.up_proj.weight"
    edit_weights(folder / "model.safetensors", drop=(dropped,))
    error = startup_error({"MODEL_NAME": str(folder), "FAST_LOAD": fast_load})
    assert error == refusal(folder, f"the weight files have 1 of the model's tensors missing ({dropped})")


def test_a_tensor_of_the_wrong_shape_in_a_renamed_checkpoint_is_named_with_both_shapes(damaged):
    family, folder = damaged
    name = f"{LAYER[family]}.1.mlp.down_proj.weight"
    edit_weights(folder / "model.safetensors", put={name: torch.zeros(32, 65)})
    error = startup_error({"MODEL_NAME": str(folder)})
    assert error == refusal(
        folder, f"the weight files have 1 of the wrong shape ({name}: [32, 65] in the files, [32, 64] in the model)"
    )


def test_an_extra_tensor_in_a_renamed_checkpoint_is_named(damaged):
    family, folder = damaged
    extra = f"{LAYER[family]}.0.mlp.spare.weight"
    edit_weights(folder / "model.safetensors", put={extra: torch.zeros(4, 4)})
    error = startup_error({"MODEL_NAME": str(folder)})
    assert error == refusal(folder, f"the weight files have 1 tensors the model does not have ({extra})")


def test_experts_that_from_pretrained_merges_are_left_to_it(tmp_path):
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    MixtralForCausalLM(config).save_pretrained(tmp_path)  # one tensor per expert, as Hub checkpoints have them
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in stored_names(tmp_path)
    with pytest.raises(NotEligible, match="from_pretrained converts some tensors, not only renames them"):
        build_empty(tmp_path, inspect(tmp_path, "moe"), CPU, None)
