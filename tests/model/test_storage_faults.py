"""Faults a user can fix around the Hub and the folders the worker writes, each answered with its own message
naming the setting and the fix, through the real entry point: a token the Hub refuses as opposed to a Hub that
cannot be reached, a cache or volume path that exists as a file, a disk without room, a read-only volume."""

import subprocess
from contextlib import contextmanager

import pytest
from api_server import free_port
from fake_hub import FakeHub
from startup_faults import startup_error

REPO = "Org/Tiny"


def hub_env(tmp_path, endpoint: str, **env) -> dict:
    return {
        "MODEL_NAME": REPO,
        "MODEL_SOURCE": "hub",
        "HF_HUB_CACHE": str(tmp_path / "cache"),
        "HF_ENDPOINT": endpoint,
        # The startup budget counts from the process's start, and this test process may be minutes old already.
        "RUNPOD_INIT_TIMEOUT": "86400",
        **env,
    }


@contextmanager
def small_disk(path, size: str, read_only: bool = False):
    """A tmpfs of `size` at `path`: a disk that fills, or one that may not be written."""
    path.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("status", [401, 403])
def test_a_token_the_hub_refuses_says_so_and_not_check_the_network(tiny_model_dir, tmp_path, status):
    with FakeHub(REPO, tiny_model_dir, fail_files_with=status) as hub:
        error = startup_error(hub_env(tmp_path, hub.url, HF_TOKEN="hf_wrong"))
    assert error == (
        f"{REPO}@main: the Hub refused the request (HTTP {status}): HF_TOKEN is missing, invalid or lacks access to "
        "this model; set a token that can read it"
    )


def test_a_hub_that_cannot_be_reached_says_check_the_network(tmp_path):
    error = startup_error(hub_env(tmp_path, f"http://127.0.0.1:{free_port()}"))
    assert error.startswith(f"{REPO}@main could not be downloaded from the Hub (") and "); check the network" in error
    assert "HF_TOKEN" not in error


def test_a_cache_path_that_is_a_file_is_named(tiny_model_dir, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with FakeHub(REPO, tiny_model_dir) as hub:
        error = startup_error(hub_env(tmp_path, hub.url))
    assert error.startswith(f"{REPO}@main could not be saved: {tmp_path / 'cache'}")
    assert error.endswith("exists as a file: remove it or point HF_HUB_CACHE elsewhere")


def test_a_disk_without_room_for_the_download_says_how_much_is_needed_and_free(tiny_model_dir, tmp_path):
    with small_disk(tmp_path / "disk", "16k") as disk, FakeHub(REPO, tiny_model_dir) as hub:
        error = startup_error(hub_env(tmp_path, hub.url, HF_HUB_CACHE=str(disk / "cache")))
    assert error.startswith(f"no space left on {disk}: {REPO}@main needs 1")
    assert error.endswith(" kB free; free space there or use a larger disk")
    assert not (disk / "cache").exists() or not any((disk / "cache").rglob("*.safetensors"))


def volume_env(tmp_path, hub, volume) -> dict:
    return {**hub_env(tmp_path, hub.url), "MODEL_SOURCE": "volume", "VOLUME_MODEL_DIR": str(volume)}


def test_a_volume_path_that_is_a_file_is_named(tiny_model_dir, tmp_path):
    (tmp_path / "volume").write_text("not a folder")
    with FakeHub(REPO, tiny_model_dir) as hub:
        error = startup_error(volume_env(tmp_path, hub, tmp_path / "volume" / "models"))
    assert error.startswith(f"filling the network volume folder {tmp_path / 'volume' / 'models' / REPO}: ")
    assert error.endswith("exists as a file: remove it or point VOLUME_MODEL_DIR elsewhere")


def test_a_read_only_volume_is_named(tiny_model_dir, tmp_path):
    with small_disk(tmp_path / "volume", "1m", read_only=True) as volume, FakeHub(REPO, tiny_model_dir) as hub:
        error = startup_error(volume_env(tmp_path, hub, volume / "models"))
    assert error == (
        f"filling the network volume folder {volume / 'models' / REPO}: {volume / 'models'} is on a read-only "
        "filesystem: point VOLUME_MODEL_DIR at a writable folder"
    )


def test_a_full_volume_says_how_much_the_model_needs_and_how_much_is_free(tiny_model_dir, tmp_path):
    with small_disk(tmp_path / "volume", "16k") as volume, FakeHub(REPO, tiny_model_dir) as hub:
        error = startup_error(volume_env(tmp_path, hub, volume / "models"))
    assert error.startswith(
        f"filling the network volume folder {volume / 'models' / REPO}: no space left on {volume}: "
    )
    assert error.endswith(" kB free; free space there or use a larger disk")
