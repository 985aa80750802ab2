"""The loaded model is exactly the checkpoint: model folders damaged after copying (a tensor removed, renamed
or reshaped, config.json declaring more than the weights hold) are refused at startup through the real entry
point, on the fast path and through from_pretrained, naming the tensors and the fix; nothing random is served."""

import pytest
import torch
from startup_faults import copy_model, edit_config, edit_weights, startup_error

from worker_transformers.startup.budget import human_bytes

FIX = "the copy is incomplete or its config.json was changed: fetch the model again (rebuild the image if it is baked)"
MISSING = "model.layers.0.mlp.up_proj.weight"


def refusal(folder, what: str) -> str:
    return f"{folder}: {folder} does not match its config.json: {what}; {FIX}"


@pytest.fixture
def damaged(tiny_model_dir, tmp_path):
    return copy_model(tiny_model_dir, tmp_path / "model")


@pytest.mark.parametrize("fast_load", ["true", "false"])
def test_a_tensor_removed_from_the_weights_is_named_on_either_path(damaged, fast_load):
    edit_weights(damaged / "model.safetensors", drop=(MISSING,))
    error = startup_error({"MODEL_NAME": str(damaged), "FAST_LOAD": fast_load})
    assert error == refusal(damaged, f"the weight files have 1 of the model's tensors missing ({MISSING})")


def test_a_removed_tensor_with_a_stand_in_of_the_same_size_is_named_as_missing_and_unexpected(damaged):
    # The same count of numbers, under a name the model does not have: only from_pretrained's report can judge.
    stand_in = torch.zeros(64, 32)
    edit_weights(damaged / "model.safetensors", drop=(MISSING,), put={"model.layers.0.mlp.spare.weight": stand_in})
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error == refusal(
        damaged,
        f"the weight files have 1 of the model's tensors missing ({MISSING}); "
        "1 tensors the model does not have (model.layers.0.mlp.spare.weight)",
    )


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(damaged):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(damaged / "model.safetensors", put={name: torch.zeros(32, 65)})
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error == refusal(
        damaged, f"the weight files have 1 of the wrong shape ({name}: [32, 65] in the files, [32, 64] in the model)"
    )


def test_a_pickle_checkpoint_missing_a_tensor_is_refused_from_from_pretrained_s_report(damaged):
    from safetensors.torch import load_file

    state = load_file(damaged / "model.safetensors")
    del state[MISSING]
    (damaged / "model.safetensors").unlink()
    torch.save(state, damaged / "pytorch_model.bin")
    error = startup_error({"MODEL_NAME": str(damaged), "ALLOW_PICKLE_WEIGHTS": "true"})
    assert error == refusal(damaged, f"the weight files have 1 of the model's tensors missing ({MISSING})")


def test_more_layers_in_config_json_than_in_the_weights_is_refused(damaged):
    edit_config(damaged, num_hidden_layers=3)
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error == refusal(damaged, "config.json declares num_hidden_layers=3 and the weights hold 2")


def test_an_absurd_layer_count_in_the_default_model_is_refused_before_anything_is_built(default_model_path, tmp_path):
    folder = tmp_path / "smollm2"
    folder.mkdir()
    for path in default_model_path.iterdir():
        (folder / path.name).symlink_to(path.resolve())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text((default_model_path / "config.json").read_text())
    edit_config(folder, num_hidden_layers=100000)
    error = startup_error({"MODEL_NAME": str(folder)})
    assert error == refusal(folder, "config.json declares num_hidden_layers=100000 and the weights hold 30")


def test_a_wider_model_in_config_json_than_in_the_weights_names_the_shapes(damaged):
    edit_config(damaged, intermediate_size=64_000)
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error.startswith(f"{damaged}: {damaged} does not match its config.json: the weight files have 6 of the ")
    assert "(model.layers.0.mlp.down_proj.weight: [32, 64] in the files, [32, 64000] in the model, " in error


def test_a_model_larger_than_its_renamed_weights_is_refused_with_both_sizes_before_it_is_built(damaged):
    from safetensors.torch import load_file

    state = load_file(damaged / "model.safetensors")
    edit_weights(damaged / "model.safetensors", drop=tuple(state), put={f"old.{k}": v for k, v in state.items()})
    edit_config(damaged, intermediate_size=64_000)
    held = sum(t.numel() for t in state.values())
    built = held + 2 * 3 * 32 * (64_000 - 64)  # 2 layers of 3 MLP matrices, 32 wide
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error == refusal(
        damaged,
        f"config.json describes {built:,} parameters ({human_bytes(4 * built)} as torch.float32) "
        f"and the weight files hold {held:,} ({human_bytes((damaged / 'model.safetensors').stat().st_size)})",
    )


@pytest.mark.parametrize(
    "name, text, what",
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', "has a tokenizer.json that is not valid JSON ("),
        ("tokenizer_config.json", "{bad", "has a tokenizer_config.json that is not valid JSON ("),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}', "cannot be loaded (KeyError: "),
    ],
)
def test_a_damaged_tokenizer_file_is_named(damaged, name, text, what):
    (damaged / name).write_text(text)
    error = startup_error({"MODEL_NAME": str(damaged)})
    assert error.startswith(f"{damaged}: the tokenizer in {damaged} {what}")
    assert error.endswith(
        "the copy is damaged: fetch the model again with its tokenizer files (rebuild the image if it is baked)"
    )
