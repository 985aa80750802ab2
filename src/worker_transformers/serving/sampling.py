"""The next token of every sequence in a batch at once, each with its own settings and seed.

One (batch, vocab) pass per step, whatever the mix of settings: per-row repetition penalty, temperature,
top-k and top-p as tensors, and a choice by the Gumbel-max trick (argmax of logits / temperature plus Gumbel
noise samples exactly from the softmax). The noise is not drawn from a stateful generator but computed from
(the request's seed, the step, the token id) by a counter-based hash, so a seeded request draws the same noise,
and samples the same tokens, whatever else shares its batch and in whichever row it sits; and the step costs a
fixed number of batched operations, with one device-to-host copy of the chosen tokens, instead of a few small
operations and a sync per sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from worker_transformers.serving.schema import GenerationRequest

_FINITE = 1e30
MAX_PENALTY = 1e4
# Below this, dividing float32 logits by the temperature overflows to inf; the distribution is already
# one-hot long before it, so sampling at this floor is indistinguishable from the temperature asked for.
MIN_TEMPERATURE = 1e-4

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants, as int64 (torch's integer arithmetic wraps around like C's unsigned one).
_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings, checked and clamped once."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int  # 64 bits; a request without one gets a random one

    @classmethod
    def of(cls, request: GenerationRequest) -> Sampling:
        seed = request.seed if request.seed is not None else random.getrandbits(64)
        return cls(
            greedy=request.greedy,
            temperature=max(request.temperature, MIN_TEMPERATURE),
            top_k=min(request.top_k, 1 << 31),  # any k past the vocabulary keeps every token
            top_p=request.top_p,
            # Past these bounds a penalty already pushes seen tokens to the edge of the distribution; inside them
            # it stays a finite float32 (3.4e38, the schema's largest, rounds to inf and 0 x inf is nan).
            repetition_penalty=min(max(request.repetition_penalty, 1 / MAX_PENALTY), MAX_PENALTY),
            seed=_signed(seed),
        )


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, vocab) standard Gumbel noise that depends only on each row's (seed, step) and the token id."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    row = _mix(seeds + steps * _GOLDEN)
    bits = _mix(row[:, None] + (token[None, :] + 1) * _GOLDEN)
    uniform = (_shift_right(bits, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(uniform))


class BatchSampler:
    """The settings of the rows of a batch as device tensors, kept in row order by the batcher."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Sampling] = []
        self._tensors: dict[str, torch.Tensor] | None = None

    def set_rows(self, rows: list[Sampling]) -> None:
        """The batch's rows changed (a sequence joined, left or moved): rebuild the parameter tensors."""
        self.rows = rows
        self._tensors = None

    def _params(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            rows, device = self.rows, self.device
            self._tensors = {
                "greedy": torch.tensor([r.greedy for r in rows], device=device),
                "temperature": torch.tensor([r.temperature for r in rows], device=device)[:, None],
                "top_k": torch.tensor([r.top_k for r in rows], device=device)[:, None],
                "top_p": torch.tensor([r.top_p for r in rows], device=device)[:, None],
                "penalty": torch.tensor([r.repetition_penalty for r in rows], device=device)[:, None],
                "seed": torch.tensor([r.seed for r in rows], device=device, dtype=torch.int64),
            }
        return self._tensors

    def pick(self, logits: torch.Tensor, steps: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The next token of each row, on the device. `logits` (rows, vocab) are the last position's, `steps`
        (rows,) how many tokens each row has generated, `seen` (rows, vocab) marks the prompt's and the generated
        tokens, for the repetition penalty (None when no row asks for one)."""
        p = self._params()
        logits = logits.float()
        if seen is not None:
            penalty = p["penalty"]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            # A tiny penalty divides logits towards inf; keep them finite so the softmax stays defined.
            logits = torch.where(seen, penalized, logits).clamp(min=-_FINITE, max=_FINITE)
        rows = self.rows
        if all(r.greedy for r in rows):
            return logits.argmax(-1)
        scaled = logits / p["temperature"]
        if any(0 < r.top_k < logits.shape[-1] or r.top_p < 1.0 for r in rows):
            scaled = self._truncate(scaled, p["top_k"], p["top_p"])
        noisy = scaled + gumbel_noise(p["seed"], steps, logits.shape[-1])
        return torch.where(p["greedy"], logits.argmax(-1), noisy.argmax(-1))

    @staticmethod
    def _truncate(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """-inf for the tokens each row's top-k and top-p leave out; the likeliest token always stays."""
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        probs = ordered.softmax(-1)
        # Drop a token once the mass before it already reaches top_p (even when top_p rounds to 0 in float32).
        drop = ((probs.cumsum(-1) - probs) >= top_p) | ((top_k > 0) & (rank >= top_k))
        drop[:, 0] = False
        return scaled.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
