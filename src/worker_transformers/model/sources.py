"""Where are the weights? A pure answer (no torch): a folder on local disk, and how it was found.

MODEL_SOURCE=auto looks, in order, at the baked folder, RunPod's cached models, the network volume and the
local Hugging Face cache, then downloads from the Hub where that is allowed. A forced source looks only
there. Every place looked at is recorded, so that "not found" can say what was tried and what would fix it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker_transformers.config import Settings
from worker_transformers.model import hf_cache, volume
from worker_transformers.model.download import Downloader, download_from_hub
from worker_transformers.model.errors import ModelNotFound, UnsupportedWeights
from worker_transformers.model.folder import check_model_folder
from worker_transformers.model.manifest import MANIFEST, MalformedManifest, hash_mismatch, why_incomplete

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelLocation:
    path: Path  # a folder with config.json, tokenizer files and safetensors weights
    source: str  # folder | baked | cached | volume | local-cache | hub
    model_id: str  # the name the worker serves the model under (MODEL_NAME, in its original case)
    revision: str | None


class _Search:
    """One resolution: the places looked at, in order, for the final error message."""

    def __init__(self, settings: Settings, download: Downloader | None) -> None:
        self.settings = settings
        self.download = download or download_from_hub
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
    try:
        why_not = why_incomplete(folder, settings.model_name, settings.model_revision)
    except MalformedManifest as error:
        raise UnsupportedWeights(
            f"{settings.model_name}: {error}; the copy is damaged: rebuild the image (baked) or delete the folder "
            "so it is filled again (volume)"
        ) from None
    if why_not is not None:
        search.tried.append(f"{source}: {folder} ({why_not})")
        return None
    if settings.verify_weights and (mismatch := hash_mismatch(folder)):
        raise UnsupportedWeights(
            f"{settings.model_name}: {folder / mismatch} does not match the sha256 in {folder / MANIFEST}; the copy "
            "is damaged: rebuild the image (baked) or delete the folder so it is filled again (volume)"
        )
    return search.found(source, folder)


def _cached(search: _Search) -> ModelLocation | None:
    settings = search.settings
    spellings = dict.fromkeys([settings.model_name, settings.model_name.lower()])  # exact case first
    for repo_id in spellings:
        snapshot = hf_cache.snapshot(settings.runpod_cache_dir, repo_id, settings.model_revision, newest_if_no_ref=True)
        if snapshot is not None:
            return search.found("cached", snapshot)
        search.tried.append(
            f"cached: {hf_cache.repo_folder(settings.runpod_cache_dir, repo_id)} "
            f"(no snapshot for {settings.model_revision or 'main'})"
        )
    return None


def _volume(search: _Search) -> ModelLocation | None:
    settings = search.settings
    folder = volume.model_folder(settings)
    if not folder.exists() and volume.fill_allowed(settings):
        volume.fill(settings, search.download)
    return _with_manifest(search, "volume", folder)


def _local_cache(search: _Search) -> ModelLocation | None:
    settings = search.settings
    snapshot = hf_cache.snapshot(
        settings.hf_hub_cache, settings.model_name, settings.model_revision, newest_if_no_ref=False
    )
    if snapshot is None:
        search.tried.append(
            f"local-cache: {hf_cache.repo_folder(settings.hf_hub_cache, settings.model_name)} "
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
