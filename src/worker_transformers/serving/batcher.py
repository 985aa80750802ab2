"""Continuous batching: one thread runs the model for every request in flight.

A new request is prefilled on its own (so its prompt is computed exactly as if it were alone), then its KV
cache joins the running batch, left-padded to a common length with an attention mask hiding the padding.
Each step decodes one token for every sequence in the batch at once; a sequence leaves the batch the step it
finishes or is cancelled, and the common padding is trimmed. Requests that arrive while the batch is full
wait their turn.

Models whose cache is not a plain per-layer key/value store (sliding-window, hybrid or recurrent layers)
cannot have caches joined this way; for those the batch holds one sequence at a time.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from worker_transformers.serving.sampling import Sampler
from worker_transformers.serving.textstream import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    text: str  # the last piece of text, held back until now
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | Done | Failed


@dataclass(eq=False)
class Sequence:
    """One request in flight. `emit` delivers events to whoever waits for them, from the batcher thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    text: TextStream
    emit: Callable[[Event], None]
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False  # set by the consumer when nobody wants the rest any more
    finished: bool = False
    _seen: torch.Tensor | None = None  # prompt + generated ids on the device, for the repetition penalty


class Batcher:
    def __init__(self, model: PreTrainedModel, max_batch: int, eos_ids: set[int]) -> None:
        self.model = model
        self.max_batch = max_batch
        self.eos_ids = eos_ids
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._active: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (batch, cached length): 1 for real tokens, 0 for padding
        self.peak_batch = 0  # the most sequences decoded together so far (for tests and benchmarks)
        self.can_join = self._probe_cache()
        if not self.can_join:
            log.info("this model's cache cannot be joined across requests: one sequence at a time")
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread once every request submitted so far is done."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()

    def cancel(self, sequence: Sequence) -> None:
        sequence.cancelled = True
        with self._wake:
            self._wake.notify()

    def in_flight(self) -> int:
        return len(self._active) + len(self._waiting)

    @torch.inference_mode()
    def _probe_cache(self) -> bool:
        """Run one token through the model to see which kind of cache it builds."""
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        return _joinable(self.model(input_ids=probe, use_cache=True, logits_to_keep=1).past_key_values)

    # The batcher thread

    def _run(self) -> None:
        while (admitted := self._admit()) is not None:
            try:
                with torch.inference_mode():
                    for sequence in admitted:
                        self._prefill(sequence)
                    self._retire()
                    if self._active:
                        self._decode_step()
                        self._retire()
            except torch.OutOfMemoryError as error:
                # Expected under memory pressure, not a bug: one line, then give the memory back.
                tokens = 0 if self._mask is None else self._mask.numel()
                log.error(
                    "out of memory with %d requests in flight (%d cached tokens); failing them and freeing the cache",
                    len(self._active) + len(admitted),
                    tokens,
                )
                self._fail_all(error, admitted)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as error:  # noqa: BLE001 - the thread must survive; every caller gets the error
                log.exception("generation failed; failing the %d requests in flight", len(self._active))
                self._fail_all(error, admitted)

    def _admit(self) -> list[Sequence] | None:
        """Requests that join the batch now (waiting while there is nothing to do); None once closed and idle."""
        with self._wake:
            while not self._waiting and not self._active:
                if self._closed:
                    return None
                self._wake.wait()
            capacity = self.max_batch if self.can_join else 1
            admitted = []
            while self._waiting and len(self._active) + len(admitted) < capacity:
                sequence = self._waiting.popleft()
                if not sequence.cancelled:
                    admitted.append(sequence)
            return admitted

    def _prefill(self, sequence: Sequence) -> None:
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        sequence._seen = ids[0]
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self._accept(sequence, out.logits[0, -1])
        if not sequence.finished:
            self._join(sequence, out.past_key_values)

    def _join(self, sequence: Sequence, cache: DynamicCache) -> None:
        length = len(sequence.prompt_ids)
        if self._cache is None:
            self._cache, self._mask = cache, torch.ones(1, length, dtype=torch.long, device=self.device)
        else:
            total = max(self._mask.shape[1], length)
            # Layer by layer, so that beside the cache only one layer's new copy exists at any moment.
            for old, new in zip(self._cache.layers, cache.layers):
                old.keys, new.keys = _stack_right_aligned(old.keys, new.keys, total), None
                old.values, new.values = _stack_right_aligned(old.values, new.values, total), None
            new_mask = torch.ones(1, length, dtype=torch.long, device=self.device)
            self._mask = _stack_right_aligned(self._mask, new_mask, total)
        self._active.append(sequence)
        self.peak_batch = max(self.peak_batch, len(self._active))

    def _decode_step(self) -> None:
        last = torch.tensor([[s.generated[-1]] for s in self._active], device=self.device)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.generated) - 1] for s in self._active], device=self.device)
        self._mask = torch.cat([self._mask, torch.ones_like(last)], dim=1)
        out = self.model(
            input_ids=last,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        logits = out.logits[:, -1]
        for row, sequence in enumerate(self._active):
            self._accept(sequence, logits[row])

    def _accept(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Pick the sequence's next token, turn it into text and decide whether the sequence is done."""
        token = sequence.sampler.pick(logits, sequence._seen)
        sequence.generated.append(token)
        if sequence.sampler.repetition_penalty != 1.0:
            sequence._seen = torch.cat([sequence._seen, torch.tensor([token], device=self.device)])
        if token in self.eos_ids:
            return self._finish(sequence, "stop")
        sequence.text.push(token)
        if sequence.text.stopped:
            return self._finish(sequence, "stop")
        if len(sequence.generated) >= sequence.max_new_tokens:
            return self._finish(sequence, "length")
        delta = sequence.text.release()
        if delta:
            sequence.emit(Delta(delta))

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.text.finish()
        sequence.finished = True
        prompt_tokens = len(sequence.prompt_ids)
        sequence.emit(Done(sequence.text.release(final=True), reason, prompt_tokens, len(sequence.generated)))

    def _retire(self) -> None:
        """Drop finished and cancelled sequences from the batch, and the padding no sequence needs any more."""
        keep = [i for i, s in enumerate(self._active) if not (s.finished or s.cancelled)]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        unused = int((self._mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are all padding
        self._mask = self._mask[:, unused:]
        for layer in self._cache.layers:  # one layer at a time, as in _join
            layer.keys = layer.keys[index, :, unused:]
            layer.values = layer.values[index, :, unused:]

    def _fail_all(self, error: BaseException, admitted: list[Sequence]) -> None:
        for sequence in dict.fromkeys([*self._active, *admitted]):
            if not sequence.finished:
                sequence.finished = True
                sequence.emit(Failed(error))
        self._active, self._cache, self._mask = [], None, None


def _joinable(cache: object) -> bool:
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _stack_right_aligned(batch: torch.Tensor, extra: torch.Tensor, total: int) -> torch.Tensor:
    """`batch` and `extra` stacked on dim 0, each right-aligned in a sequence dim of `total` (the last dim
    for masks, dim 2 for keys and values), zeros in front: the left padding the attention mask hides."""
    dim = 1 if batch.dim() == 2 else 2
    shape = list(batch.shape)
    shape[0], shape[dim] = batch.shape[0] + extra.shape[0], total
    out = batch.new_zeros(shape)
    out[: batch.shape[0]].narrow(dim, total - batch.shape[dim], batch.shape[dim]).copy_(batch)
    out[batch.shape[0] :].narrow(dim, total - extra.shape[dim], extra.shape[dim]).copy_(extra)
    return out
