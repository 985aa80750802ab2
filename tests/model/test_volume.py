"""The network-volume folder: loaded only with its manifest, filled from the Hub once, by one worker at a time.

The Hub is out of reach here, so the download function that `resolve` takes is replaced by one that lays a real
model (the tiny fixture model) out in the given Hugging Face cache the way huggingface_hub does: blobs named by
their sha256, a snapshot of relative symlinks. Everything after the download is the worker's own code."""

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker_transformers.config import Settings
from worker_transformers.model.errors import ModelNotFound
from worker_transformers.model.manifest import MANIFEST, sha256, write_manifest
from worker_transformers.model.sources import resolve
from worker_transformers.model.volume import LOCKS, STAGING, VolumeFillError

MODEL = "Org/Some-Model"


class CopyingDownloader:
    """Stands in for download_from_hub: copies `source` into settings.hf_hub_cache as a cache snapshot, and
    records each call in a file (so calls from other processes count too)."""

    def __init__(self, source: Path, calls: Path, delay: float = 0.0, fail_after: int | None = None):
        self.source, self.calls, self.delay, self.fail_after = source, calls, delay, fail_after

    def __call__(self, settings: Settings) -> Path:
        with self.calls.open("a") as log:
            log.write(f"{os.getpid()}\n")
        repo = settings.hf_hub_cache / f"models--{settings.model_name.replace('/', '--')}"
        snapshot = repo / "snapshots" / "c0ffee"
        snapshot.mkdir(parents=True)
        (repo / "blobs").mkdir()
        for count, file in enumerate(sorted(self.source.iterdir())):
            if self.fail_after is not None and count == self.fail_after:
                raise ModelNotFound(f"{settings.model_name} could not be downloaded from the Hub (ConnectError)")
            time.sleep(self.delay)
            blob = repo / "blobs" / sha256(file)
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
        return snapshot

    def count(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


@pytest.fixture
def env(tmp_path):
    base = {
        "MODEL_NAME": MODEL,
        "MODEL_SOURCE": "volume",
        "HF_HUB_OFFLINE": "0",
        "BAKED_MODEL_DIR": str(tmp_path / "models"),
        "RUNPOD_CACHE_DIR": str(tmp_path / "runpod-volume/huggingface-cache/hub"),
        "VOLUME_MODEL_DIR": str(tmp_path / "runpod-volume/models"),
        "HF_HUB_CACHE": str(tmp_path / "local-cache"),
    }
    return lambda **overrides: Settings.from_env({**base, **overrides})


@pytest.fixture
def hub(tiny_model_dir, tmp_path):
    return CopyingDownloader(tiny_model_dir, tmp_path / "downloads.log")


def test_a_missing_model_is_downloaded_into_the_volume_with_its_manifest(env, hub, tiny_model_dir):
    settings = env()
    location = resolve(settings, download=hub)
    folder = settings.volume_model_dir / MODEL
    assert (location.source, location.path) == ("volume", folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["model_id"] == MODEL
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert [f["path"] for f in manifest["files"]] == names
    for entry in manifest["files"]:
        file = folder / entry["path"]
        assert not file.is_symlink(), "the volume must hold the files, not links into a deleted cache"
        assert (entry["size"], entry["sha256"]) == (file.stat().st_size, sha256(tiny_model_dir / entry["path"]))
    assert list((settings.volume_model_dir / STAGING).iterdir()) == []


def test_a_filled_volume_is_used_as_it_is_by_the_next_worker(env, hub):
    resolve(env(), download=hub)
    resolve(env(), download=hub)
    assert hub.count() == 1


def test_a_filled_volume_model_loads_and_generates(env, hub):
    from worker_transformers.serving.schema import parse_request
    from worker_transformers.worker import setup

    resolve(env(), download=hub)
    engine = setup(env(HF_HUB_OFFLINE="1"))  # no download possible: the volume alone must serve it
    out = engine.generate(parse_request({"prompt": "The capital", "max_new_tokens": 3}, 8))
    assert out["usage"]["completion_tokens"] >= 1


def _resolve_in_worker(settings, hub, results):
    results.put(str(resolve(settings, download=hub).path))


def test_workers_starting_together_download_once(env, tiny_model_dir, tmp_path):
    slow_hub = CopyingDownloader(tiny_model_dir, tmp_path / "downloads.log", delay=0.2)
    # New interpreters, as real workers are: forking a test process that runs threads can deadlock the child.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_resolve_in_worker, args=(env(), slow_hub, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert {results.get(timeout=5) for _ in workers} == {str(env().volume_model_dir / MODEL)}
    assert slow_hub.count() == 1


def test_an_interrupted_download_leaves_nothing_that_looks_complete(env, tiny_model_dir, tmp_path):
    settings = env()
    broken = CopyingDownloader(tiny_model_dir, tmp_path / "downloads.log", fail_after=2)
    with pytest.raises(VolumeFillError) as caught:
        resolve(settings, download=broken)
    assert str(settings.volume_model_dir / MODEL) in str(caught.value)
    assert "ConnectError" in str(caught.value)
    assert not (settings.volume_model_dir / MODEL).exists()
    assert list((settings.volume_model_dir / STAGING).iterdir()) == []
    # the lock was released: the next worker fills the volume
    working = CopyingDownloader(tiny_model_dir, tmp_path / "downloads.log")
    assert resolve(settings, download=working).source == "volume"


def test_a_staging_folder_left_by_a_dead_worker_is_removed(env, hub):
    settings = env()
    leftover = settings.volume_model_dir / STAGING / "Org--Some-Model.otherhost.4242" / "model"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a file")
    resolve(settings, download=hub)
    assert not leftover.parent.exists()


def test_a_folder_another_machine_finished_first_is_used(env, tiny_model_dir, tmp_path):
    """Where the lock does not reach across machines, the final rename still lets only one folder in."""
    settings = env()
    folder = settings.volume_model_dir / MODEL

    def racing_hub(s):
        # Another machine, not holding this machine's lock, finishes the same folder during this download.
        shutil.copytree(tiny_model_dir, folder)
        entries = [{"path": p.name, "size": p.stat().st_size, "sha256": sha256(p)} for p in sorted(folder.iterdir())]
        write_manifest(folder, MODEL, None, entries)
        return CopyingDownloader(tiny_model_dir, tmp_path / "downloads.log")(s)

    location = resolve(settings, download=racing_hub)
    assert location.path == folder
    assert json.loads((folder / MANIFEST).read_text())["model_id"] == MODEL
    assert list((settings.volume_model_dir / STAGING).iterdir()) == []


def test_a_folder_without_its_manifest_is_neither_loaded_nor_overwritten(env, hub, tiny_model_dir):
    settings = env()
    folder = settings.volume_model_dir / MODEL
    shutil.copytree(tiny_model_dir, folder)
    with pytest.raises(ModelNotFound) as caught:
        resolve(settings, download=hub)
    assert f"{folder} (no manifest.json" in str(caught.value)
    assert "builder/fetch_model.py" in str(caught.value)
    assert hub.count() == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in tiny_model_dir.iterdir())


def test_a_truncated_file_makes_the_folder_incomplete(env, hub):
    settings = env()
    folder = resolve(settings, download=hub).path
    with (folder / "model.safetensors").open("r+b") as weights:
        weights.truncate(100)
    with pytest.raises(ModelNotFound, match="model.safetensors is 100 bytes, the manifest says"):
        resolve(settings, download=hub)


def test_a_folder_for_another_revision_is_not_used(env, hub):
    resolve(env(), download=hub)
    with pytest.raises(ModelNotFound, match="holds Org/Some-Model@main, not Org/Some-Model@v2"):
        resolve(env(MODEL_REVISION="v2"), download=hub)


def test_offline_the_volume_is_not_filled_and_the_error_says_how_to_fill_it(env, hub):
    settings = env(HF_HUB_OFFLINE="1")
    with pytest.raises(ModelNotFound) as caught:
        resolve(settings, download=hub)
    message = str(caught.value)
    assert f"python builder/fetch_model.py {MODEL} --out {settings.volume_model_dir / MODEL}" in message
    assert "unset HF_HUB_OFFLINE" in message
    assert hub.count() == 0
    assert not (settings.volume_model_dir / LOCKS).exists()


def test_only_a_worker_told_to_use_the_volume_writes_to_it(env, hub):
    settings = env(MODEL_SOURCE="auto")
    location = resolve(settings, download=hub)
    assert location.source == "hub"  # the last resort downloads to local disk
    assert not settings.volume_model_dir.exists()


def test_light_modules_do_not_import_torch():
    code = "import sys, worker_transformers.model.volume, worker_transformers.model.manifest; "
    code += "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    src = str(Path(__file__).resolve().parents[2] / "src")
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": src}).returncode == 0
