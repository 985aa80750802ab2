"""Every path a manifest.json or model.safetensors.index.json names stays inside its model folder, and a
malformed one is refused naming the file and the field: real baked folders and model folders, damaged after
copying, started through the real entry point."""

import json
import os

import pytest
from startup_faults import bake, copy_model, startup_error

BAKED_FIX = "the copy is damaged: rebuild the image (baked) or delete the folder so it is filled again (volume)"
FOLDER_FIX = "the copy is damaged: fetch the model again (rebuild the image if it is baked)"


def rewrite_manifest(folder, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def first_file(path):
    return lambda manifest: manifest["files"][0].update(path=path)


@pytest.mark.parametrize(
    "change, field",
    [
        (first_file("../../x"), "files[0].path '../../x' leads out of the model folder (..)"),
        (first_file("/etc/passwd"), "files[0].path '/etc/passwd' is not a path relative to the model folder"),
        (first_file(7), "files[0].path 7 is not a file name"),
        (lambda m: m["files"][1].update(size="big"), "files[1].size is not a byte count"),
        (lambda m: m["files"][1].update(sha256="abc"), "files[1].sha256 is not a sha256 digest (64 hex digits)"),
        (lambda m: m.update(files={"a": 1}), "files is not a list"),
        (lambda m: m.update(model_id=None), "model_id is not a string"),
        (lambda m: m["files"].append("config.json"), "files[6] is not an object"),
    ],
)
def test_a_malformed_or_escaping_manifest_is_refused_naming_the_field(tiny_model_dir, tmp_path, change, field):
    folder, env = bake(tiny_model_dir, tmp_path)
    rewrite_manifest(folder, change)
    assert startup_error(env) == f"Org/Baked: {folder / 'manifest.json'}: {field}; {BAKED_FIX}"


def test_a_manifest_that_is_not_json_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    folder, env = bake(tiny_model_dir, tmp_path)
    (folder / "manifest.json").write_text('{"model_id": "Org/Baked", ')
    error = startup_error(env)
    assert error.startswith(f"Org/Baked: {folder / 'manifest.json'} is not valid JSON (") and error.endswith(BAKED_FIX)


def test_a_manifest_entry_linked_out_of_the_folder_is_refused_before_it_is_read(tiny_model_dir, tmp_path):
    folder, env = bake(tiny_model_dir, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    (folder / "vocab.json").symlink_to(secret)
    rewrite_manifest(folder, lambda m: m["files"].append({"path": "vocab.json", "size": 16}))
    assert startup_error(env) == (
        f"Org/Baked: {folder / 'manifest.json'}: files[6].path 'vocab.json' is a link that leads out of {folder}; "
        f"{BAKED_FIX}"
    )


def sharded(tiny_model_dir, tmp_path, shard: str):
    """The tiny model whose index names `shard` for every tensor."""
    from safetensors import safe_open

    folder = copy_model(tiny_model_dir, tmp_path / "sharded")
    with safe_open(folder / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    index = {"metadata": {}, "weight_map": {name: shard for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder, sorted(names)[0]


@pytest.mark.parametrize(
    "shard, why",
    [
        ("../model.safetensors", "leads out of the model folder (..)"),
        ("/etc/passwd", "is not a path relative to the model folder"),
        (["model.safetensors"], "is not a file name"),
    ],
)
def test_an_index_naming_a_shard_outside_the_folder_is_refused_naming_the_tensor(tiny_model_dir, tmp_path, shard, why):
    folder, first = sharded(tiny_model_dir, tmp_path, shard)
    assert startup_error({"MODEL_NAME": str(folder)}) == (
        f"{folder}: {folder / 'model.safetensors.index.json'} weight_map[{first!r}] = {shard!r} {why}; {FOLDER_FIX}"
    )


def test_an_index_whose_shard_is_a_link_out_of_the_folder_is_refused(tiny_model_dir, tmp_path):
    folder, first = sharded(tiny_model_dir, tmp_path, "shard.safetensors")
    os.replace(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (folder / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    assert startup_error({"MODEL_NAME": str(folder)}) == (
        f"{folder}: {folder / 'model.safetensors.index.json'} weight_map[{first!r}] = 'shard.safetensors' is a link "
        f"that leads out of {folder}; {FOLDER_FIX}"
    )


@pytest.mark.parametrize(
    "text, what",
    [("[1, 2]", "is not a JSON object"), ('{"weight_map": []}', 'has no "weight_map" object of tensor names')],
)
def test_a_malformed_index_is_refused_naming_the_field(tiny_model_dir, tmp_path, text, what):
    folder, _ = sharded(tiny_model_dir, tmp_path, "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(text)
    error = startup_error({"MODEL_NAME": str(folder)})
    assert error.startswith(f"{folder}: {folder / 'model.safetensors.index.json'} {what}") and error.endswith(
        FOLDER_FIX
    )


def test_a_cache_snapshot_whose_index_names_links_into_its_own_blobs_loads(tiny_model_dir, tmp_path):
    from startup_faults import run

    from worker_transformers.worker import start_worker

    repo = tmp_path / "hub" / "models--Org--Tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    folder, _ = sharded(tiny_model_dir, tmp_path, "model.safetensors")
    for path in folder.iterdir():
        blob = repo / "blobs" / path.name
        os.replace(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    started = start_worker(
        {"MODEL_NAME": "Org/Tiny", "MODEL_SOURCE": "hub", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    )
    try:
        [answer] = run(started.handler, {"prompt": "Hello", "max_new_tokens": 2})
    finally:
        started.close()
    assert answer["usage"]["completion_tokens"] == 2, answer
