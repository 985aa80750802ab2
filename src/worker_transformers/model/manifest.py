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


class MalformedManifest(ValueError):
    """manifest.json cannot be trusted as written; the message names the file and the field."""


def outside(folder: Path, relative: object) -> str | None:
    """Why a path that a manifest or an index names does not stay inside `folder` (None: it does). Symlinks may
    lead within the folder, or, for a Hugging Face cache snapshot (REPO/snapshots/REV), within its repo folder:
    a snapshot's files are links to REPO/blobs."""
    if not isinstance(relative, str) or not relative:
        return "is not a file name"
    if relative.startswith("/") or "\\" in relative:
        return "is not a path relative to the model folder"
    if ".." in relative.split("/"):
        return "leads out of the model folder (..)"
    root = folder.resolve()
    home = root.parent.parent if root.parent.name == "snapshots" else root
    if not (folder / relative).resolve().is_relative_to(home):
        return f"is a link that leads out of {home}"
    return None


def read_manifest(folder: Path) -> dict | None:
    """The manifest, checked field by field (None: there is none). Raises MalformedManifest."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as error:
        raise MalformedManifest(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise MalformedManifest(f"{path} is not a JSON object")
    for field in ("model_id", "revision"):
        if not isinstance(manifest.get(field), str):
            raise MalformedManifest(f"{path}: {field} is not a string")
    if not isinstance(manifest.get("files"), list):
        raise MalformedManifest(f"{path}: files is not a list")
    for index, entry in enumerate(manifest["files"]):
        where = f"{path}: files[{index}]"
        if not isinstance(entry, dict):
            raise MalformedManifest(f"{where} is not an object")
        if why := outside(folder, entry.get("path")):
            raise MalformedManifest(f"{where}.path {entry.get('path')!r} {why}")
        if not isinstance(entry.get("size"), int) or isinstance(entry["size"], bool) or entry["size"] < 0:
            raise MalformedManifest(f"{where}.size is not a byte count")
        if entry.get("sha256") is not None and not is_sha256(entry["sha256"]):
            raise MalformedManifest(f"{where}.sha256 is not a sha256 digest (64 hex digits)")
    return manifest


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def why_incomplete(folder: Path, model_id: str, revision: str | None) -> str | None:
    """Why `folder` is not a complete copy of `model_id` at `revision` (None: it is). Checks the manifest and
    every file's size; hashes are checked when the folder is written, not on every start. Raises
    MalformedManifest."""
    if not folder.is_dir():
        return "missing"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no {MANIFEST}: an incomplete copy"
    if manifest["model_id"] != model_id or (revision and manifest["revision"] != revision):
        return f"holds {manifest['model_id']}@{manifest['revision']}, not {model_id}@{revision or 'any'}"
    for entry in manifest["files"]:
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
