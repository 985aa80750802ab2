"""Which engine serves this model, decided at startup from what the model itself does.

The batcher (batch/batcher.py) serves models whose layers keep what transformers' DynamicCache keeps for them:
keys and values (full, sliding-window or chunked attention, under sdpa or eager attention), recurrent states
(linear attention, convolutions, state-space layers), both, or nothing (layers that reuse another's keys and
values). It builds its own cache and masks for them (batch/layout.py reads which from one forward), and it is
first checked against the model's own forward passes (batch/check.py). Anything else (a cache of another kind,
state the model keeps itself, a mismatch) is served by `generate`, one request at a time (serial.py), and the log
says why. ENGINE=continuous serves attention models through transformers' own continuous batching instead
(continuous.py).
"""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

from worker_transformers.config import ConfigError
from worker_transformers.generation.batch.batcher import PREFILL_TOKENS
from worker_transformers.generation.batch.check import verified_layout
from worker_transformers.generation.batch.layout import CacheLayout, probe
from worker_transformers.generation.batch.slot_cache import ATTENTION
from worker_transformers.generation.vision import Pixels, VisionModel

log = logging.getLogger(__name__)


def choose(
    model: PreTrainedModel,
    detokenizer,
    forced: str,
    vision: VisionModel | None = None,
    image_prompt: tuple[list[int], Pixels] | None = None,
) -> tuple[str, CacheLayout, str]:
    """(engine, cache layout, why): the batcher where the model allows it (or ENGINE says so), else serial. A
    vision-language model's `image_prompt` (a sample the processor made) must batch too (batch/check.py).
    Transformers' continuous batching serves only when ENGINE=continuous asks for it: on the CPU benchmark it
    is no faster than the batcher (README, Concurrency and batching)."""
    layout = probe(model)
    if forced == "serial":
        return "serial", layout, "ENGINE=serial"
    if not layout.batchable:
        if forced in ("batch", "continuous"):
            raise ConfigError(f"ENGINE={forced}, but this model cannot be batched: {layout.why_not}; use ENGINE=auto")
        return "serial", layout, f"this model cannot be batched: {layout.why_not}"
    if forced == "continuous":
        if any(spec.keeps != ATTENTION for spec in layout.layers):
            raise ConfigError(
                "ENGINE=continuous, but transformers' continuous batching takes attention layers only, and this "
                f"model has {layout.describe()}; use ENGINE=auto or ENGINE=batch"
            )
        return "continuous", layout, "ENGINE=continuous"
    verified, mismatch = verified_layout(model, detokenizer, layout, vision, image_prompt)
    if verified is None:
        if forced == "batch":
            raise ConfigError(f"ENGINE=batch, but {mismatch}; use ENGINE=auto")
        log.warning("the batcher does not fit this model (%s); serving one request at a time", mismatch)
        return "serial", layout, mismatch
    return "batch", verified, f"its cache batches: {verified.describe()}"


def memory_budget(model: PreTrainedModel, free_bytes: int) -> int:
    """Bytes the batch's cache may occupy: the memory free after loading (the vision tower's weights included),
    less what a full prefill's activations take (the MLP's two intermediate projections and a few hidden-sized
    buffers per prompt token), and for a vision-language model as much again for its vision tower's layers over as
    many image patches."""
    activations = _activations(model.config.get_text_config())
    vision = getattr(model.config, "vision_config", None)
    if vision is not None and getattr(vision, "hidden_size", None):
        activations += _activations(vision)
    return max(0, int(0.9 * free_bytes) - activations * model.dtype.itemsize)


def _activations(config) -> int:
    """Values a forward of PREFILL_TOKENS tokens holds at once in one of `config`'s layers."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return PREFILL_TOKENS * (2 * intermediate + 4 * hidden)
