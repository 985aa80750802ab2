"""The batch engine checked against the model's own forward passes at startup, before it serves anything.

The batcher builds its own cache and masks (slot_cache.py, masks.py); the model's code must honour them: apply
the masks it is given, keep in each cache layer what its kind says, go on from the recurrent states a row holds.
So a few batched steps run and their logits are compared with the model's own, computed without the batcher:
a short prompt prefilled alone and decoded; a longer one, past the model's smallest sliding window or attention
chunk so that a window's edge is crossed, prefilled in two chunks while the first decodes, joining it at its
last chunk (in later columns than the short one's: the batch's layout, gaps and all); then both decoding. Every
layer runs in each step, so every layer kind the model has is covered.

Its cost: six batched forwards and two of the model's own, each of a few tokens (the long prompt's length where
a window must be crossed). They also warm the batcher's paths up, so the worker's warm-up generation is not run
after it (service.py).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import PreTrainedModel

from worker_transformers.generation.batch.batcher import Batcher
from worker_transformers.generation.batch.layout import CacheLayout
from worker_transformers.generation.batch.masks import Reach
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.sampling import GREEDY

log = logging.getLogger(__name__)

# How far the batcher's logits may be from the model's own, relative to their largest magnitude: rounding in
# the dtype's precision, not a different computation.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 5e-2
_SHORT, _LONG = 3, 7  # prompt lengths, the long one made longer to cross a window or chunk


def verified_layout(model: PreTrainedModel, detokenizer, layout: CacheLayout) -> tuple[CacheLayout | None, str]:
    """(the layout the batcher serves this model with, "") when its logits match the model's own; else (None,
    what differed or failed). Two ways around what some models' code cannot take are tried after the first: a
    model of full attention only is given the 2D mask of held columns (Bloom builds its ALiBi bias from one), and
    a recurrent model whose layers cannot go on from their states over several tokens has its long prompts
    prefilled whole (Falcon-Mamba)."""
    tries = [layout]
    if layout.kinds and all(reach in (None, Reach()) for reach in layout.kinds.values()) and any(layout.kinds.values()):
        tries.append(dataclasses.replace(layout, held_mask=True))
    if layout.recurrent:
        tries.append(dataclasses.replace(layout, chunked_prefill=False))
    first_why = ""
    for candidate in tries:
        try:
            why = _mismatch(model, detokenizer, candidate)
        except Exception as error:  # a model whose code does not take the batcher's inputs, or no memory for it
            log.debug("the batch engine's check failed", exc_info=True)
            why = f"the batched forward failed ({type(error).__name__}: {str(error)[:200]})"
            if isinstance(error, torch.OutOfMemoryError) and model.device.type == "cuda":
                torch.cuda.empty_cache()  # the warm-up generation after it says whether the model fits at all
        if not why:
            return candidate, ""
        first_why = first_why or why
    return None, first_why


@torch.inference_mode()
def _mismatch(model: PreTrainedModel, detokenizer, layout: CacheLayout) -> str:
    """What differs between the batcher's logits and the model's own, or "" where nothing does."""
    from worker_transformers.generation.textstream import TextStream

    vocab = model.config.get_text_config().vocab_size
    draws = torch.Generator().manual_seed(0)
    reaches = [r for reach in layout.kinds.values() if reach for r in (reach.window, reach.chunk) if r]
    long_length = max(_LONG, min(reaches, default=0) + 2)
    half = -(-long_length // 2)
    short, long = (torch.randint(3, vocab, (n,), generator=draws).tolist() for n in (_SHORT, long_length))
    batcher = Batcher(model, 2, set(), layout, start=False)

    def sequence(ids: list[int]) -> Sequence:
        return Sequence(ids, 8, GREEDY, TextStream(detokenizer, ids), lambda event: None)

    first, second = sequence(short), sequence(long)
    steps = {"a prompt prefilled alone": batcher.prefill([first]), "its first decode step": batcher.decode()}
    if layout.chunked_prefill:
        batcher.start_chunks([second], half)
        steps["a longer prompt's first chunk"] = batcher.prefill_chunk()
        steps["a decode step between two chunks"] = batcher.decode()
        steps["the longer prompt joining at its last chunk"] = batcher.prefill_chunk()
    else:
        steps["a decode step"] = batcher.decode()
        steps["a longer prompt joining"] = batcher.prefill([second])
    steps["both decoding"] = batcher.decode()

    short_logits = _own_logits(model, short + first.generated[:3], range(_SHORT - 1, _SHORT + 3))
    long_logits = _own_logits(model, long + second.generated[:1], [half - 1, long_length - 1, long_length])
    expected = [short_logits[0], short_logits[1]]
    if layout.chunked_prefill:
        expected.append(long_logits[0])
    expected += [short_logits[2], long_logits[1], torch.stack([short_logits[3], long_logits[2]])]
    for (step, got), want in zip(steps.items(), expected, strict=True):
        if not _close(got.float().reshape(want.shape), want, model.dtype):
            return f"the batched logits differ from the model's own at {step}"
    return ""


def _own_logits(model: PreTrainedModel, ids: list[int], positions) -> list[torch.Tensor]:
    """The model's own logits after each of `positions` in `ids`, in one forward without the batcher."""
    keep = torch.tensor(list(positions), device=model.device)  # only these: a long prompt's are many
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=keep)
    return list(out.logits[0].float())


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = expected.abs().max().clamp(min=1e-6)
    return bool(((actual - expected).abs().max() / scale) <= _TOLERANCE.get(dtype, _HALF_TOLERANCE))
