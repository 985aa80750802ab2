"""Helpers for fault tests: a model folder copied from a good one and then damaged, and the error every job
gets from a worker started on it through the real entry point (`start_worker`)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worker_transformers.model.manifest import model_files, sha256, write_manifest


def run(handler, job_input) -> list:
    async def collect():
        return [item async for item in handler({"id": "t", "input": job_input})]

    return asyncio.run(collect())


def startup_error(env: dict) -> str:
    """The error a worker started with `env` answers a job with; fails the test if startup succeeded."""
    from worker_transformers.worker import start_worker

    started = start_worker(env)
    try:
        [item] = run(started.handler, {"prompt": "x"})
    finally:
        started.close()
    assert set(item) == {"error"}, f"startup did not fail: {json.dumps(item)[:200]}"
    return item["error"]


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(path: Path, drop: tuple[str, ...] = (), put: dict[str, torch.Tensor] | None = None) -> None:
    """Rewrite a safetensors file without the tensors in `drop` and with those in `put` added or replaced."""
    state = {name: tensor for name, tensor in load_file(path).items() if name not in drop}
    state.update(put or {})
    save_file(state, path, metadata={"format": "pt"})


def bake(tiny_model_dir, tmp_path):
    """A baked folder as builder/fetch_model.py writes it: the files and a manifest with sizes and hashes."""
    folder = copy_model(tiny_model_dir, tmp_path / "models")
    files = [
        {"path": name, "size": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
        for name in model_files(folder)
    ]
    write_manifest(folder, "Org/Baked", "abc", files)
    return folder, {"MODEL_NAME": "Org/Baked", "MODEL_SOURCE": "baked", "BAKED_MODEL_DIR": str(folder)}
