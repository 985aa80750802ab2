"""Models on a network volume: VOLUME_MODEL_DIR/ORG/NAME, loaded only when complete, filled from the Hub once.

A volume folder is complete when its manifest.json (see manifest.py) names the model and every file has the
size the manifest records. The manifest is written last, so a fill that was interrupted never looks complete.

With MODEL_SOURCE=volume and the Hub allowed, a missing model is downloaded into the volume. Workers that start
together must not write the same folder (RunPod warns that concurrent writes can corrupt a network volume), so:
a file lock on the volume lets one worker fill while the others wait, and then find the folder complete; the
filling worker writes into a staging folder of its own and renames it into place when the manifest is in it.
The rename also protects a filesystem whose locks do not reach across machines: it fails when another worker's
folder is already there, and that folder is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
from pathlib import Path

from filelock import FileLock, Timeout

from worker_transformers.config import Settings
from worker_transformers.model.download import Downloader
from worker_transformers.model.errors import ModelNotFound, storage_problem
from worker_transformers.model.manifest import is_sha256, model_files, sha256, why_incomplete, write_manifest

log = logging.getLogger(__name__)

LOCKS = ".locks"  # VOLUME_MODEL_DIR/.locks/ORG--NAME.lock
STAGING = ".partial"  # VOLUME_MODEL_DIR/.partial/ORG--NAME.HOST.PID/ while a worker fills


class VolumeFillError(ModelNotFound):
    """The volume could not be filled; the message says why and what to do."""


def model_folder(settings: Settings) -> Path:
    return settings.volume_model_dir / settings.model_name


def fill_allowed(settings: Settings) -> bool:
    """Only a worker told to use the volume writes to it, and only when it may reach the Hub."""
    return settings.model_source == "volume" and not settings.hf_hub_offline


def fill(settings: Settings, download: Downloader) -> Path:
    """Download the model into its volume folder, once across all workers; return the folder."""
    try:
        return _fill_once(settings, download)
    except OSError as error:
        problem = storage_problem(error, "VOLUME_MODEL_DIR")
        if problem is None:
            raise
        raise VolumeFillError(f"filling the network volume folder {model_folder(settings)}: {problem}") from None


def _fill_once(settings: Settings, download: Downloader) -> Path:
    folder = model_folder(settings)
    key = settings.model_name.replace("/", "--")
    (settings.volume_model_dir / LOCKS).mkdir(parents=True, exist_ok=True)
    lock = FileLock(settings.volume_model_dir / LOCKS / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another worker is filling %s; waiting for it (at most %d s)", folder, settings.init_timeout_s)
        try:
            lock.acquire(timeout=settings.init_timeout_s)
        except Timeout:
            raise VolumeFillError(
                f"another worker has been filling {folder} for {settings.init_timeout_s} s (RUNPOD_INIT_TIMEOUT); "
                f"if none is, remove {lock.lock_file} and restart"
            ) from None
    try:
        if folder.exists():  # filled by the worker this one waited for
            return folder
        # A staging folder left here by a worker that died while holding this lock is garbage now.
        for leftover in (settings.volume_model_dir / STAGING).glob(f"{key}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        staging = settings.volume_model_dir / STAGING / f"{key}.{socket.gethostname()}.{os.getpid()}"
        try:
            _fill_staging(staging, settings, download)
            return _move_into_place(staging / "model", folder, settings)
        except ModelNotFound as error:
            raise VolumeFillError(f"filling the network volume folder {folder}: {error}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()


def _fill_staging(staging: Path, settings: Settings, download: Downloader) -> None:
    log.info("filling the network volume: downloading %s into %s", settings.model_name, staging)
    staging = staging.resolve()
    snapshot = download(dataclasses.replace(settings, hf_hub_cache=staging / "hub-cache"))
    model = staging / "model"
    moved: dict[Path, Path] = {}  # a cache blob can back two files: move it once, copy it after
    entries = []
    for relative in model_files(snapshot):
        source, target = (snapshot / relative).resolve(), model / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source in moved:
            shutil.copyfile(moved[source], target)
        elif source.is_relative_to(staging):  # the download's own blob: a rename on the volume, no copy
            os.replace(source, target)
            moved[source] = target
        else:
            shutil.copyfile(source, target)
        # The Hub names a weights blob by its sha256; anything else is hashed here.
        digest = source.name if is_sha256(source.name) else sha256(target)
        entries.append({"path": relative, "size": target.stat().st_size, "sha256": digest})
    if not entries:
        raise VolumeFillError(f"the download of {settings.model_name} held no model files")
    write_manifest(model, settings.model_name, settings.model_revision, entries)


def _move_into_place(model: Path, folder: Path, settings: Settings) -> Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.rename(folder)
    except OSError:
        # Another worker's folder got there first (its lock did not reach this machine): use it if complete.
        if why_incomplete(folder, settings.model_name, settings.model_revision) is not None:
            raise
        log.info("%s was filled by another worker meanwhile; using it", folder)
        return folder
    log.info("filled %s", folder)
    return folder
