"""builder/fetch_model.py: a verified copy with its manifest, rerunnable, and never a folder that looks complete
when it is not. The source is the tiny fixture model in a local folder (the Hub is out of reach here); the Hub
path is run against a closed local port to check its retries and its one-line failure."""

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub

from worker_transformers.model.manifest import MANIFEST, sha256

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "builder" / "fetch_model.py"
MODEL = "Org/Some-Model"


def load_fetch_model():
    spec = importlib.util.spec_from_file_location("fetch_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def source(tiny_model_dir, tmp_path) -> Path:
    """The tiny model as a repo has it, with files that must not be taken."""
    folder = tmp_path / "source"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle weights")
    (folder / "README.md").write_text("model card")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    return folder


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, **kwargs)


def test_a_folder_is_copied_with_a_manifest_of_every_file(source, tiny_model_dir, tmp_path):
    out = tmp_path / "models"
    result = run(source, "--out", out, "--model-id", MODEL, "--revision", "v1")
    assert result.returncode == 0, result.stderr
    assert "sizes and hashes verified" in result.stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["model_id"], manifest["revision"]) == (MODEL, "v1")
    expected = sorted(p.name for p in tiny_model_dir.iterdir())
    assert [f["path"] for f in manifest["files"]] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected, MANIFEST])
    for entry in manifest["files"]:
        assert (entry["size"], entry["sha256"]) == (
            (out / entry["path"]).stat().st_size,
            sha256(source / entry["path"]),
        )


def test_a_rerun_on_a_complete_folder_does_nothing(source, tmp_path):
    out = tmp_path / "models"
    assert run(source, "--out", out, "--model-id", MODEL).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run(source, "--out", out, "--model-id", MODEL)
    assert result.returncode == 0
    assert "nothing to do" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_rerun_keeps_verified_files_and_replaces_damaged_ones(source, tmp_path):
    out = tmp_path / "models"
    staging = tmp_path / ".models.partial"  # what an interrupted run leaves
    staging.mkdir()
    shutil.copyfile(source / "config.json", staging / "config.json")
    (staging / "model.safetensors").write_bytes(b"cut short")
    kept = (staging / "config.json").stat().st_ino
    assert run(source, "--out", out, "--model-id", MODEL).returncode == 0
    assert (out / "config.json").stat().st_ino == kept
    assert sha256(out / "model.safetensors") == sha256(source / "model.safetensors")
    assert not staging.exists()


def test_a_failure_midway_leaves_no_folder_that_looks_complete(source, tmp_path, monkeypatch, capsys):
    fetch_model = load_fetch_model()
    copies = []

    def copy_then_fail(src, dst):
        if copies:
            raise OSError(28, "No space left on device", str(dst))
        copies.append(dst)
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(fetch_model.shutil, "copyfile", copy_then_fail)
    out = tmp_path / "models"
    assert fetch_model.main([str(source), "--out", str(out), "--model-id", MODEL]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert error.startswith("fetch_model: ") and "No space left on device" in error
    assert not out.exists()
    assert not (tmp_path / ".models.partial" / MANIFEST).exists()


def test_a_folder_with_only_pickle_weights_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "old-model"
    folder.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"pickle weights")
    result = run(folder, "--out", tmp_path / "models", "--model-id", MODEL)
    assert result.returncode == 1
    assert result.stderr.startswith("fetch_model: ") and result.stderr.count("\n") == 1
    assert "safetensors" in result.stderr
    assert not (tmp_path / "models").exists()


def test_a_folder_source_needs_the_model_id(source, tmp_path):
    result = run(source, "--out", tmp_path / "models")
    assert result.returncode == 2
    assert "--model-id" in result.stderr


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is: connections are refused


def test_an_unreachable_hub_is_retried_then_fails_in_one_line_without_the_token(tmp_path):
    token = "hf_madeUpTokenThatMustNeverBePrinted"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = run(MODEL, "--out", tmp_path / "models", "--retries", "2", env={**env, "HF_TOKEN": token}, timeout=120)
    assert result.returncode == 1
    assert "retrying in 1 s (1/2)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fetch_model: ") and "failed 2 times" in last
    assert token not in result.stdout + result.stderr
    assert not (tmp_path / "models").exists()


def test_the_token_comes_from_the_buildkit_secret_before_the_environment(tmp_path, monkeypatch):
    fetch_model = load_fetch_model()
    secret = tmp_path / "HF_TOKEN"
    monkeypatch.setattr(fetch_model, "SECRET_FILE", secret)
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    assert fetch_model.read_token() == "hf_fromTheEnvironment"
    secret.write_text("hf_fromTheSecret\n")
    assert fetch_model.read_token() == "hf_fromTheSecret"
    monkeypatch.delenv("HF_TOKEN")
    secret.write_text("")
    assert fetch_model.read_token() is None


@pytest.fixture
def fake_hub(tiny_model_dir):
    with FakeHub(MODEL, tiny_model_dir) as hub:
        yield hub


def run_against(hub, tmp_path, *args, token="hf_madeUpTokenForTheFakeHub"):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": hub.url, "HF_TOKEN": token}
    return run(MODEL, "--out", tmp_path / "models", *args, env=env, timeout=120)


def test_a_hub_model_is_downloaded_verified_and_the_token_sent_but_never_printed(fake_hub, tiny_model_dir, tmp_path):
    token = "hf_madeUpTokenForTheFakeHub"
    fake_hub.fail_first_get = {"model.safetensors"}
    result = run_against(fake_hub, tmp_path, token=token)
    assert result.returncode == 0, result.stderr
    assert "retrying in 1 s" in result.stderr  # the first GET of the weights answered 500
    out = tmp_path / "models"
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(f["path"] for f in manifest["files"]) == sorted(fake_hub.files)
    for entry in manifest["files"]:
        assert (out / entry["path"]).read_bytes() == (tiny_model_dir / entry["path"]).read_bytes()
        assert entry["sha256"] == sha256(tiny_model_dir / entry["path"])
    assert not (out / ".cache").exists(), "huggingface_hub's bookkeeping must not be baked"
    assert fake_hub.authorizations == {f"Bearer {token}"}
    assert token not in result.stdout + result.stderr


def test_damaged_bytes_from_the_hub_are_refused_and_nothing_looks_complete(fake_hub, tmp_path):
    fake_hub.damaged = {"model.safetensors"}
    result = run_against(fake_hub, tmp_path, "--retries", "2")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "fetch_model: model.safetensors does not match its expected size and hash after 2 tries"
    )
    assert not (tmp_path / "models").exists()


def test_a_model_missing_on_the_hub_fails_in_one_line(fake_hub, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_ENDPOINT": fake_hub.url}
    result = run("Org/Other-Model", "--out", tmp_path / "models", env=env, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("fetch_model: Org/Other-Model")
