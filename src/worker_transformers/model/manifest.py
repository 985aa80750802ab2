"""A model folder's files and its manifest, the record that the folder is complete.

`manifest.json` names the model, its revision and every file with its size and sha256. It is written last,
so a folder that has one was finished; a folder without one (an interrupted copy) is never loaded from the
baked image or a network volume. This module imports only the standard library: the image's model-fetch
step copies it alone, so that a code change elsewhere does not invalidate the weights' layer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"

# The files a causal LM is served from: safetensors weights, configs and tokenizer files. Never pickle weights.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "vocab.*",
    "merges.txt",
    "*.model",
)


def is_model_file(relative_path: str) -> bool:
    """Whether a file (path relative to the model folder, `/`-separated) is one of MODEL_FILE_PATTERNS,
    matched on its name as huggingface_hub matches `allow_patterns`."""
    return any(fnmatch.fnmatch(relative_path, pattern) for pattern in MODEL_FILE_PATTERNS)


def model_files(folder: Path) -> list[str]:
    """The model files under `folder`, as sorted relative paths (symlinks followed, as in a cache snapshot)."""
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not relative.startswith(".") and is_model_file(relative):
            found.append(relative)
    return sorted(found)


def sha256(path: Path, on_bytes=None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()


def write_manifest(folder: Path, model_id: str, revision: str | None, files: list[dict]) -> None:
    """Write the manifest (last step of filling `folder`), durably: a temporary file, fsynced, then renamed."""
    manifest = {"model_id": model_id, "revision": revision or "main", "files": files}
    temporary = folder / f".{MANIFEST}.partial"
    with temporary.open("w") as out:
        json.dump(manifest, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    temporary.rename(folder / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # a manifest cut short by a full disk: the folder is not complete
        return None


def why_incomplete(folder: Path, model_id: str, revision: str | None) -> str | None:
    """Why `folder` is not a complete copy of `model_id` at `revision` (None: it is). Checks the manifest and
    every file's size; hashes are checked when the folder is written, not on every start."""
    if not folder.is_dir():
        return "missing"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no {MANIFEST}: an incomplete copy"
    if manifest.get("model_id") != model_id or (revision and manifest.get("revision") != revision):
        return f"holds {manifest.get('model_id')}@{manifest.get('revision')}, not {model_id}@{revision or 'any'}"
    for entry in manifest.get("files", []):
        path = folder / entry["path"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            return f"{entry['path']} is {'missing' if size is None else f'{size} bytes'}, the manifest says {entry['size']}"
    return None


def hash_mismatch(folder: Path) -> str | None:
    """The first file whose sha256 differs from the manifest's (None: all match). Reads every byte."""
    for entry in (read_manifest(folder) or {}).get("files", []):
        if entry.get("sha256") and sha256(folder / entry["path"]) != entry["sha256"]:
            return entry["path"]
    return None
