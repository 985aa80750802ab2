"""Download a model from the Hugging Face Hub into the local cache: the last resort of `sources.resolve`.

Only what a causal LM needs is fetched: safetensors weights, configs and tokenizer files. Pickle weights are
never downloaded. The token comes from Settings and never appears in a message.

A download at startup races RUNPOD_INIT_TIMEOUT. Its size is known before the first byte (a dry run lists
the files), its rate is measured as bytes arrive, and as soon as the finish plus the time loading needs
would pass the deadline, it stops with the numbers and the fixes instead of being killed by the platform.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from worker_transformers.config import Settings
from worker_transformers.model.errors import ModelNotFound, mount_point, storage_problem
from worker_transformers.model.folder import check_model_folder
from worker_transformers.model.manifest import MODEL_FILE_PATTERNS
from worker_transformers.startup.budget import InitBudget, InitTooSlow, TransferWatch, human_bytes

log = logging.getLogger(__name__)

# What fetches a model's files into settings.hf_hub_cache and returns the snapshot folder: download_from_hub,
# or a stand-in that a caller passes to resolve or volume.fill.
Downloader = Callable[[Settings], Path]

POLL_S = 0.5
PROGRESS_LOG_S = 10.0


def download_from_hub(settings: Settings, budget: InitBudget | None = None) -> Path:
    """The model's snapshot folder in the local cache, downloaded within `budget` (a fresh one of
    RUNPOD_INIT_TIMEOUT when none is given)."""
    from huggingface_hub import snapshot_download

    model = f"{settings.model_name}@{settings.model_revision or 'main'}"
    options = dict(
        repo_id=settings.model_name,
        cache_dir=settings.hf_hub_cache,
        allow_patterns=list(MODEL_FILE_PATTERNS),
        token=settings.hf_token or False,
        endpoint=settings.hf_endpoint,
    )
    budget = budget or InitBudget(settings.init_timeout_s)
    try:
        plan = snapshot_download(revision=settings.model_revision, dry_run=True, **options)
    except Exception as error:
        raise _hub_error(error, model) from None
    if not plan:
        raise ModelNotFound(f"{model} has no safetensors weights or configs on the Hub; check MODEL_NAME")
    total = sum(f.file_size or 0 for f in plan if f.will_download)
    _check_space(settings.hf_hub_cache, total, model)
    watch = TransferWatch(budget, model, "download from the Hub", total)
    watch.check()  # what loading needs after the download may already exceed what is left
    log.info("downloading %s from the Hub into %s: %s", model, settings.hf_hub_cache, human_bytes(total))

    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["path"] = snapshot_download(
                revision=plan[0].commit_hash, tqdm_class=_progress_class(watch), **options
            )
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="hub-download", daemon=True)
    thread.start()
    # Wait here rather than in the download, so that a stalled transfer (no bytes, no progress calls)
    # is judged too; a stopped download's threads end at their next chunk.
    next_log = budget.elapsed() + PROGRESS_LOG_S
    while thread.is_alive():
        thread.join(POLL_S)
        if not thread.is_alive():
            break
        watch.check()
        if budget.elapsed() >= next_log:
            next_log += PROGRESS_LOG_S
            log.info(
                "downloaded %s of %s at %s/s",
                human_bytes(watch.done_bytes),
                human_bytes(total),
                human_bytes(watch.rate()),
            )
    if "error" in outcome:
        raise _hub_error(outcome["error"], model) from None
    path = Path(outcome["path"])
    check_model_folder(path, settings.model_name)
    return path


def _check_space(cache: Path, total: int, model: str) -> None:
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if total > free:
        raise ModelNotFound(
            f"no space left on {mount_point(existing)}: {model} needs {human_bytes(total)}, {human_bytes(free)} "
            "free; free space there or use a larger disk"
        )


def _hub_error(error: BaseException, model: str) -> Exception:
    """The message for a failed Hub call. Never the error's own text: on some versions it carries headers."""
    import httpx
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, (InitTooSlow, ModelNotFound)):
        return error
    if isinstance(error, GatedRepoError):
        return ModelNotFound(f"{model} is gated: accept its terms on the Hub and set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFound(
            f"{model} does not exist on the Hub or is private: check MODEL_NAME, or set HF_TOKEN for a private model"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFound(f"{model}: no such revision on the Hub; check MODEL_REVISION")
    chain = _causes(error)
    refused = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    status = refused.response.status_code if refused is not None else None
    if status in (401, 403):
        return ModelNotFound(
            f"{model}: the Hub refused the request (HTTP {status}): HF_TOKEN is missing, invalid or lacks access "
            "to this model; set a token that can read it"
        )
    if isinstance(error, OSError) and (problem := storage_problem(error, "HF_HUB_CACHE")):
        return ModelNotFound(f"{model} could not be saved: {problem}")
    unreachable = next((e for e in chain if isinstance(e, httpx.TransportError)), None)
    if unreachable is not None or isinstance(error, (HfHubHTTPError, OSError)):
        what = f"HTTP {status}" if status else type(unreachable or error).__name__
        return ModelNotFound(
            f"{model} could not be downloaded from the Hub ({what}); check the network, "
            "or bake the model into the image, or select it as the endpoint's cached model"
        )
    return error


def _causes(error: BaseException) -> list[BaseException]:
    """The error and those it was raised from: huggingface_hub wraps an HTTP or connection error in its own."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    return chain


def _progress_class(watch: TransferWatch) -> type:
    """A silent progress bar for snapshot_download that feeds `watch` and stops the download once
    `watch` has given up on it (its update is called for every chunk, from the download threads)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class WatchedProgress(hf_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            # Of the bars snapshot_download makes, this one counts the bytes written to the cache.
            self._counts_bytes = kwargs.get("name") == "huggingface_hub.snapshot_download"
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if watch.stopped.is_set():
                raise InitTooSlow("download stopped: it cannot finish within RUNPOD_INIT_TIMEOUT")
            if self._counts_bytes and n:
                watch.add(int(n))
            return super().update(n)

    return WatchedProgress
