"""The loaded model is exactly the checkpoint: what config.json builds, held against the weight files before
anything is allocated, and against from_pretrained's own report after it loads.

A parameter the files lack is filled with random values by `from_pretrained` ("newly initialized"), and the
worker would serve a model that is not the one on disk; a config that declares more than the files hold (more
layers, a wider model) is allocated before anything notices. So the model is first built on the meta device
(shapes, no memory) and its parameters compared with the files' tensors by name, shape and count. Tied
weights stored once and buffers the architecture computes (rotary frequencies) are not expected in the files.
Checkpoints whose tensor names `from_pretrained` maps to the model's (legacy names, fused projections) can
only be judged by its loading report, which `check_report` reads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from worker_transformers.model.errors import CorruptWeights
from worker_transformers.model.weights import WeightFile, total_bytes
from worker_transformers.startup.budget import human_bytes

# A numbered block in a tensor name: model.layers.12., transformer.h.3., blocks.0.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
NAMES_SHOWN = 3


def expected_parameters(config, files: list[WeightFile], folder: Path, model_id: str, dtype: torch.dtype) -> int:
    """The number of parameters config.json builds, after checking them against the files; raises
    CorruptWeights when they differ. 0 when the config's model cannot be built here (custom code, quantized):
    then only from_pretrained's report can tell."""
    if getattr(config, "quantization_config", None) is not None or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return 0
    _check_layers(config, files, folder, model_id)
    with no_init_weights(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _check_names(model, files, folder, model_id)
    tied = model.all_tied_weights_keys  # {target: source}
    count = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False) if name not in tied)
    held = sum(math.prod(t.shape) for f in files for t in f.tensors)
    if count > held:
        raise _mismatch(
            model_id,
            folder,
            f"config.json describes {count:,} parameters ({human_bytes(count * dtype.itemsize)} as {dtype}) and "
            f"the weight files hold {held:,} ({human_bytes(total_bytes(files))})",
        )
    return count


def check_report(model: PreTrainedModel, report: dict, folder: Path, model_id: str) -> None:
    """Refuse what `from_pretrained(..., output_loading_info=True)` reports it could not take from the files."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(k for k in report["missing_keys"] if k in parameters)  # buffers the architecture computes
    wrong = sorted((name, tuple(stored), tuple(built)) for name, stored, built in report["mismatched_keys"])
    _refuse(sorted(report["unexpected_keys"]), missing, wrong, folder, model_id)


def _check_layers(config, files: list[WeightFile], folder: Path, model_id: str) -> None:
    """A config that declares more layers than the files hold, found from the names alone: building 100,000
    layers even on the meta device would take a minute."""
    declared = getattr(config.get_text_config(), "num_hidden_layers", None)
    indexes = {int(m.group(1)) for f in files for t in f.tensors if (m := _LAYER_INDEX.search(t.name))}
    if isinstance(declared, int) and indexes and declared > max(indexes) + 1:
        raise _mismatch(
            model_id,
            folder,
            f"config.json declares num_hidden_layers={declared} and the weights hold {max(indexes) + 1}",
        )


def _check_names(model: PreTrainedModel, files: list[WeightFile], folder: Path, model_id: str) -> None:
    state = model.state_dict()
    stored = {t.name: t for f in files for t in f.tensors}
    unexpected = sorted(stored.keys() - state.keys())
    if unexpected:
        return  # names from_pretrained may map to the model's: its report decides
    tied = model.all_tied_weights_keys  # {target: source}
    ignored = [re.compile(pattern) for pattern in model._keys_to_ignore_on_load_missing or ()]
    missing = sorted(
        name
        for name, _ in model.named_parameters(remove_duplicate=False)
        if name not in stored and name not in tied and not any(p.search(name) for p in ignored)
    )
    wrong = sorted(
        (name, entry.shape, tuple(state[name].shape))
        for name, entry in stored.items()
        if entry.shape != tuple(state[name].shape)
    )
    _refuse([], missing, wrong, folder, model_id)


def _refuse(unexpected: list[str], missing: list[str], wrong: list[tuple], folder: Path, model_id: str) -> None:
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's tensors missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have ({_names(unexpected)})")
    if wrong:
        shown = ", ".join(f"{n}: {list(s)} in the files, {list(b)} in the model" for n, s, b in wrong[:NAMES_SHOWN])
        problems.append(f"{len(wrong)} of the wrong shape ({shown}{', ...' if len(wrong) > NAMES_SHOWN else ''})")
    if problems:
        raise _mismatch(model_id, folder, "the weight files have " + "; ".join(problems))


def _names(names: list[str]) -> str:
    return ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")


def _mismatch(model_id: str, folder: Path, what: str) -> CorruptWeights:
    return CorruptWeights(
        f"{model_id}: {folder} does not match its config.json: {what}; the copy is incomplete or its config.json "
        "was changed: fetch the model again (rebuild the image if it is baked)"
    )
