"""sources.resolve against real folder layouts: a baked folder, Hugging Face cache trees (blobs, snapshots,
refs) with the repo id in its exact case and lowercased, a network-volume folder. The weight files are small
placeholders: resolution looks at names, never at tensor bytes."""

import json
from pathlib import Path

import pytest

from worker_transformers.config import Settings
from worker_transformers.model.errors import ModelNotFound, UnsupportedWeights
from worker_transformers.model.manifest import model_files, sha256, write_manifest
from worker_transformers.model.sources import resolve

MODEL = "Org/Some-Model"


def write_model(folder: Path, weights=("model.safetensors",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    for name in weights:
        (folder / name).write_bytes(b"weights")
    return folder


def write_volume_model(folder: Path, model_id=MODEL) -> Path:
    """A complete network-volume folder: the model's files, then its manifest."""
    write_model(folder)
    entries = [
        {"path": p, "size": (folder / p).stat().st_size, "sha256": sha256(folder / p)} for p in model_files(folder)
    ]
    write_manifest(folder, model_id, None, entries)
    return folder


def write_cache_snapshot(cache: Path, repo_id: str, commit: str, ref: str | None = "main") -> Path:
    """A Hugging Face cache entry the way huggingface_hub writes it: blobs linked from a snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": b"{}",
        "model.safetensors": b"w" + commit.encode(),
    }
    for name, content in files.items():
        blob = blobs / f"{name}-{commit}"
        blob.write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def env(tmp_path):
    """Settings pointing every source at its own empty folder under tmp_path."""
    base = {
        "MODEL_NAME": MODEL,
        "BAKED_MODEL_DIR": str(tmp_path / "models"),
        "RUNPOD_CACHE_DIR": str(tmp_path / "runpod-volume/huggingface-cache/hub"),
        "VOLUME_MODEL_DIR": str(tmp_path / "runpod-volume/models"),
        "HF_HUB_CACHE": str(tmp_path / "local-cache"),
        "HF_HUB_OFFLINE": "1",
    }

    def settings(**overrides) -> Settings:
        return Settings.from_env({**base, **overrides})

    settings.tmp = tmp_path
    return settings


def bake(folder: Path, model_id=MODEL, revision="abc123") -> Path:
    write_model(folder)
    (folder / "manifest.json").write_text(json.dumps({"model_id": model_id, "revision": revision, "files": []}))
    return folder


def test_baked_folder_with_its_manifest_comes_first(env):
    settings = env()
    bake(settings.baked_model_dir)
    write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c1")
    location = resolve(settings)
    assert (location.source, location.path) == ("baked", settings.baked_model_dir)
    assert location.model_id == MODEL


def test_baked_folder_for_another_model_is_skipped(env):
    settings = env()
    bake(settings.baked_model_dir, model_id="Org/Other")
    snapshot = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c1")
    location = resolve(settings)
    assert (location.source, location.path) == ("cached", snapshot)


def test_baked_folder_without_manifest_is_not_trusted(env):
    settings = env(MODEL_SOURCE="baked")
    write_model(settings.baked_model_dir)
    with pytest.raises(ModelNotFound, match="no manifest.json"):
        resolve(settings)


def test_cached_model_follows_refs_main(env):
    settings = env()
    write_cache_snapshot(settings.runpod_cache_dir, MODEL, "old", ref=None)
    current = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "current")
    location = resolve(settings)
    assert (location.source, location.path) == ("cached", current)


def test_cached_model_in_lowercase_is_found_and_keeps_its_original_name(env):
    settings = env()
    snapshot = write_cache_snapshot(settings.runpod_cache_dir, MODEL.lower(), "c1")
    location = resolve(settings)
    assert (location.source, location.path) == ("cached", snapshot)
    assert location.model_id == MODEL


def test_exact_case_wins_over_lowercase(env):
    settings = env()
    write_cache_snapshot(settings.runpod_cache_dir, MODEL.lower(), "lower")
    exact = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "exact")
    assert resolve(settings).path == exact


def test_cached_model_with_a_pinned_revision_uses_its_ref(env):
    settings = env(MODEL_REVISION="v2")
    write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c-main")
    pinned = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c-v2", ref="v2")
    assert resolve(settings).path == pinned


def test_cached_model_with_a_commit_revision_uses_that_snapshot(env):
    settings = env(MODEL_REVISION="c-old")
    old = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c-old", ref=None)
    write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c-new")
    assert resolve(settings).path == old


def test_cached_model_without_refs_uses_the_newest_snapshot(env):
    import os

    settings = env()
    older = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "a-older", ref=None)
    newer = write_cache_snapshot(settings.runpod_cache_dir, MODEL, "b-newer", ref=None)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    assert resolve(settings).path == newer


def test_a_missing_pinned_revision_does_not_fall_back_to_another_snapshot(env):
    settings = env(MODEL_REVISION="v9", MODEL_SOURCE="cached")
    write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c1", ref=None)
    with pytest.raises(ModelNotFound, match="no snapshot for v9"):
        resolve(settings)


def test_volume_folder_is_used_after_the_cache(env):
    settings = env()
    folder = write_volume_model(settings.volume_model_dir / MODEL)
    location = resolve(settings)
    assert (location.source, location.path) == ("volume", folder)


def test_local_hugging_face_cache_is_searched_last(env):
    settings = env()
    snapshot = write_cache_snapshot(settings.hf_hub_cache, MODEL, "local1")
    location = resolve(settings)
    assert (location.source, location.path) == ("local-cache", snapshot)


@pytest.mark.parametrize("forced", ["baked", "cached", "volume"])
def test_a_forced_source_looks_only_there(env, forced):
    settings = env(MODEL_SOURCE=forced)
    # Every other source holds the model; the forced one does not.
    if forced != "baked":
        bake(settings.baked_model_dir)
    if forced != "cached":
        write_cache_snapshot(settings.runpod_cache_dir, MODEL, "c1")
    if forced != "volume":
        write_volume_model(settings.volume_model_dir / MODEL)
    write_cache_snapshot(settings.hf_hub_cache, MODEL, "local1")
    with pytest.raises(ModelNotFound) as caught:
        resolve(settings)
    tried = str(caught.value).split("tried: ")[1]
    assert f"{forced}: " in tried
    assert {"baked", "cached", "volume", "local-cache"} - {forced} == {
        s for s in ("baked", "cached", "volume", "local-cache") if f"{s}: " not in tried
    }


def test_not_found_lists_every_path_tried_and_the_fix(env):
    settings = env()
    with pytest.raises(ModelNotFound) as caught:
        resolve(settings)
    message = str(caught.value)
    for path in (
        settings.baked_model_dir,
        settings.runpod_cache_dir / "models--Org--Some-Model",
        settings.runpod_cache_dir / "models--org--some-model",
        settings.volume_model_dir / MODEL,
        settings.hf_hub_cache / "models--Org--Some-Model",
    ):
        assert str(path) in message
    assert "HF_HUB_OFFLINE" in message
    assert "cached model" in message


def test_hub_download_is_the_last_resort_when_allowed(env):
    settings = env(HF_HUB_OFFLINE="0")
    downloaded = write_model(settings.hf_hub_cache / "downloaded")
    calls = []

    def download(s):
        calls.append(s.model_name)
        return downloaded

    location = resolve(settings, download=download)
    assert (location.source, location.path, calls) == ("hub", downloaded, [MODEL])


@pytest.mark.parametrize("overrides", [{"MODEL_SOURCE": "cached"}, {"HF_HUB_OFFLINE": "1"}])
def test_hub_is_not_asked_when_the_settings_forbid_it(env, overrides):
    settings = env(**{"HF_HUB_OFFLINE": "0", **overrides})

    def download(_):
        raise AssertionError("the Hub must not be asked")

    with pytest.raises(ModelNotFound):
        resolve(settings, download=download)


def test_an_absolute_folder_is_loaded_as_is(env):
    folder = write_model(env.tmp / "my-model")
    location = resolve(env(MODEL_NAME=str(folder)))
    assert (location.source, location.path, location.model_id) == ("folder", folder, str(folder))


def test_a_missing_absolute_folder_says_so(env):
    with pytest.raises(ModelNotFound, match="is not a folder"):
        resolve(env(MODEL_NAME=str(env.tmp / "nothing-here")))


def test_pickle_only_weights_are_refused_with_a_reason(env):
    folder = write_model(env.tmp / "old-model", weights=("pytorch_model.bin",))
    with pytest.raises(UnsupportedWeights) as caught:
        resolve(env(MODEL_NAME=str(folder)))
    assert "pytorch_model.bin" in str(caught.value)
    assert "safetensors" in str(caught.value)


def test_sharded_weights_with_a_missing_shard_are_refused(env):
    folder = write_model(env.tmp / "sharded", weights=("model-00001-of-00002.safetensors",))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedWeights, match="missing 1 of 2 weight shards"):
        resolve(env(MODEL_NAME=str(folder)))


def test_a_config_that_is_not_json_is_refused_as_damaged(env):
    folder = write_model(env.tmp / "broken")
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(
        UnsupportedWeights, match=r"config.json is not valid JSON .*the copy is damaged: fetch it again"
    ):
        resolve(env(MODEL_NAME=str(folder)))
