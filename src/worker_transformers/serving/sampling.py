"""Choosing the next token for one sequence from its logits, with that sequence's own settings.

Every request in a batch keeps its own temperature, top-k, top-p, repetition penalty and random generator,
so a seeded request samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import torch

from worker_transformers.serving.schema import GenerationRequest

_FINITE = 1e30
MAX_PENALTY = 1e4

# Below this, dividing float32 logits by the temperature overflows to inf; the distribution is already
# one-hot long before it, so sampling at this floor is indistinguishable from the temperature asked for.
MIN_TEMPERATURE = 1e-4


class Sampler:
    def __init__(self, request: GenerationRequest, device: torch.device) -> None:
        self.greedy = request.greedy
        self.temperature = max(request.temperature, MIN_TEMPERATURE)
        self.top_k = request.top_k
        self.top_p = request.top_p
        # Past these bounds a penalty already pushes seen tokens to the edge of the distribution; inside them
        # it stays a finite float32 (3.4e38, the schema's largest, rounds to inf and 0 x inf is nan).
        self.repetition_penalty = min(max(request.repetition_penalty, 1 / MAX_PENALTY), MAX_PENALTY)
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if request.seed is not None:
                self.generator.manual_seed(request.seed)
            else:
                self.generator.seed()

    def pick(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        """The next token id. `logits` is this sequence's last-position row (vocab,), `seen` the ids of the
        prompt and the tokens generated so far (for the repetition penalty)."""
        logits = logits.float()
        if self.repetition_penalty != 1.0:
            previous = logits.gather(0, seen)
            penalized = torch.where(
                previous > 0, previous / self.repetition_penalty, previous * self.repetition_penalty
            )
            # A tiny penalty divides logits towards inf; keep them finite so the softmax stays defined.
            logits = logits.scatter(0, seen, penalized).clamp(min=-_FINITE, max=_FINITE)
        if self.greedy:
            return int(logits.argmax())
        logits = logits / self.temperature
        if 0 < self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(logits, descending=True)
            ordered_probs = ordered.softmax(-1)
            # Drop tokens once the mass before them already reaches top_p; the likeliest token always stays.
            drop = (ordered_probs.cumsum(-1) - ordered_probs) >= self.top_p
            drop[0] = False  # even when top_p rounds to 0 in float32
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
