"""What the endpoint advisor needs to know about a model, from wherever its files are. Light: no torch.

A folder is read as it is. A Hub id is looked up first in the local Hugging Face cache and in RunPod's
cached-model folder (the same lookup the worker uses), then, only when those lack it and the Hub answers, in
the Hub's metadata: config.json and the safetensors headers, never the weights. Whether the model is private
or gated can only come from the Hub (or from --private).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from worker_transformers.advisor.footprint import FootprintError, ModelShape, shape_from_config, shape_from_folder
from worker_transformers.config import Settings
from worker_transformers.model import hf_cache
from worker_transformers.model.errors import UnsupportedWeights
from worker_transformers.model.weights import weight_paths

HUB_TIMEOUT_S = 10


class ModelFactsError(ValueError):
    """The model's files cannot be found or read. The message says where it looked and what to do."""


@dataclass(frozen=True)
class ModelFacts:
    shape: ModelShape
    found: str  # where the files were read, for the report
    on_hub: bool
    private: bool | None  # None: not known (a folder, or the Hub could not be asked)


def find(model: str, revision: str | None, settings: Settings, private: bool) -> ModelFacts:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return ModelFacts(_read(folder), f"folder {folder}", on_hub=False, private=None)
    if model.startswith(("/", ".", "~")):
        raise ModelFactsError(f"--model {model}: no such folder; give an existing model folder or a Hub id")

    snapshot = _local_snapshot(model, revision, settings)
    if snapshot is None:
        shape, hub_private = _from_hub(model, revision, settings)
        return ModelFacts(shape, "the Hub's metadata", on_hub=True, private=private or hub_private)
    hub_private = True if private else _hub_says_private(model, revision, settings)
    return ModelFacts(_read(snapshot), f"cache {snapshot}", on_hub=True, private=hub_private)


def _read(folder: Path) -> ModelShape:
    try:
        return shape_from_folder(folder)
    except FootprintError as error:
        raise ModelFactsError(f"--model: {error}") from None


def _local_snapshot(model: str, revision: str | None, settings: Settings) -> Path | None:
    """A complete snapshot in the local cache or RunPod's (exact case, then lowercase, as the worker looks)."""
    caches = ((settings.hf_hub_cache, False), (settings.runpod_cache_dir, True))
    for cache, newest_if_no_ref in caches:
        for repo_id in dict.fromkeys([model, model.lower()]):
            snapshot = hf_cache.snapshot(cache, repo_id, revision, newest_if_no_ref)
            try:
                files = weight_paths(snapshot, repo_id) if snapshot is not None else []
            except UnsupportedWeights:  # a damaged index: read the model elsewhere, or report it from the folder
                files = []
            if files and all(f.is_file() for f in files):
                return snapshot
    return None


def _from_hub(model: str, revision: str | None, settings: Settings) -> tuple[ModelShape, bool]:
    """The shape from the Hub's config.json and safetensors headers, and whether the repo is private or gated."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download, model_info

    if settings.hf_hub_offline:
        answer = "HF_HUB_OFFLINE is set"
    else:
        token = settings.hf_token or None
        try:
            # model_info first: it fails at once without a network, where a download would retry for seconds.
            info = model_info(model, revision=revision, timeout=HUB_TIMEOUT_S, token=token)
            config = hf_hub_download(
                model, "config.json", revision=revision, cache_dir=settings.hf_hub_cache, token=token
            )
            weights = get_safetensors_metadata(model, revision=revision, token=token, timeout=HUB_TIMEOUT_S)
            shape = shape_from_config(json.loads(Path(config).read_text()), weights.parameter_count, config)
            return shape, bool(info.private or info.gated)
        except FootprintError as error:
            raise ModelFactsError(f"--model {model}: {error}") from None
        # Network stacks and the Hub raise many types (no route, 401, 404, no safetensors); any of them means
        # the Hub gave no answer, and the message carries which.
        except Exception as error:  # noqa: BLE001
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
            answer = f"the Hub did not answer ({type(error).__name__}: {first_line.rstrip('.')})"
    raise ModelFactsError(
        f"--model {model}@{revision or 'main'}: not in the local Hugging Face cache ({settings.hf_hub_cache}) or "
        f"RunPod's ({settings.runpod_cache_dir}), and {answer}. Run where the Hub is reachable (with HF_TOKEN "
        "for a private model), or pass the model's folder"
    )


def _hub_says_private(model: str, revision: str | None, settings: Settings) -> bool | None:
    if settings.hf_hub_offline:
        return None
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = model_info(model, revision=revision, timeout=HUB_TIMEOUT_S, token=settings.hf_token or None)
    except RepositoryNotFoundError:
        return True  # the files exist, yet the Hub does not show the repo without credentials: private (or gone)
    except Exception:  # noqa: BLE001 - unknown is an answer here: the advice says it assumed public
        return None
    return bool(info.private or info.gated)
