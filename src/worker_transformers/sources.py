"""Where are the weights? A pure answer (no torch): a folder on local disk, and how it was found.

MODEL_SOURCE=auto looks, in order, at the baked folder, RunPod's cached models, the network volume and the
local Hugging Face cache, then downloads from the Hub where that is allowed. A forced source looks only
there. Every place looked at is recorded, so that "not found" can say what was tried and what would fix it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .model_files import MANIFEST, hash_mismatch, why_incomplete

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelLocation:
    path: Path  # a folder with config.json, tokenizer files and safetensors weights
    source: str  # folder | baked | cached | volume | local-cache | hub
    model_id: str  # the name the worker serves the model under (MODEL_NAME, in its original case)
    revision: str | None


class ModelNotFound(Exception):
    """No source holds the model. The message lists every path tried and the setting that would fix it."""


class UnsupportedWeights(Exception):
    """The folder holds the model, but not in a form this worker loads (pickle weights, missing shards)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: Path, model_id: str, allow_pickle: bool = False) -> None:
    """Raise UnsupportedWeights unless `path` holds a readable config, tokenizer files and complete
    safetensors weights (or, with `allow_pickle`, pickle weights)."""
    config = path / "config.json"
    if not config.is_file():
        raise UnsupportedWeights(f"{model_id}: {path} has no config.json; the copy is incomplete: fetch it again")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise UnsupportedWeights(
            f"{model_id}: {config} is not valid JSON ({error}); the copy is damaged: fetch it again"
        ) from None
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UnsupportedWeights(
            f"{model_id}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); the copy is incomplete: "
            "fetch the model again with its tokenizer files"
        )
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UnsupportedWeights(
                f"{model_id}: {path} is missing {len(missing)} of {len(shards)} weight shards ({missing[0]}, ...); "
                "the copy is incomplete: download it again"
            )
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = pickle_weights(path)
    if pickles and allow_pickle:
        log.warning("%s: loading pickle weights (%s), as ALLOW_PICKLE_WEIGHTS allows", model_id, ", ".join(pickles))
        return
    if pickles:
        raise UnsupportedWeights(
            f"{model_id}: {path} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code "
            "when loaded; this worker loads safetensors: choose a revision with .safetensors files, convert "
            "the weights with safetensors' convert script, or set ALLOW_PICKLE_WEIGHTS=true if you trust them"
        )
    raise UnsupportedWeights(f"{model_id}: {path} has no .safetensors weights")


def pickle_weights(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)


class _Search:
    """One resolution: the places looked at, in order, for the final error message."""

    def __init__(self, settings: Settings, download: Downloader | None) -> None:
        self.settings = settings
        self.download = download or _download_from_hub
        self.tried: list[str] = []

    def found(self, source: str, path: Path | None, why_not: str = "missing") -> ModelLocation | None:
        if path is None or not path.is_dir():
            self.tried.append(f"{source}: {path if path is not None else '-'} ({why_not})")
            return None
        check_model_folder(path, self.settings.model_name, self.settings.allow_pickle_weights)
        return ModelLocation(path, source, self.settings.model_name, self.settings.model_revision)


def _baked(search: _Search) -> ModelLocation | None:
    return _with_manifest(search, "baked", search.settings.baked_model_dir)


def _with_manifest(search: _Search, source: str, folder: Path) -> ModelLocation | None:
    """A folder that is complete only with its manifest (written last): the baked one, a volume's."""
    settings = search.settings
    why_not = why_incomplete(folder, settings.model_name, settings.model_revision)
    if why_not is not None:
        search.tried.append(f"{source}: {folder} ({why_not})")
        return None
    if settings.verify_weights and (mismatch := hash_mismatch(folder)):
        raise UnsupportedWeights(
            f"{settings.model_name}: {folder / mismatch} does not match the sha256 in {folder / MANIFEST}; the copy "
            "is damaged: rebuild the image (baked) or delete the folder so it is filled again (volume)"
        )
    return search.found(source, folder)


def hf_snapshot(cache_dir: Path, repo_id: str, revision: str | None, newest_if_no_ref: bool) -> Path | None:
    """The snapshot folder of `repo_id` in a Hugging Face cache, found by huggingface_hub's own lookup
    (refs/<revision>, or snapshots/<commit>). When there is no ref for main and `newest_if_no_ref` is set,
    fall back to the newest snapshot (RunPod's cache has been seen without refs)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if isinstance(config, str):
        return Path(config).parent
    snapshots = cache_dir / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if revision is None and newest_if_no_ref and snapshots.is_dir():
        candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
        if candidates:
            return max(candidates, key=lambda s: s.stat().st_mtime)
    return None


def _cached(search: _Search) -> ModelLocation | None:
    settings = search.settings
    spellings = dict.fromkeys([settings.model_name, settings.model_name.lower()])  # exact case first
    for repo_id in spellings:
        snapshot = hf_snapshot(settings.runpod_cache_dir, repo_id, settings.model_revision, newest_if_no_ref=True)
        if snapshot is not None:
            return search.found("cached", snapshot)
        search.tried.append(
            f"cached: {settings.runpod_cache_dir / ('models--' + repo_id.replace('/', '--'))} "
            f"(no snapshot for {settings.model_revision or 'main'})"
        )
    return None


def _volume(search: _Search) -> ModelLocation | None:
    from . import volume

    settings = search.settings
    folder = volume.model_folder(settings)
    if not folder.exists() and volume.fill_allowed(settings):
        volume.fill(settings, search.download)
    return _with_manifest(search, "volume", folder)


def _local_cache(search: _Search) -> ModelLocation | None:
    settings = search.settings
    snapshot = hf_snapshot(settings.hf_hub_cache, settings.model_name, settings.model_revision, newest_if_no_ref=False)
    if snapshot is None:
        search.tried.append(
            f"local-cache: {settings.hf_hub_cache / ('models--' + settings.model_name.replace('/', '--'))} "
            f"(no snapshot for {settings.model_revision or 'main'})"
        )
        return None
    try:
        return search.found("local-cache", snapshot)
    except UnsupportedWeights as incomplete:
        if not settings.hub_allowed:
            raise
        # A download cut short leaves a snapshot with some files; the Hub download after the lookups completes
        # it (huggingface_hub skips what is there), so an incomplete one is passed over, not an error.
        search.tried.append(f"local-cache: {snapshot} ({str(incomplete).split(': ', 2)[-1]})")
        return None


_LOOKUPS: dict[str, Callable[[_Search], ModelLocation | None]] = {
    "baked": _baked,
    "cached": _cached,
    "volume": _volume,
    "local-cache": _local_cache,
}
_ORDER = {
    "auto": ("baked", "cached", "volume", "local-cache"),
    "baked": ("baked",),
    "cached": ("cached",),
    "volume": ("volume",),
    "hub": ("local-cache",),  # a model downloaded earlier sits in the local cache
}

Downloader = Callable[[Settings], Path]


def _download_from_hub(settings: Settings) -> Path:
    from .download import download_from_hub  # imported here: download.py imports this module

    return download_from_hub(settings)


def resolve(settings: Settings, download: Downloader | None = None) -> ModelLocation:
    """Find the model's folder, downloading it from the Hub only where MODEL_SOURCE allows it."""
    search = _Search(settings, download)
    if settings.model_is_folder:
        location = search.found("folder", Path(settings.model_name))
        if location is not None:
            return location
        raise ModelNotFound(f"MODEL_NAME={settings.model_name} is not a folder; tried {search.tried[0]}")

    for source in _ORDER[settings.model_source]:
        location = _LOOKUPS[source](search)
        if location is not None:
            return location

    if settings.hub_allowed:
        path = search.download(settings)
        return ModelLocation(path, "hub", settings.model_name, settings.model_revision)

    raise ModelNotFound(_not_found_message(settings, search.tried))


def _not_found_message(settings: Settings, tried: list[str]) -> str:
    if settings.model_source in ("auto", "hub"):
        fix = (
            "HF_HUB_OFFLINE is set, so the Hub was not asked: unset it to download, or"
            if settings.hf_hub_offline
            else "or"
        )
        fix = f"{fix} bake the model into the image, or select it as the endpoint's cached model"
    elif settings.model_source == "volume":
        folder = settings.volume_model_dir / settings.model_name
        fix = f"fill the volume with `python builder/fetch_model.py {settings.model_name} --out {folder}`"
        if settings.hf_hub_offline:
            fix += ", or unset HF_HUB_OFFLINE and the worker fills a missing folder from the Hub itself"
    else:
        fix = "put the model there, or set MODEL_SOURCE=auto to look everywhere"
    return (
        f"model {settings.model_name}@{settings.model_revision or 'main'} not found "
        f"(MODEL_SOURCE={settings.model_source}); tried: " + "; ".join(tried) + f". Fix: {fix}"
    )
