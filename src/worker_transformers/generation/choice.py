"""Which engine serves this model, decided at startup from what the model itself does.

The batcher (batcher.py) serves models whose every layer keeps plain or sliding-window keys and values, under
sdpa or eager attention: it builds its own cache and masks for them. To be sure that holds for this model
(the architecture honours the masks it is given, its layers cache what they say), the batcher is first run on
two short prompts, one joining while the other decodes, and its logits are compared with the model's own
forward passes. Anything else (recurrent or hybrid state, a cache of another kind, a mismatch) is served by
`generate`, one request at a time (serial.py), and the log says why. ENGINE=continuous serves the same models
through transformers' own continuous batching instead (continuous.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from worker_transformers.config import ConfigError
from worker_transformers.generation.batcher import PREFILL_TOKENS, Batcher
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.sampling import GREEDY
from worker_transformers.generation.slot_cache import layer_windows

log = logging.getLogger(__name__)

_ATTENTION = ("sdpa", "eager")
# How far the batcher's logits may be from the model's own, relative to their largest magnitude: rounding in
# the dtype's precision, not a different computation.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 5e-2


@dataclass(frozen=True)
class CacheShape:
    """What one forward pass says about the model's cache."""

    batchable: bool
    why_not: str  # when not batchable: what the cache is
    num_layers: int = 0
    windows: dict[str, int | None] | None = None
    kv_bytes_per_token: int = 0


@torch.inference_mode()
def probe(model: PreTrainedModel) -> CacheShape:
    """Run two tokens through the model to see which cache it builds."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache):
        kind = type(cache).__name__ if cache is not None else "no cache object (its state lives inside the model)"
        return CacheShape(False, f"its forward keeps {kind}")
    kinds = {type(layer).__name__ for layer in cache.layers}
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        return CacheShape(False, f"its cache holds {', '.join(sorted(kinds))} layers")
    attention = model.config._attn_implementation
    if attention not in _ATTENTION:
        return CacheShape(False, f"it runs {attention} attention, which takes no explicit masks")
    sliding = [getattr(layer, "sliding_window", None) for layer in cache.layers]
    windows = layer_windows(getattr(model.config.get_text_config(), "layer_types", None), sliding)
    per_token = sum(
        (layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()
        for layer in cache.layers
    )
    return CacheShape(True, "", len(cache.layers), windows, per_token)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = expected.abs().max().clamp(min=1e-6)
    return bool(((actual - expected).abs().max() / scale) <= _TOLERANCE.get(dtype, _HALF_TOLERANCE))


@torch.inference_mode()
def batcher_matches_model(model: PreTrainedModel, detokenizer, shape: CacheShape) -> str | None:
    """None when the batcher computes what the model computes on its own; else what differed."""
    from worker_transformers.generation.textstream import TextStream

    vocab = model.config.get_text_config().vocab_size
    draws = torch.Generator().manual_seed(0)
    short, long = (torch.randint(3, vocab, (n,), generator=draws).tolist() for n in (3, 7))
    batcher = Batcher(model, 2, set(), shape.num_layers, shape.windows, start=False)

    def sequence(ids: list[int]) -> Sequence:
        return Sequence(ids, 8, GREEDY, TextStream(detokenizer, ids), lambda event: None)

    first, second = sequence(short), sequence(long)
    recorded = [
        batcher.prefill([first]),  # alone
        batcher.decode(),
        batcher.prefill([second]),  # joins while the first decodes, and is longer: the first's columns skip ahead
        batcher.decode(),
    ]

    def own(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()

    expected = [
        own(short),
        own(short + first.generated[:1]),
        own(long),
        torch.stack([own(short + first.generated[:2]), own(long + second.generated[:1])]),
    ]
    steps = ("a prompt prefilled alone", "its first decode step", "a longer prompt joining", "both decoding")
    for step, got, want in zip(steps, recorded, expected):
        if not _close(got.float().reshape(want.shape), want, model.dtype):
            return f"the batched logits differ from the model's own at {step}"
    return None


def choose(model: PreTrainedModel, detokenizer, forced: str) -> tuple[str, CacheShape, str]:
    """(engine, cache shape, why): the batcher where the model allows it (or ENGINE says so), else serial.
    Transformers' continuous batching serves only when ENGINE=continuous asks for it: on the CPU benchmark it
    is no faster than the batcher (README, Concurrency and batching)."""
    shape = probe(model)
    if forced == "serial":
        return "serial", shape, "ENGINE=serial"
    if not shape.batchable:
        if forced in ("batch", "continuous"):
            raise ConfigError(f"ENGINE={forced}, but this model cannot be batched: {shape.why_not}; use ENGINE=auto")
        return "serial", shape, f"this model cannot be batched: {shape.why_not}"
    if forced == "continuous":
        return "continuous", shape, "ENGINE=continuous"
    mismatch = batcher_matches_model(model, detokenizer, shape)
    if mismatch is not None:
        if forced == "batch":
            raise ConfigError(f"ENGINE=batch, but {mismatch}; use ENGINE=auto")
        log.warning("the batcher does not fit this model (%s); serving one request at a time", mismatch)
        return "serial", shape, mismatch
    return "batch", shape, "its cache is plain or sliding-window attention"


def kv_token_budget(model: PreTrainedModel, shape: CacheShape, free_bytes: int) -> int:
    """Cache tokens the batch may occupy: the memory free after loading, less what a full prefill's activations
    take (the MLP's two intermediate projections and a few hidden-sized buffers per prompt token)."""
    text = model.config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    activations = PREFILL_TOKENS * (2 * intermediate + 4 * hidden) * model.dtype.itemsize
    return max(0, int(0.9 * free_bytes) - activations) // max(shape.kv_bytes_per_token, 1)
