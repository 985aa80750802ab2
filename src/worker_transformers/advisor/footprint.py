"""How much GPU memory a model needs in this worker, from the model's own files. Light: no torch.

The shape comes from config.json (the language model's: a vision-language model's text_config), the parameter
count per dtype from the safetensors headers (a few kB at the start of each file, so nothing else is read): all
of the weights, a vision tower's included. A config.json that leaves some of the shape to its class's defaults
(many vision-language ones do, in text_config) is completed by transformers' config class, imported only then.
The worst case is sized: MAX_CONCURRENCY jobs, each with a full prompt and a full answer, on the batcher as it
is written.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker_transformers.model.errors import UnsupportedWeights
from worker_transformers.model.weights import DTYPE_SIZES, FLOAT_DTYPES, read_header, weight_paths

# The float dtypes change size when DTYPE asks for another one: bytes per element by torch name.
DTYPE_BYTES = {name: DTYPE_SIZES[stored] for stored, name in FLOAT_DTYPES.items()}

# The batcher rebuilds the KV cache layer by layer when a job joins or leaves, and each decode step grows one
# layer at a time: beside the cache, at most one layer's new copy exists.
RUNTIME_BYTES = 10**9  # CUDA context, cuBLAS workspace and kernels: memory no tensor accounts for


class FootprintError(ValueError):
    """The model's files do not say what the estimate needs. The message names the file and the fix."""


@dataclass(frozen=True)
class ModelShape:
    layers: int  # the layers that keep keys and values: a hybrid model's linear-attention layers keep a fixed state
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    parameters: Mapping[str, int]  # safetensors dtype -> parameter count

    @property
    def stored_bytes(self) -> int:
        """The weights as the checkpoint stores them: what a download, an image or a volume holds."""
        return sum(count * DTYPE_SIZES[dtype] for dtype, count in self.parameters.items())

    @property
    def checkpoint_dtype(self) -> str:
        """The float dtype most parameters have: what DTYPE=auto loads."""
        floats = {d: n for d, n in self.parameters.items() if d in FLOAT_DTYPES}
        if not floats:
            raise FootprintError("the weights hold no float tensors; set DTYPE to the dtype the model runs in")
        return FLOAT_DTYPES[max(floats, key=floats.get)]


@dataclass(frozen=True)
class Footprint:
    dtype: str
    weights: int  # bytes, in `dtype`
    kv_cache: int  # bytes at the worst moment: the full cache and one layer's copy
    kv_per_token: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime


# layer_types entries whose layers cache every token's key and value (at worst: a sliding window caps its own).
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
REQUIRED_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size")
SHAPE_KEYS = (*REQUIRED_KEYS, "num_key_value_heads", "head_dim", "intermediate_size")


def shape_from_config(config: Mapping, parameters: Mapping[str, int], where: str = "config.json") -> ModelShape:
    text = text_config(config)

    def need(key: str) -> int:
        if not isinstance(text.get(key), int):
            raise FootprintError(
                f"{where} has no integer {key}; the estimate needs a decoder-only transformer's config "
                "(num_hidden_layers, num_attention_heads, hidden_size)"
            )
        return text[key]

    heads, hidden = need("num_attention_heads"), need("hidden_size")
    return ModelShape(
        layers=_attention_layers(text, need("num_hidden_layers")),
        kv_heads=text.get("num_key_value_heads") or heads,  # absent means plain multi-head attention
        head_dim=text.get("head_dim") or hidden // heads,
        hidden_size=hidden,
        intermediate_size=text.get("intermediate_size") or 4 * hidden,
        parameters=dict(parameters),
    )


def _attention_layers(text: Mapping, layers: int) -> int:
    kinds = text.get("layer_types")
    if not isinstance(kinds, list) or len(kinds) != layers:
        return layers
    return sum(1 for kind in kinds if kind in ATTENTION_LAYERS)


def text_config(config: Mapping) -> Mapping:
    """The language model's fields: a multimodal checkpoint's text_config (older ones keep them at the top level,
    as text models do), with those the file leaves out taken from its config class's defaults."""
    text = config.get("text_config") or config
    # A text model's config.json that omits kv heads or head_dim means the usual defaults (shape_from_config); a
    # text_config's omissions mean its class's, which differ by model (Gemma 3: 4 kv heads of 8, head_dim 256).
    if all(isinstance(text.get(key), int) for key in (SHAPE_KEYS if text is not config else REQUIRED_KEYS)):
        return text
    return {**_class_defaults(config), **text}


def _class_defaults(config: Mapping) -> Mapping:
    """The text config transformers builds from `config` (from its text_config alone, when that names its
    model_type); empty when transformers has no class for it (custom code) or refuses its fields."""
    try:
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig  # seconds to import, with torch: only for a config.json that needs it
    except ImportError:
        return {}
    nested = config.get("text_config") or {}
    source = nested if nested.get("model_type") else config
    fields = {key: value for key, value in source.items() if key != "model_type"}
    try:
        built = AutoConfig.for_model(source.get("model_type"), **fields)
    except (ValueError, KeyError, TypeError, StrictDataclassError):  # an unknown model_type, fields it refuses
        return {}
    return built.get_text_config().to_dict()


def read_parameters(folder: Path) -> dict[str, int]:
    """Parameter count per safetensors dtype, from the headers of the folder's weight files."""
    try:
        files = [read_header(path, folder.name) for path in weight_paths(folder, folder.name)]
    except (UnsupportedWeights, OSError) as error:
        raise FootprintError(f"{error}") from None
    if not files:
        raise FootprintError(f"{folder} has no .safetensors weights; this worker loads safetensors only")
    counts: Counter[str] = Counter()
    for file in files:
        for tensor in file.tensors:
            counts[tensor.dtype] += math.prod(tensor.shape)
    return dict(counts)


def shape_from_folder(folder: Path) -> ModelShape:
    config = folder / "config.json"
    if not config.is_file():
        raise FootprintError(f"{folder} has no config.json; point --model at a folder holding the whole model")
    return shape_from_config(json.loads(config.read_text()), read_parameters(folder), str(config))


def footprint(shape: ModelShape, dtype: str, concurrency: int, max_input_tokens: int, max_new_tokens: int) -> Footprint:
    """GPU memory for `concurrency` jobs of `max_input_tokens` + `max_new_tokens` tokens, with DTYPE `dtype`."""
    served = shape.checkpoint_dtype if dtype == "auto" else dtype
    width = DTYPE_BYTES[served]
    weights = sum(
        count * (width if stored in FLOAT_DTYPES else DTYPE_SIZES[stored])  # DTYPE casts floats only
        for stored, count in shape.parameters.items()
    )
    kv_per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * width  # a key and a value per layer
    full_cache = concurrency * (max_input_tokens + max_new_tokens) * kv_per_token
    kv_cache = full_cache + full_cache // max(shape.layers, 1)
    # The peak while a full prompt is prefilled: the MLP's two intermediate projections and a few hidden-sized
    # buffers per token. Attention runs in SDPA's memory-efficient kernels and only the last token's logits
    # are kept, so neither grows with the square of the prompt or with the vocabulary.
    activations = max_input_tokens * (2 * shape.intermediate_size + 4 * shape.hidden_size) * width
    return Footprint(served, weights, kv_cache, kv_per_token, activations, RUNTIME_BYTES)
