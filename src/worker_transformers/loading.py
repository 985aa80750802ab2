"""Tokenizer and model from a local folder onto the device.

Everything is read from the folder `sources.resolve` found (`local_files_only`): once the weights are
local, loading never touches the network. Custom model code runs only when TRUST_REMOTE_CODE is set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .config import Settings
from .sources import ModelLocation

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LoadError(Exception):
    """The model cannot be loaded as configured. The message says which setting to change."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise LoadError("DEVICE=cuda but no CUDA device is visible; set DEVICE=auto or run on a GPU worker")
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def _check_remote_code(location: ModelLocation, settings: Settings) -> None:
    config = json.loads((location.path / "config.json").read_text())
    if config.get("model_type") not in CONFIG_MAPPING and "auto_map" in config and not settings.trust_remote_code:
        raise LoadError(
            f"{location.model_id} needs the Python code shipped with it (model_type "
            f"{config.get('model_type')!r} is not in transformers); set TRUST_REMOTE_CODE=true if you trust it"
        )


def load(location: ModelLocation, settings: Settings) -> LoadedModel:
    _check_remote_code(location, settings)
    device = pick_device(settings)
    dtype = _DTYPES.get(settings.dtype, "auto")  # "auto": the checkpoint's own dtype
    tokenizer = AutoTokenizer.from_pretrained(
        location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        location.path,
        local_files_only=True,
        trust_remote_code=settings.trust_remote_code,
        dtype=dtype,
        device_map=device,
    )
    model.eval()
    log.info(
        "loaded %s from %s (%s) on %s as %s, %.0f M parameters",
        location.model_id,
        location.path,
        location.source,
        device,
        model.dtype,
        model.num_parameters() / 1e6,
    )
    return LoadedModel(model, tokenizer, device)
