"""The fast path: an empty model of the right shape, then the checkpoint's bytes moved straight into it.

`from_pretrained` is general: it renames and fuses keys, quantizes, offloads, and walks every tensor through
that machinery. Most checkpoints need none of it: their tensors are the model's own, under its names or under
names transformers only renames (the legacy names of many vision-language checkpoints, checkpoint.rename). For
those, this module
- builds the model with weight initialisation skipped (the weights are overwritten anyway) and the
  non-persistent buffers (rotary frequencies) computed as usual, directly on the target device;
- on the CPU, points each parameter at the memory-mapped file (no copy: the page cache is the weights);
- on CUDA, streams the files in large chunks through pinned host buffers, copied to the GPU with
  `non_blocking=True` on a side stream while the next chunks are read (streaming.py).
Anything else (quantized, custom code, tensors from_pretrained fuses, splits or transposes, names it does not
map, float32-pinned modules, tied weights stored twice) raises NotEligible, and the caller uses `from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from worker_transformers.loading import architecture, checkpoint
from worker_transformers.loading.streaming import TORCH_DTYPES, CudaTransfers, Transfers, stream_weights
from worker_transformers.model.weights import FLOAT_DTYPES, WeightFile


class NotEligible(Exception):
    """The fast path cannot load this checkpoint as it is; the message says why."""


def checkpoint_dtype(config, files: list[WeightFile]) -> torch.dtype:
    """The dtype DTYPE=auto means: the config's, else the first floating tensor's (as from_pretrained does)."""
    if isinstance(config.dtype, torch.dtype):
        return config.dtype
    for tensor in (t for f in files for t in f.tensors):
        if tensor.dtype in FLOAT_DTYPES:
            return TORCH_DTYPES[tensor.dtype]
    return torch.float32


@dataclass
class EmptyModel:
    """A model of the checkpoint's shape on its device, its weights not yet in place."""

    model: PreTrainedModel
    path: Path
    device: torch.device
    targets: dict[str, torch.Tensor]  # each checkpoint tensor's destination
    names: dict[str, str]  # each checkpoint tensor's name in the model
    tied_missing: set[str]  # tied names the checkpoint leaves out


def build_empty(path: Path, files: list[WeightFile], device: torch.device, dtype: torch.dtype | None) -> EmptyModel:
    """The model from `path` built empty on `device`, or NotEligible. `dtype` None keeps the checkpoint's.
    Its cost is Python building the module tree, whatever the size of the weights."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = _eligible_class(config, path)
    dtype = dtype or checkpoint_dtype(config, files)
    with no_init_weights(), torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    try:
        targets, tied_missing, names = _targets(model, files)
    except NotEligible:
        model = None  # the traceback holds this frame, and so the model, for as long as the caller keeps it
        if device.type == "cuda":
            torch.cuda.empty_cache()  # from_pretrained needs that memory next
        raise
    return EmptyModel(model, path, device, targets, names, tied_missing)


def fill(empty: EmptyModel, files: list[WeightFile], transfers: Transfers | None = None) -> PreTrainedModel:
    """Put the checkpoint's bytes into `empty`: memory-mapped on the CPU, streamed with CudaTransfers on
    CUDA, unless `transfers` says how."""
    model = empty.model
    if transfers is None and empty.device.type == "cpu":
        _map_from_files(model, files, empty.targets, empty.names)
    else:
        stream_weights(files, empty.targets, transfers or CudaTransfers(empty.device))
    model.tie_weights(missing_keys=empty.tied_missing, recompute_mapping=False)
    if (empty.path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(empty.path, local_files_only=True)
    # The parameters keep requires_grad, as from_pretrained leaves them (every forward runs under inference_mode
    # or no_grad, so no graph is recorded): torch's matmul folds a (rows, 1, hidden) slice, as the lm_head gets
    # at a prefill's last positions, into one matrix product only for a weight that requires grad, and for a
    # frozen one copies the weight once per row instead (a 16-prompt prefill of the default model spent two
    # thirds of its time copying the lm_head's 28 M weights 8 times over).
    return model.eval()


def _eligible_class(config, path: Path) -> type[PreTrainedModel]:
    if getattr(config, "quantization_config", None) is not None:
        raise NotEligible("the checkpoint is quantized")
    if getattr(config, "auto_map", None):
        raise NotEligible("the model ships its own code")
    model_class = architecture.model_class(config, path)
    if model_class is None:
        raise NotEligible(f"{type(config).__name__} has no class in transformers to generate with")
    if model_class._keep_in_fp32_modules or getattr(model_class, "_keep_in_fp32_modules_strict", None):
        raise NotEligible(f"{model_class.__name__} keeps some modules in float32")
    return model_class


def _targets(
    model: PreTrainedModel, files: list[WeightFile]
) -> tuple[dict[str, torch.Tensor], set[str], dict[str, str]]:
    """Each checkpoint tensor's destination in the model, the tied names the checkpoint leaves out, and each
    checkpoint tensor's name in the model."""
    state = model.state_dict()
    tied = model.all_tied_weights_keys  # {target: source}
    stored = {t.name: t for f in files for t in f.tensors}
    renaming = checkpoint.rename(model, stored)
    if renaming.converted:
        example = renaming.converted[0]
        raise NotEligible(f"from_pretrained converts some tensors, not only renames them (e.g. {example!r})")
    if renaming.prefixed:  # a base model's checkpoint: left to from_pretrained, as ever
        raise NotEligible(
            f"checkpoint names differ from the model's by the prefix {model.base_model_prefix!r} "
            f"(e.g. {renaming.prefixed[0]!r})"
        )
    names = renaming.model_names
    unknown = sorted(name for name, renamed in names.items() if renamed not in state)
    if unknown:
        raise NotEligible(f"checkpoint names differ from the model's (e.g. {unknown[0]!r})")
    if len(set(names.values())) < len(names):
        raise NotEligible("two of the checkpoint's tensors have the same name in the model")
    missing = state.keys() - names.values()
    if missing - tied.keys():
        raise NotEligible(f"the checkpoint lacks {len(missing - tied.keys())} of the model's tensors")
    if any(tied[name] not in names.values() for name in missing) or tied.keys() & names.values():
        raise NotEligible("tied weights are stored in an unusual way")
    for name, entry in stored.items():
        if tuple(state[names[name]].shape) != entry.shape:
            raise NotEligible(
                f"{name} has shape {entry.shape} in the checkpoint, {tuple(state[names[name]].shape)} in the model"
            )
    return {name: state[names[name]] for name in stored}, missing, names


def _map_from_files(
    model: PreTrainedModel, files: list[WeightFile], targets: dict[str, torch.Tensor], names: dict[str, str]
) -> None:
    """CPU: parameters backed by the memory-mapped files (copy-on-write, so the files never change).
    Registered on their modules directly: `load_state_dict` walks every module and runs its hooks, which
    took longer than the mapping itself for a small model."""
    modules = dict(model.named_modules())
    for file in files:
        with safe_open(file.path, framework="pt", device="cpu") as mapped:
            for entry in file.tensors:
                tensor = mapped.get_tensor(entry.name)
                if tensor.dtype != targets[entry.name].dtype:
                    tensor = tensor.to(targets[entry.name].dtype)
                module_name, _, attribute = names[entry.name].rpartition(".")
                module = modules[module_name]
                if isinstance(getattr(module, attribute), torch.nn.Parameter):
                    module.register_parameter(attribute, torch.nn.Parameter(tensor))  # requires_grad: fill()
                else:  # a persistent buffer
                    setattr(module, attribute, tensor)
