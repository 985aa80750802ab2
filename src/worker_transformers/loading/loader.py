"""Tokenizer and model from a local folder onto the device, then one warm-up generation.

Everything is read from the folder `sources.resolve` found (`local_files_only`): once the weights are
local, loading never touches the network. Custom model code runs only when TRUST_REMOTE_CODE is set.
The weights go through the fast path in placement.py when the checkpoint allows it (FAST_LOAD), else
through `from_pretrained`. Running out of memory is reported as a LoadError that says what to change.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.processing_utils import ProcessorMixin

from worker_transformers.config import Settings
from worker_transformers.loading import architecture, checkpoint, placement
from worker_transformers.model.sources import ModelLocation
from worker_transformers.model.weights import DTYPE_SIZES, WeightFile
from worker_transformers.startup import prefetch
from worker_transformers.startup.budget import human_bytes

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WARM_UP_TOKENS = 2


class LoadError(Exception):
    """The model cannot be loaded as configured. The message says which setting to change."""


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


def import_model_code(location: ModelLocation, settings: Settings) -> None:
    """Import the model's architecture now. transformers imports it lazily on first use, and that import
    is over a second for Llama (torch.distributed, dynamo): it belongs with the other imports, which the
    weight prefetch runs alongside, not inside the load. A model transformers cannot generate text with is
    refused here, by name."""
    _check_remote_code(location, settings)
    config = AutoConfig.from_pretrained(
        location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
    )
    if architecture.model_class(config, location.path) is None and not getattr(config, "auto_map", None):
        raise LoadError(
            f"{location.model_id}: model_type {config.model_type!r} ({type(config).__name__}) has no class in "
            "transformers that generates text (neither a causal LM nor an image-text-to-text model); serve a "
            "text-generation or vision-language checkpoint"
        )


def load_tokenizer(location: ModelLocation, settings: Settings) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(
            location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
        )
    except Exception as error:
        # What a file the tokenizer cannot parse raises: plain Exception from the tokenizers library, KeyError or
        # TypeError for a field missing or of the wrong kind, ValueError, OSError. The files are judged only once
        # loading failed, so a good tokenizer costs no second read.
        damaged = _damaged_json(location.path, TOKENIZER_JSON_FILES)
        if damaged is None and not (type(error) is Exception or isinstance(error, TOKENIZER_FILE_ERRORS)):
            raise
        what = damaged or f"cannot be loaded ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
        raise LoadError(
            f"{location.model_id}: the tokenizer in {location.path} {what}; the copy is damaged: fetch the model "
            "again with its tokenizer files (rebuild the image if it is baked)"
        ) from None


def load_processor(location: ModelLocation, settings: Settings, tokenizer) -> ProcessorMixin | None:
    """The processor that turns a vision-language model's images into its inputs (architecture.py), with the
    worker's tokenizer (CHAT_TEMPLATE included); None for a model that takes no images."""
    config = AutoConfig.from_pretrained(
        location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
    )
    if not architecture.takes_images(config, location.path):
        return None
    own = PROCESSOR_MAPPING[type(config)] if type(config) in PROCESSOR_MAPPING else None
    try:
        if own is None:  # the model's own code names it
            processor = AutoProcessor.from_pretrained(
                location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
            )
        else:
            processor = _images_only(own).from_pretrained(location.path, local_files_only=True)
    except TOKENIZER_FILE_ERRORS as error:  # a damaged or incomplete processor file: the message says which
        damaged = _damaged_json(location.path, (*architecture.PROCESSOR_FILES, "chat_template.json"))
        what = damaged or f"cannot be loaded ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})"
        raise LoadError(
            f"{location.model_id}: the image processor in {location.path} {what}; the copy is damaged: fetch the "
            "model again with its processor files (rebuild the image if it is baked)"
        ) from None
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise LoadError(
            f"{location.model_id}: {location.path} has no image processor transformers can load for "
            f"{type(config).__name__}; fetch the model again with its processor files"
        )
    processor.tokenizer = tokenizer  # one tokenizer for text and image requests
    return processor


class _NoVideo(ProcessorMixin):
    """After a processor class in the order of bases, before ProcessorMixin: takes the video processor its
    __init__ passes on (None), so that ProcessorMixin, told of no video processor, gets none."""

    def __init__(self, *args, video_processor=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)


def _images_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor: the worker takes no video, and every video processor needs
    torchvision, which an image processor does not (transformers falls back to Pillow without it). A processor is
    made of the parts `get_attributes` names, given positionally in that order: the video processor, last of them,
    is left out of the parts and given as None to the class's own __init__, which passes it on to _NoVideo."""
    attributes = processor_class.get_attributes()
    if attributes[-1:] != ["video_processor"]:
        return processor_class

    class ImagesOnly(processor_class, _NoVideo):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return attributes[:-1]

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):
            return super().from_args_and_dict([*args, None], processor_dict, **kwargs)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


TOKENIZER_FILE_ERRORS = (KeyError, TypeError, ValueError, OSError)
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _damaged_json(folder: Path, names: tuple[str, ...]) -> str | None:
    for name in names:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError) as error:
                return f"has a {name} that is not valid JSON ({error})"
    return None


def build_model(location: ModelLocation, settings: Settings, files: list[WeightFile]) -> placement.EmptyModel | None:
    """The fast path's empty model on the device, or None when `from_pretrained` must load this checkpoint
    (FAST_LOAD=false, pickle weights, or a checkpoint the fast path does not handle: logged with why).
    First, with nothing allocated, config.json is held against the files and the device's free memory."""
    device = pick_device(settings)
    dtype = _DTYPES.get(settings.dtype)  # None: the checkpoint's own dtype
    if files:  # none: pickle weights, which only from_pretrained's report can judge
        config = AutoConfig.from_pretrained(
            location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
        )
        on_device = dtype or placement.checkpoint_dtype(config, files)
        parameters = checkpoint.expected_parameters(config, files, location.path, location.model_id, on_device)
        _check_fits(location, max(parameters * on_device.itemsize, _weights_bytes(files, dtype)), device, dtype)
    if not (settings.fast_load and files):
        return None
    try:
        return placement.build_empty(location.path, files, device, dtype)
    except placement.NotEligible as why:
        log.info("%s: fast loading does not apply (%s); using from_pretrained", location.model_id, why)
        return None
    except (torch.OutOfMemoryError, MemoryError):
        raise LoadError(_out_of_memory(location, _weights_bytes(files, dtype), device, dtype)) from None


def load_weights(
    location: ModelLocation, settings: Settings, files: list[WeightFile], empty: placement.EmptyModel | None
) -> PreTrainedModel:
    """The loaded model: `empty` filled, or the whole model by `from_pretrained` when it is None."""
    device = empty.device if empty is not None else pick_device(settings)
    dtype = _DTYPES.get(settings.dtype)
    started = time.monotonic()
    try:
        if empty is not None:
            model, how = placement.fill(empty, files), "fast path"
        else:
            model, how = _from_pretrained(location, settings, device, dtype), "from_pretrained"
    except (torch.OutOfMemoryError, MemoryError):
        raise LoadError(_out_of_memory(location, _weights_bytes(files, dtype), device, dtype)) from None
    log.info(
        "loaded %s (%s) on %s as %s by %s in %.2f s: %.0f M parameters, %.2f GB of weights",
        location.model_id,
        location.source,
        device,
        model.dtype,
        how,
        time.monotonic() - started,
        model.num_parameters() / 1e6,
        sum(f.size for f in files) / 1e9,
    )
    return model


def _from_pretrained(location: ModelLocation, settings: Settings, device: torch.device, dtype: torch.dtype | None):
    config = AutoConfig.from_pretrained(
        location.path, local_files_only=True, trust_remote_code=settings.trust_remote_code
    )
    model, report = architecture.auto_class(config, location.path).from_pretrained(
        location.path,
        local_files_only=True,
        trust_remote_code=settings.trust_remote_code,
        dtype=dtype or "auto",
        device_map=device,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # a wrong shape is refused by name below, not raised as a RuntimeError
    )
    checkpoint.check_report(model, report, location.path, location.model_id)
    return model.eval()


def _weights_bytes(files: list[WeightFile], dtype: torch.dtype | None) -> int:
    """Bytes the weights take on the device: the checkpoint's, or converted to `dtype`."""
    if dtype is None:
        return sum(t.nbytes for f in files for t in f.tensors)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(t.nbytes // DTYPE_SIZES[t.dtype] * itemsize for f in files for t in f.tensors)


def _check_fits(location: ModelLocation, need: int, device: torch.device, dtype) -> None:
    free = free_bytes(device)
    if free is not None and need > free:
        raise LoadError(_out_of_memory(location, need, device, dtype))


def free_bytes(device: torch.device) -> int | None:
    """Memory the device has free: the GPU's, or the host's available memory; None: unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return prefetch.host_memory_free()


def _out_of_memory(location: ModelLocation, need: int, device: torch.device, dtype) -> str:
    where = "GPU memory" if device.type == "cuda" else "host memory"
    smaller = "a smaller DTYPE (bfloat16), " if dtype == torch.float32 else ""
    return (
        f"{location.model_id}: not enough {where} on {device}: the weights need {human_bytes(need)}, "
        f"{human_bytes(free_bytes(device) or 0)} is free, before the KV cache; use {smaller}a device with more memory, "
        "or a smaller model"
    )


def warm_up(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> None:
    """One short greedy generation from `ids` (a one-message chat through the chat template, as a job's prompt is
    made), so the first job does not pay for first-call work (kernel selection, lazy imports, caches,
    memory-mapped pages touched for the first time)."""
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=WARM_UP_TOKENS, do_sample=False, temperature=1.0, top_p=1.0, top_k=None)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    input_ids = torch.tensor([ids], device=model.device)
    try:
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
    except (torch.OutOfMemoryError, MemoryError):
        raise LoadError(
            "out of memory in the warm-up generation: the weights fit but nothing is left for activations; "
            "use a GPU with more memory, or a smaller DTYPE or model"
        ) from None
