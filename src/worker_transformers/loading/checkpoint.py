"""The loaded model is exactly the checkpoint: what config.json builds, held against the weight files before
anything is allocated, and against from_pretrained's own report after it loads.

A parameter the files lack is filled with random values by `from_pretrained` ("newly initialized"), and the
worker would serve a model that is not the one on disk; a config that declares more than the files hold (more
layers, a wider model) is allocated before anything notices. So the model is first built on the meta device
(shapes, no memory) and its parameters compared with the files' tensors by name, shape and count. Tied
weights stored once and buffers the architecture computes (rotary frequencies) are not expected in the files.
A checkpoint's names are first renamed as `from_pretrained` renames them (`rename`: transformers' own rules, for
the legacy names many vision-language checkpoints keep), so that it is judged under the model's names and named
under its own. Checkpoints whose tensors `from_pretrained` fuses, splits or transposes, or whose names nothing
maps, can only be judged by its loading report, which `check_report` reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    apply_renamings,
    dot_natural_key,
    rename_source_key,
)
from transformers.initialization import no_init_weights

from worker_transformers.loading import architecture
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
    built = architecture.model_class(config, folder)
    if getattr(config, "quantization_config", None) is not None or built is None:
        return 0
    _check_layers(config, files, folder, model_id)
    with no_init_weights(), torch.device("meta"):
        model = built._from_config(config, dtype=dtype)
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
    renaming = rename(model, stored)
    if renaming.converted or len(set(renaming.model_names.values())) < len(stored):
        return  # tensors from_pretrained fuses or splits (or two files' tensors for one): its report decides
    known = {name: renamed for name, renamed in renaming.model_names.items() if renamed in state}
    if not known:
        return  # no name in common: a naming nobody maps; the sizes and from_pretrained's report judge it
    tied = model.all_tied_weights_keys  # {target: source}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False) if name not in tied}
    report = SimpleNamespace(
        missing_keys=parameters - set(known.values()),
        unexpected_keys={renamed for renamed in renaming.model_names.values() if renamed not in state},
    )
    model._adjust_missing_and_unexpected_keys(report)  # the names from_pretrained does not report: its own rules
    unexpected = sorted(name for name, renamed in renaming.model_names.items() if renamed in report.unexpected_keys)
    missing = sorted(renaming.file_name(name) for name in report.missing_keys)
    wrong = sorted(
        (name, stored[name].shape, tuple(state[renamed].shape))
        for name, renamed in known.items()
        if stored[name].shape != tuple(state[renamed].shape)
    )
    _refuse(unexpected, missing, wrong, folder, model_id)


@dataclass
class Renaming:
    """The model's name for each of a checkpoint's tensors, as from_pretrained names them."""

    model_names: dict[str, str]  # the file's name -> the model's (the same name, for most checkpoints)
    converted: list[str]  # file names from_pretrained does more than rename: fuses, splits, transposes
    prefixed: list[str]  # file names renamed only by adding or dropping the base model's prefix
    undo: list[WeightRenaming]  # the renamings used, reversed: the model's name -> the file's

    def file_name(self, model_name: str) -> str:
        """What the checkpoint calls, or would call, the model's `model_name`."""
        return apply_renamings(model_name, self.undo)


def rename(model: PreTrainedModel, names: Iterable[str]) -> Renaming:
    """`names` renamed by transformers' own rules, as `from_pretrained` renames them
    (core_model_loading.convert_and_load_state_dict_in_model): the model's classes' WeightRenaming and
    WeightConverter entries in conversion_mapping.py and the legacy ones, then the base model's prefix added or
    dropped where that gives one of the model's names. A name a WeightConverter takes is only listed: its tensor
    is not the model's as it is."""
    state = model.state_dict()
    transforms = get_model_conversion_mapping(model)  # fresh objects: they record which of them were used
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    model_names, converted, prefixed = {}, [], []
    # In from_pretrained's order: some renamings act only once an earlier name has matched (GroupWeightRename).
    for name in sorted(names, key=dot_natural_key):
        renamed, converter = rename_source_key(name, renamings, converters)
        if renamed not in state and name in state:  # a renaming meant for other checkpoints' names
            renamed, converter = name, None
        final, _ = rename_source_key(renamed, [], [], model.base_model_prefix, state)
        model_names[name] = final
        if converter is not None:
            converted.append(name)
        if final != renamed:
            prefixed.append(name)
    undo = [t.reverse_transform() for t in reversed(renamings) if t.was_used()]
    return Renaming(model_names, converted, prefixed, undo)


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
