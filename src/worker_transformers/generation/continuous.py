"""Transformers' own continuous batching (`ContinuousBatchingManager`) as an engine: its paged KV cache, scheduler
and chunked prefill, with the worker's sampler and text handling.

The manager runs the model on a thread of its own; requests go straight into its queue, and this engine's thread
turns the tokens it streams back into each request's text (`Sequence.accept`, as every engine does). The tokens are
chosen by the worker's own sampler (sampling.py), run as the manager's per-request logits step: it leaves only
its choice standing and the manager, running greedy, keeps it. So every sampling setting, each request's seed,
its grammar and its log-probabilities behave exactly as under the other engines, and a seeded request samples the
same tokens whatever shares its batch. The manager runs ahead of this engine's thread, so the step keeps what it
needs of its own: a copy of each request's grammar, advanced by the tokens the manager reports as generated, and
the log-probabilities it computed, until the request takes its token. That step runs Python on the host for
every batch, so the manager's CUDA graphs stay off.

A failure inside the manager ends its loop and fails every request in it (it cannot tell which request caused
it), so an out-of-memory error fails the whole batch, as one event; the engine then starts a fresh manager for
the requests that come next.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import ClassVar

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from worker_transformers.config import ConfigError
from worker_transformers.generation.engine import Engine, new_oom_event
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.grammar import Grammar, allowed_tokens
from worker_transformers.generation.sampling import GREEDY, BatchSampler, TokenLogprobs, penalty_state, rows_logprobs

log = logging.getLogger(__name__)

PAGE_TOKENS = 32  # tokens per cache page: small pages waste little on short requests
# Tokens one forward takes at most (prompts are prefilled in chunks of it): its attention masks span the whole cache.
MAX_BATCH_TOKENS = 1024
_POLL_S = 0.05  # how often the thread checks on the manager while it streams nothing


class _WorkerSampler(ContinuousBatchingLogitsProcessor):
    """The worker's BatchSampler as the manager's logits step: for each row, every token but the sampler's
    choice gets -inf."""

    supported_kwargs: ClassVar[dict[str, type]] = {}
    ignored_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, sequences: dict[str, Sequence], device: torch.device) -> None:
        self._sequences = sequences
        self._sampler = BatchSampler(device)
        self._rows: tuple[str, ...] = ()
        self._tokens: list[list[int]] = []  # each row's prompt and generated tokens, for the repetition penalty
        self._generated: list[list[int]] = []  # each row's generated tokens, for the presence and frequency penalties
        self._grammars: list[Grammar | None] = []  # each row's grammar, as of the tokens generated so far
        # Every request's grammar copy and how many of its tokens it has taken; kept by request id.
        self.grammars: dict[str, tuple[Grammar, list[int]]] = {}
        # The log-probabilities of each request's tokens not yet taken: request id -> token index -> them.
        self.logprobs: dict[str, dict[int, TokenLogprobs]] = {}
        self.peak_batch = 0

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        """Called on the manager's thread before each forward, with the requests whose logits it will hand to
        `__call__`, in row order."""
        states = [future.state for future in requests_with_new_token]
        rows = tuple(state.request_id for state in states)
        if rows != self._rows:
            # A request cancelled since it was scheduled samples greedily: nobody reads its token.
            sequences = [self._sequences.get(row) for row in rows]
            self._sampler.set_rows(
                [s.sampling if s else GREEDY for s in sequences], [s.generator if s else None for s in sequences]
            )
            self._rows = rows
        self._tokens = [
            state.initial_tokens + state.generated_tokens if sampling.repetition_penalty != 1.0 else []
            for state, sampling in zip(states, self._sampler.rows)
        ]
        self._generated = [
            list(state.generated_tokens) if sampling.counts_tokens else []
            for state, sampling in zip(states, self._sampler.rows)
        ]
        self._grammars = [self._advanced_grammar(state) for state in states]
        self._positions = [(state.request_id, len(state.generated_tokens)) for state in states]
        self.peak_batch = max(self.peak_batch, len(rows))
        return torch.zeros(len(rows), dtype=torch.int32)

    def release(self, request_id: str) -> None:
        """Forget what was kept for a request that left the manager."""
        self.grammars.pop(request_id, None)
        self.logprobs.pop(request_id, None)

    def _advanced_grammar(self, state) -> Grammar | None:
        """The request's grammar copy, fed the tokens generated since the last step."""
        held = self.grammars.get(state.request_id)
        if held is None:
            return None
        grammar, taken = held
        for token in state.generated_tokens[taken[0] :]:
            grammar.consume(token)
        taken[0] = len(state.generated_tokens)
        return grammar

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, samplings = len(self._rows), self._sampler.rows
        vocab = scores.shape[-1]
        seen, counts = penalty_state(samplings, self._tokens, self._generated, vocab, scores.device)
        chosen = self._sampler.pick(scores[:rows], seen, counts, allowed_tokens(self._grammars, vocab, scores.device))
        for row, report in enumerate(rows_logprobs(samplings, scores[:rows], chosen)):
            request_id, position = self._positions[row]
            if report is not None and request_id in self._sequences:  # not a request cancelled since scheduled
                self.logprobs.setdefault(request_id, {})[position] = report
        kept = torch.full_like(scores, float("-inf"))
        kept[:rows].scatter_(1, chosen[:, None], 0.0)
        kept[rows:] = scores[rows:]  # padding rows, whose tokens the manager drops
        return kept


class ContinuousEngine(Engine):
    """Requests in, through transformers' ContinuousBatchingManager, tokens out to each Sequence."""

    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int,
        eos_ids: set[int],
        token_budget: int,
        longest_request: int,
    ) -> None:
        super().__init__("continuous-batching", model, eos_ids)
        self._sequences: dict[str, Sequence] = {}  # by request id, while the manager holds them
        self._lock = threading.Lock()
        self._oom_event: int | None = None  # the out-of-memory event of the manager running now, once it has one
        # The cache is allocated up front: as much as `max_batch` of the longest requests can use, within the
        # budget, and never less than one longest request. The manager counts more than the cache against the
        # device's memory (its attention masks grow with the cache): while it finds the cache too large, half of it
        # is tried.
        shortest = -(-longest_request // PAGE_TOKENS) * PAGE_TOKENS
        tokens = max(shortest, -(-min(token_budget, max_batch * longest_request) // PAGE_TOKENS) * PAGE_TOKENS)
        while True:
            self.cache_tokens = tokens
            # What it can always decode together, however long each request gets: what the SDK is told.
            self.max_batch = max(1, min(max_batch, tokens // longest_request))
            self._manager = self._start_manager()
            if not isinstance(error := self._manager_ready(), MemoryError):
                break
            self._manager.stop(block=True)
            if tokens == shortest:
                raise ConfigError(
                    f"ENGINE=continuous: transformers' continuous batching cannot fit one request of {longest_request} "
                    f"tokens (MAX_INPUT_TOKENS + MAX_NEW_TOKENS) in this device's memory ({error}); lower them, or "
                    "use ENGINE=batch"
                )
            log.info("continuous batching: a cache of %d tokens does not fit (%s); trying half", tokens, error)
            tokens = max(shortest, tokens // 2 // PAGE_TOKENS * PAGE_TOKENS)
        self._thread.start()

    @property
    def max_request_tokens(self) -> int:
        """The largest reservation (prompt and new tokens) one request can have: the whole cache."""
        return self.cache_tokens

    @property
    def peak_batch(self) -> int:
        return self._sampler.peak_batch

    def _manager_ready(self) -> BaseException | None:
        """Wait until the manager has allocated its cache; the error that stopped it, if one did."""
        status = self._manager.background_thread_status
        while self._manager.batch_processor is None and status.fatal_error is None:
            time.sleep(_POLL_S)
        return status.fatal_error

    def _start_manager(self):
        generation = GenerationConfig(
            do_sample=False,  # the sampler's choice is the only token left standing
            eos_token_id=sorted(self.eos_ids) or -1,
            pad_token_id=self.model.generation_config.pad_token_id,
        )
        batching = ContinuousBatchingConfig(
            page_size=PAGE_TOKENS,
            num_blocks=self.cache_tokens // PAGE_TOKENS,
            max_requests_per_batch=self.max_batch,
            max_batch_tokens=MAX_BATCH_TOKENS,
            use_cuda_graph=False,  # the sampler runs on the host each step
            use_async_batching=False,  # the sampler reads each request's tokens as of the step it samples
            allow_block_sharing=False,
        )
        manager = self.model.init_continuous_batching(generation, batching)
        self._sampler = _WorkerSampler(self._sequences, self.device)
        # Transformers offers no public way to hand the manager a logits step of one's own: it builds its list from
        # the generation config, before the loop starts, and reads it once the loop does.
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([self._sampler]))
        processors.tensors_required = 1  # the one row of per-request arguments the manager allocates for it
        manager.logit_processor = processors
        manager.start()
        return manager

    def cancel(self, sequence: Sequence) -> None:
        super().cancel(sequence)
        self._forget(sequence)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._sequences)

    def _forget(self, sequence: Sequence) -> None:
        """Take the request out of the manager: it was cancelled, or finished on a stop string."""
        request_id = _request_id(sequence)
        with self._lock:
            held = self._sequences.pop(request_id, None)
            self._sampler.release(request_id)
        if held is not None:
            self._manager.cancel_request(request_id)

    def submit(self, sequence: Sequence) -> None:
        """Hand the request to the manager at once (its queue is thread-safe); the engine's thread keeps it only
        while no manager is running."""
        with self._lock:
            if self._hand_over(sequence):
                return
        super().submit(sequence)

    def _hand_over(self, sequence: Sequence) -> bool:
        """Whether the manager took the request. Called with the lock held, so that no manager is replaced
        between the request's registration and its arrival."""
        request_id = _request_id(sequence)
        self._sequences[request_id] = sequence
        if sequence.grammar is not None:
            self._sampler.grammars[request_id] = (sequence.grammar.copy(), [0])
        added = self._manager.add_request(
            sequence.prompt_ids,
            request_id=request_id,
            max_new_tokens=sequence.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(self.eos_ids) or -1,
        )
        if added is None:  # the manager's loop has ended: the next one takes it
            del self._sequences[request_id]
            self._sampler.release(request_id)
        return added is not None

    # The engine's thread

    def _run(self) -> None:
        while True:
            with self._wake:
                if self._closed and not self._waiting and not self._sequences:
                    break
                waiting = [s for s in self._waiting if not s.cancelled]
                self._waiting.clear()
            with self._lock:
                refused = [sequence for sequence in waiting if not self._hand_over(sequence)]
            with self._wake:
                self._waiting.extendleft(reversed(refused))
            output = self._manager.get_result(timeout=_POLL_S)
            if output is not None:
                self._deliver(output)
            elif self._manager.background_thread_status.fatal_error is not None:
                self._recover()
        self._manager.stop(block=True)

    def _deliver(self, output: GenerationOutput) -> None:
        with self._lock:
            sequence = self._sequences.get(output.request_id)
        if sequence is None:  # cancelled since
            return
        if output.status == RequestStatus.FAILED:
            return self._fail(output)
        for index in range(len(sequence.generated), len(output.generated_tokens)):
            if sequence.finished:
                break
            report = self._sampler.logprobs.get(output.request_id, {}).pop(index, None)
            sequence.accept(output.generated_tokens[index], self.eos_ids, report)
        if output.is_finished() and not sequence.finished:  # a limit of the manager's own
            sequence.finish("length")
        if sequence.finished:
            if output.is_finished():
                with self._lock:
                    self._sequences.pop(output.request_id, None)
                    self._sampler.release(output.request_id)
            else:
                self._forget(sequence)

    def _fail(self, output: GenerationOutput) -> None:
        """The manager failed this request: with the exception that ended its loop, when one did."""
        error = self._manager.background_thread_status.fatal_error
        if error is None:
            error = RuntimeError(output.error)
        with self._lock:
            sequence = self._sequences.pop(output.request_id, None)
            self._sampler.release(output.request_id)
        if sequence is not None:
            sequence.fail(error, self._event_of(error))

    def _recover(self) -> None:
        """The manager's loop ended on an error: fail what it still held (one out-of-memory event for all of
        them), then start a fresh manager for the requests to come."""
        error = self._manager.background_thread_status.fatal_error
        log.error("continuous batching failed (%s); starting a fresh manager", type(error).__name__)
        while (output := self._manager.get_result(timeout=0)) is not None:
            if output.status == RequestStatus.FAILED:
                self._fail(output)
        with self._lock:  # no request joins the failed manager meanwhile
            stranded = list(self._sequences.values())
            self._sequences.clear()
            for sequence in stranded:
                sequence.fail(error, self._event_of(error))
            self._manager.stop(block=True)
            self._release_memory()
            self._manager = self._start_manager()
            self._oom_event = None

    def _event_of(self, error: BaseException) -> int | None:
        """The out-of-memory event `error` belongs to: every request one manager fails counts once."""
        if not isinstance(error, torch.OutOfMemoryError):
            return None
        if self._oom_event is None:
            self._oom_event = new_oom_event()
        return self._oom_event


def _request_id(sequence: Sequence) -> str:
    return f"request-{sequence.arrival}"
