"""The batch engine checked against the model's own forward passes at startup, before it serves anything.

The batcher builds its own cache and masks (slot_cache.py, masks.py); the model's code must honour them: apply
the masks it is given, keep in each cache layer what its kind says, go on from the recurrent states a row holds.
So a few batched steps run and their logits are compared with the model's own, computed without the batcher:
two prompts of different lengths prefilled together (left-padded) and decoded; a longer one, past the model's
smallest sliding window or attention chunk so that a window's edge is crossed, prefilled in two chunks while
they decode, joining them at its last chunk (in later columns than theirs: the batch's layout, gaps and all);
then all three decoding. Every layer runs in each step, so every layer kind the model has is covered.

A vision-language model also prefills an image prompt (a sample the processor made at startup) beside a text
prompt and decodes them a step, against the model's own forwards of each alone: that covers what the model does
with images that the batcher must match (its multimodal rotary positions, its vision tower's features in place of
the image tokens), and says whether the image's tokens see each other both ways (Gemma 3's) or causally.

Its cost: six batched forwards and one of the model's own, each of a few tokens (the long prompt's length where
a window must be crossed), and for images two batched and two of the model's own with the sample image. They also
warm the batcher's paths up, so the worker's warm-up generation is not run after it (service.py).
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
from worker_transformers.generation.vision import Pixels, VisionModel

log = logging.getLogger(__name__)

# How far the batcher's logits may be from the model's own, relative to their largest magnitude: rounding in
# the dtype's precision, not a different computation.
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_HALF_TOLERANCE = 5e-2
_SHORT, _MIDDLE, _LONG = 3, 5, 7  # prompt lengths, the long one made longer to cross a window or chunk


def verified_layout(
    model: PreTrainedModel,
    detokenizer,
    layout: CacheLayout,
    vision: VisionModel | None = None,
    image_prompt: tuple[list[int], Pixels] | None = None,
) -> tuple[CacheLayout | None, str]:
    """(the layout the batcher serves this model with, "") when its logits match the model's own; else (None,
    what differed or failed). Ways around what some models' code cannot take are tried after the first: a model
    of full attention only is given the 2D mask of held columns (Bloom builds its ALiBi bias from one); a recurrent
    model whose layers cannot go on from their states over several tokens prefills long prompts whole
    (Falcon-Mamba), and one whose layers take no padding mask prefills unpadded, one forward per prompt length.
    With an `image_prompt` (its ids and processed images), the layout must batch it too: its image tokens seeing
    each other causally, or else both ways."""
    tries = [layout]
    if any(layout.kinds.values()) and all(reach in (None, Reach()) for reach in layout.kinds.values()):
        tries.append(dataclasses.replace(layout, held_mask=True))
    if layout.recurrent:  # padded before unpadded, chunked before whole: the faster first
        tries += [
            dataclasses.replace(layout, padded_prefill=padded, chunked_prefill=chunked)
            for padded, chunked in ((True, False), (False, True), (False, False))
        ]
    first_why = ""
    for candidate in tries:
        try:
            why = _mismatch(model, detokenizer, candidate)
        except Exception as error:  # a model whose code does not take the batcher's inputs, or no memory for it
            log.debug("the batch engine's check failed", exc_info=True)
            why = f"the batched forward failed ({type(error).__name__}: {str(error)[:200]})"
            if isinstance(error, torch.OutOfMemoryError) and model.device.type == "cuda":
                torch.cuda.empty_cache()  # the warm-up generation after it says whether the model fits at all
        if not why and image_prompt is not None:
            candidate, why = _with_images(model, detokenizer, candidate, vision, image_prompt)
        if not why:
            return candidate, ""
        first_why = first_why or why
    return None, first_why


def _with_images(model, detokenizer, layout: CacheLayout, vision: VisionModel, image_prompt) -> tuple[CacheLayout, str]:
    """The layout with the image blocks the model's logits need (none first), or what differed."""
    why = ""
    for blocks in (False, True):
        candidate = dataclasses.replace(layout, image_blocks=blocks)
        try:
            why = _image_mismatch(model, detokenizer, candidate, vision, image_prompt)
        except Exception as error:  # a model whose code does not take the batcher's inputs, or no memory for it
            log.debug("the batch engine's image check failed", exc_info=True)
            why = f"the batched image prefill failed ({type(error).__name__}: {str(error)[:200]})"
        if not why:
            return candidate, ""
    return layout, why


@torch.inference_mode()
def _image_mismatch(model, detokenizer, layout: CacheLayout, vision: VisionModel, image_prompt) -> str:
    """What differs between the batcher's logits for an image prompt beside a text prompt and the model's own
    for each alone, or ""."""
    from worker_transformers.generation.textstream import TextStream

    ids, pixels = image_prompt
    vocab = model.config.get_text_config().vocab_size
    text = torch.randint(3, vocab, (_MIDDLE,), generator=torch.Generator().manual_seed(1)).tolist()
    batcher = Batcher(model, 2, set(), layout, start=False, vision=vision)
    imaged = Sequence(ids, 8, GREEDY, TextStream(detokenizer, ids), lambda event: None, pixels=pixels)
    plain = Sequence(text, 8, GREEDY, TextStream(detokenizer, text), lambda event: None)
    steps = {"an image prompt prefilled beside a text prompt": batcher.prefill([imaged, plain])}
    steps["their first decode step"] = batcher.decode()
    [[t0, t1]] = _own_logits(model, [text + plain.generated[:1]], [[_MIDDLE - 1, _MIDDLE]])
    own_ids = torch.tensor([ids + imaged.generated[:1]], device=model.device)
    arguments = pixels.extended(1).arguments(set(pixels.tensors), model.device)
    logits = model(input_ids=own_ids, use_cache=False, **arguments).logits[0, -2:].float()
    # The batcher's rows: text prompts first, then image prompts.
    for (step, got), want in zip(steps.items(), [torch.stack([t0, logits[0]]), torch.stack([t1, logits[1]])]):
        if not _close(got.float().reshape(want.shape), want, model.dtype):
            return f"the batched logits differ from the model's own at {step}"
    return ""


@torch.inference_mode()
def _mismatch(model: PreTrainedModel, detokenizer, layout: CacheLayout) -> str:
    """What differs between the batcher's logits and the model's own, or "" where nothing does."""
    from worker_transformers.generation.textstream import TextStream

    vocab = model.config.get_text_config().vocab_size
    draws = torch.Generator().manual_seed(0)
    reaches = [r for reach in layout.kinds.values() if reach for r in (reach.window, reach.chunk) if r]
    long_length = max(_LONG, min(reaches, default=0) + 2)
    half = -(-long_length // 2)
    lengths = (_SHORT, _MIDDLE, long_length)
    short, middle, long = (torch.randint(3, vocab, (n,), generator=draws).tolist() for n in lengths)
    batcher = Batcher(model, 3, set(), layout, start=False)

    def sequence(ids: list[int]) -> Sequence:
        return Sequence(ids, 8, GREEDY, TextStream(detokenizer, ids), lambda event: None)

    first, other, last = sequence(short), sequence(middle), sequence(long)
    steps = {
        "two prompts prefilled together": batcher.prefill([first, other]),
        "their first decode step": batcher.decode(),
    }
    if layout.chunked_prefill:
        batcher.start_chunks([last], half)
        steps["a longer prompt's first chunk"] = batcher.prefill_chunk()
        steps["a decode step between two chunks"] = batcher.decode()
        steps["the longer prompt joining at its last chunk"] = batcher.prefill_chunk()
    else:
        steps["a decode step"] = batcher.decode()
        steps["a longer prompt joining"] = batcher.prefill([last])
    steps["all three decoding"] = batcher.decode()

    own = _own_logits(
        model,
        [short + first.generated[:3], middle + other.generated[:3], long + last.generated[:1]],
        [range(_SHORT - 1, _SHORT + 3), range(_MIDDLE - 1, _MIDDLE + 3), [half - 1, long_length - 1, long_length]],
    )
    (s0, s1, s2, s3), (m0, m1, m2, m3), (l0, l1, l2) = own
    expected = [torch.stack([s0, m0]), torch.stack([s1, m1])]
    if layout.chunked_prefill:
        expected.append(l0)
    expected += [torch.stack([s2, m2]), l1, torch.stack([s3, m3, l2])]
    for (step, got), want in zip(steps.items(), expected, strict=True):
        if not _close(got.float().reshape(want.shape), want, model.dtype):
            return f"the batched logits differ from the model's own at {step}"
    return ""


def _own_logits(model: PreTrainedModel, sequences: list[list[int]], positions) -> list[list[torch.Tensor]]:
    """The model's own logits after each of `positions[i]` in `sequences[i]`, in one forward without the batcher:
    the shorter sequence padded on the right, which no position before the padding sees, so it needs no mask."""
    width = max(len(ids) for ids in sequences)
    ids = torch.tensor([ids + [ids[-1]] * (width - len(ids)) for ids in sequences], device=model.device)
    kept = sorted({p for wanted in positions for p in wanted})  # only these: a long prompt's logits are many
    keep = torch.tensor(kept, device=model.device)
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
    return [[logits[row, kept.index(p)].float() for p in wanted] for row, wanted in enumerate(positions)]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    scale = expected.abs().max().clamp(min=1e-6)
    return bool(((actual - expected).abs().max() / scale) <= _TOLERANCE.get(dtype, _HALF_TOLERANCE))
