"""The next token of every sequence in a batch at once, each with its own settings and random stream.

One (batch, vocab) pass per step, whatever the mix of settings: per-row logit bias, repetition, presence and
frequency penalties, a grammar's mask of the tokens it allows, temperature and top-k as tensors, then a draw by
the exponential race (the argmax of probability / Exp(1) noise samples exactly from the distribution). Each
request has its own random generator, seeded with its seed, that fills its row of noise: a seeded request draws
the same numbers, and samples the same tokens, whatever else shares its batch and in whichever row it sits.

Top-p without sorting the vocabulary: a token drawn from the whole distribution is kept when the probability
mass of the tokens likelier than it is below top-p, which is exactly when it is in the nucleus; a row whose draw
falls outside is drawn again from its own generator (a rejection sampler, whose kept draws follow the nucleus
distribution exactly). A row still outside after a few draws (a tiny top-p) takes the sorted path.

Log-probabilities, for the requests that ask, are the model's own (a log-softmax of its logits, before any
setting reshapes them), so they are what a forward pass of the same ids gives.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_FINITE = 1e30
MAX_PENALTY = 1e4
# Below this, dividing float32 logits by the temperature overflows to inf; the distribution is already
# one-hot long before it, so sampling at this floor is indistinguishable from the temperature asked for.
MIN_TEMPERATURE = 1e-4

REDRAWS = 8  # draws a top-p row gets before it takes the sorted path


@dataclass(frozen=True)
class Sampling:
    """One request's sampling settings, checked and clamped once."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None  # None: a random seed
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k likeliest

    @property
    def counts_tokens(self) -> bool:
        """Whether this request's penalties need how often each token was generated."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream (None for greedy, which draws nothing)."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed if self.seed is not None else random.getrandbits(64))
        return generator


# Sampling that draws nothing: the likeliest token, every setting neutral.
GREEDY = Sampling(greedy=True, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=None)


class BatchSampler:
    """The settings of the rows of a batch as device tensors, and each row's generator, kept in row order by
    the batcher."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Sampling] = []
        self.generators: list[torch.Generator | None] = []
        self._tensors: dict[str, torch.Tensor | None] | None = None

    def set_rows(self, rows: list[Sampling], generators: list[torch.Generator | None]) -> None:
        """The batch's rows changed (a sequence joined, left or moved): rebuild the parameter tensors."""
        self.rows, self.generators = rows, generators
        self._tensors = None

    def _params(self) -> dict[str, torch.Tensor | None]:
        if self._tensors is None:
            rows, device = self.rows, self.device
            self._tensors = {
                "greedy": torch.tensor([r.greedy for r in rows], device=device),
                "temperature": torch.tensor([r.temperature for r in rows], device=device)[:, None],
                "top_k": torch.tensor([r.top_k for r in rows], device=device)[:, None],
                "top_p": torch.tensor([r.top_p for r in rows], device=device),
                "penalty": torch.tensor([r.repetition_penalty for r in rows], device=device)[:, None],
                "presence": torch.tensor([r.presence_penalty for r in rows], device=device)[:, None],
                "frequency": torch.tensor([r.frequency_penalty for r in rows], device=device)[:, None],
            }
        return self._tensors

    def _bias(self, vocab: int) -> torch.Tensor | None:
        """The rows' logit biases as one (rows, vocab) tensor; None when no row has one."""
        p = self._params()
        if "bias" not in p:
            entries = [(row, token, bias) for row, r in enumerate(self.rows) for token, bias in r.logit_bias]
            p["bias"] = None
            if entries:
                rows, tokens, values = zip(*entries)
                bias = torch.zeros(len(self.rows), vocab)
                bias[list(rows), list(tokens)] = torch.tensor(values)
                p["bias"] = bias.to(self.device)
        return p["bias"]

    def pick(
        self,
        logits: torch.Tensor,
        seen: torch.Tensor | None,
        counts: torch.Tensor | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The next token of each row, on the device. `logits` (rows, vocab) are the last position's; `seen`
        (rows, vocab) marks the prompt's and the generated tokens, for the repetition penalty (None when no row
        asks for one); `counts` (rows, vocab) how often each token was generated, for the presence and frequency
        penalties (None when no row asks for them); `allowed` (rows, vocab) the tokens each row's grammar allows
        (None when no row has a grammar)."""
        p = self._params()
        logits = logits.float()
        bias = self._bias(logits.shape[-1])
        if bias is not None:
            logits = logits + bias
        if counts is not None:
            logits = logits - p["frequency"] * counts - p["presence"] * (counts > 0)
        if seen is not None:
            penalty = p["penalty"]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            # A tiny penalty divides logits towards inf; keep them finite so the softmax stays defined.
            logits = torch.where(seen, penalized, logits).clamp(min=-_FINITE, max=_FINITE)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        rows = self.rows
        if all(r.greedy for r in rows):
            return argmax(logits)
        scaled = logits / p["temperature"]
        top_k = [r.top_k for r in rows if 0 < r.top_k < logits.shape[-1]]
        if top_k:
            # The k-th largest logit of each row; below it, out (ties at the k-th stay in).
            largest = torch.topk(scaled, max(top_k), dim=-1).values
            kth = largest.gather(1, (p["top_k"] - 1).clamp(0, largest.shape[-1] - 1))
            scaled = scaled.masked_fill((p["top_k"] > 0) & (scaled < kth), float("-inf"))
        probs = scaled.softmax(-1)
        chosen = self._draw(probs, range(len(rows)))
        if any(r.top_p < 1.0 and not r.greedy for r in rows):
            chosen = self._within_nucleus(probs, chosen, p["top_p"])
        return torch.where(p["greedy"], argmax(logits), chosen)

    def _draw(self, probs: torch.Tensor, rows) -> torch.Tensor:
        """One draw from `probs` (rows, vocab) for each of `rows`, each from its row's own generator."""
        uniform = torch.empty_like(probs)
        for i, row in enumerate(rows):
            generator = self.generators[row]
            if generator is None:  # a greedy row: its argmax is taken instead
                uniform[i].fill_(0.5)
            else:
                uniform[i].uniform_(generator=generator)
        race = probs / -torch.log(uniform.clamp(min=1e-12))  # zero-probability tokens never win
        return argmax(race)

    def _within_nucleus(self, probs: torch.Tensor, chosen: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """`chosen`, with the rows whose draw fell outside their top-p nucleus drawn again until it is inside."""
        pending = torch.arange(len(self.rows), device=probs.device)
        greedy = [r.greedy for r in self.rows]
        for _ in range(REDRAWS):
            outside = ~_in_nucleus(probs[pending], chosen[pending], top_p[pending])
            rows = [row for row in pending[outside].tolist() if not greedy[row]]
            if not rows:
                return chosen
            pending = torch.tensor(rows, device=probs.device)
            chosen[pending] = self._draw(probs[pending], rows)
        # A nucleus too small to be hit by chance: cut the distribution at it, then draw once more.
        cut = _truncate(probs[pending], top_p[pending, None])
        chosen[pending] = self._draw(cut, pending.tolist())
        return chosen


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model, and the likeliest tokens' at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, log-probability), likeliest first


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: list[int]) -> list[TokenLogprobs]:
    """The log-probabilities of each row's chosen token in `logits` (rows, vocab), the model's raw ones, and of the
    `top[row]` likeliest tokens, read back in one device-to-host copy for all rows."""
    logprobs = logits.float().log_softmax(-1)
    values, ids = torch.topk(logprobs, max(top, default=0), dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])
    # float64 holds every token id exactly, so one tensor can carry ids and values together
    rows = torch.cat([chosen.double(), tokens[:, None].double(), values.double(), ids.double()], 1).tolist()
    k = values.shape[1]
    return [
        TokenLogprobs(int(row[1]), row[0], tuple((int(i), v) for v, i in zip(row[2 : 2 + n], row[2 + k : 2 + k + n])))
        for row, n in zip(rows, top)
    ]


def rows_logprobs(rows: Sequence[Sampling], logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    """Each row's log-probabilities of its chosen token, for the rows whose request asks for them (None for the
    others)."""
    asking = [row for row, sampling in enumerate(rows) if sampling.logprobs is not None]
    reports: list[TokenLogprobs | None] = [None] * len(rows)
    if asking:
        index = torch.tensor(asking, device=logits.device)
        top = [rows[row].logprobs for row in asking]
        for row, report in zip(asking, logprobs_of(logits[index], tokens[index], top)):
            reports[row] = report
    return reports


def penalty_state(
    rows: Sequence[Sampling],
    seen_tokens: Sequence[Sequence[int] | torch.Tensor],
    generated: Sequence[Sequence[int] | torch.Tensor],
    vocab: int,
    device: torch.device,
    *,
    seen: bool = False,
    counts: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The penalties' state of each row, as `BatchSampler.pick` takes it: `seen` (rows, vocab) marks the tokens
    of `seen_tokens` (a row's prompt and what it generated), made when a row asks for the repetition penalty or
    `seen` says so; `counts` (rows, vocab) how often each token of `generated` came, made when a row asks for the
    presence or frequency penalty or `counts` says so. None for a state nobody needs."""
    seen_state = counts_state = None
    if seen or any(r.repetition_penalty != 1.0 for r in rows):
        seen_state = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for row, tokens in enumerate(seen_tokens):
            if len(tokens):
                seen_state[row, torch.as_tensor(tokens, device=device)] = True
    if counts or any(r.counts_tokens for r in rows):
        counts_state = torch.zeros(len(rows), vocab, device=device)
        for row, tokens in enumerate(generated):
            if len(tokens):
                index = torch.as_tensor(tokens, device=device)
                counts_state[row].index_add_(0, index, torch.ones(len(index), device=device))
    return seen_state, counts_state


def keep_chosen(seen: torch.Tensor | None, counts: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """The penalties' state of each row updated with the token it just chose (`tokens`, one a row)."""
    if seen is None and counts is None:
        return
    picked = torch.arange(len(tokens), device=tokens.device)
    if seen is not None:
        seen[picked, tokens] = True
    if counts is not None:
        counts[picked, tokens] += 1


ARGMAX_BLOCK = 1024  # vocabulary entries per block of the CPU's argmax


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` of (rows, vocab) scores; on a CPU, where argmax runs one element at a time but amax is
    vectorized, in a tenth of the time: the block that holds each row's maximum, then the maximum within it.
    Ties go to the lowest index, as argmax's do."""
    rows, vocab = scores.shape
    whole = vocab - vocab % ARGMAX_BLOCK
    if scores.device.type != "cpu" or whole < 2 * ARGMAX_BLOCK:
        return scores.argmax(-1)
    blocks = scores[:, :whole].unflatten(-1, (-1, ARGMAX_BLOCK))
    block_max = blocks.amax(-1)
    block = block_max.argmax(-1)
    index = block * ARGMAX_BLOCK + blocks[torch.arange(rows), block].argmax(-1)
    if whole == vocab:
        return index
    tail = scores[:, whole:]
    in_tail = tail.amax(-1) > block_max.amax(-1)
    return torch.where(in_tail, whole + tail.argmax(-1), index)


def _in_nucleus(probs: torch.Tensor, chosen: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Whether each row's chosen token is in its nucleus: the mass of the tokens likelier than it is below top-p
    (the likeliest token always is, even when top-p rounds to 0 in float32)."""
    own = probs.gather(1, chosen[:, None])
    likelier = torch.where(probs > own, probs, 0.0).sum(-1)
    return (likelier < top_p) | (likelier == 0) | (top_p >= 1.0)


def _truncate(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The rows' probabilities outside their top-p nucleus set to 0, by sorting (the slow, exact path)."""
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    drop = (ordered.cumsum(-1) - ordered) >= top_p
    drop[:, 0] = False
    return probs.scatter(-1, order, ordered.masked_fill(drop, 0.0))
