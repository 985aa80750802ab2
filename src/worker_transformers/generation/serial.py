"""One request at a time through the model's own `generate`: the engine for models whose state cannot be batched.

Recurrent and hybrid models (Mamba, RecurrentGemma, Jamba, ...) keep a state per sequence that `generate` knows
how to build and advance, and that no shared key/value layout describes. So they are served one request at a
time, exactly as `generate` would answer, with the same behaviour as the batcher: each token is chosen by the
same sampler (a logits processor that leaves only its choice standing, so `generate` runs greedy and keeps
it), turned into text, checked for stop strings and cancellation after every step. An image request's processed
images go to `generate` as its processor made them.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import LogitsProcessor, PreTrainedModel, StoppingCriteria

from worker_transformers.generation.engine import Engine
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.grammar import allowed_tokens
from worker_transformers.generation.sampling import BatchSampler, TokenLogprobs, penalty_state, rows_logprobs

log = logging.getLogger(__name__)


class _Choose(LogitsProcessor):
    """Picks the next token with the request's sampler; every other token gets -inf. Keeps the chosen token's
    log-probabilities, when the request asks for them, for _Accept to hand over with the token."""

    def __init__(self, sequence: Sequence, device: torch.device) -> None:
        self.sequence = sequence
        self.sampler = BatchSampler(device)
        self.sampler.set_rows([sequence.sampling], [sequence.generator])
        self.prompt_length = len(sequence.prompt_ids)
        self.logprobs: TokenLogprobs | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = self.sampler.rows
        vocab = scores.shape[-1]
        seen, counts = penalty_state(rows, input_ids, input_ids[:, self.prompt_length :], vocab, scores.device)
        token = self.sampler.pick(scores, seen, counts, allowed_tokens([self.sequence.grammar], vocab, scores.device))
        [self.logprobs] = rows_logprobs(rows, scores, token)
        return torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)


class _Accept(StoppingCriteria):
    """Hands each new token to the request, and stops `generate` once the request is done or cancelled."""

    def __init__(self, sequence: Sequence, eos_ids: set[int], choose: _Choose) -> None:
        self.sequence = sequence
        self.eos_ids = eos_ids
        self.choose = choose

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        sequence = self.sequence
        if not sequence.finished:
            sequence.accept(int(input_ids[0, -1]), self.eos_ids, self.choose.logprobs)
        done = sequence.finished or sequence.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class SerialEngine(Engine):
    """The serial engine: a request at a time through `generate`, which allocates as it goes (no budget to fit)."""

    max_batch = 1

    def __init__(self, model: PreTrainedModel, eos_ids: set[int], pad_id: int | None) -> None:
        super().__init__("serial-generate", model, eos_ids)
        self.config = copy.deepcopy(model.generation_config)
        # Sampling is _Choose's; generate only keeps its choice.
        self.config.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=None, repetition_penalty=1.0)
        self.config.eos_token_id = sorted(eos_ids) or None
        if self.config.pad_token_id is None:
            self.config.pad_token_id = pad_id if pad_id is not None else next(iter(sorted(eos_ids)), 0)
        self._current: Sequence | None = None
        self._thread.start()

    def in_flight(self) -> int:
        return len(self._waiting) + (self._current is not None)

    def _next(self) -> Sequence | None:
        with self._wake:
            while True:
                while self._waiting:
                    sequence = self._waiting.popleft()
                    if not sequence.cancelled:
                        self._current = sequence
                        return sequence
                if self._closed:
                    return None
                self._wake.wait()

    def _run(self) -> None:
        while (sequence := self._next()) is not None:
            self.peak_batch = 1
            try:
                self._generate(sequence)
            except torch.OutOfMemoryError as error:
                log.error(
                    "out of memory generating for a %d-token prompt; failing that request", len(sequence.prompt_ids)
                )
                sequence.fail(error, self._out_of_memory())
            except Exception as error:  # noqa: BLE001 - the thread must survive; the caller gets the error
                log.exception("generation failed")
                sequence.fail(error)
            finally:
                self._current = None

    @torch.inference_mode()
    def _generate(self, sequence: Sequence) -> None:
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        config = copy.copy(self.config)
        config.max_new_tokens = sequence.max_new_tokens
        choose = _Choose(sequence, self.device)
        pixels = sequence.pixels.arguments(set(sequence.pixels.tensors), self.device) if sequence.pixels else {}
        self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **pixels,
            generation_config=config,
            logits_processor=[choose],
            stopping_criteria=[_Accept(sequence, self.eos_ids, choose)],
        )
        if not sequence.finished and not sequence.cancelled:  # generate stopped on a limit of its own
            sequence.finish("length")
