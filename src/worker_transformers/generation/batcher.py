"""Continuous batching: one thread runs the model for every request in flight, over a slot cache (slot_cache.py).

Each turn of the loop prefills the requests that arrived, all in one forward (left-padded, written straight into
their cache rows; requests with the same prompt, such as one request's n choices, share one row's prefill, copied
to the others; prompts that start alike, as a chat template's system prompt makes them, compute that prefix once
in a forward of its own and copy it), then decodes one token for every sequence in the batch at once. A sequence
leaves the batch the step it finishes or is cancelled, and a waiting one takes its row. The step's inputs stay on
the device: the tokens just chosen are the next step's input and positions advance in place, so the host reads
back only the chosen tokens, once per step.

A prompt longer than PREFILL_TOKENS is prefilled in chunks of PREFILL_TOKENS, one chunk a turn, into a row after
the batch's, and the batch decodes its step between each two chunks; the requests behind it wait, and it joins
the batch (with its n choices, which share its chunks) at its last chunk, whose logits give its first token. Its
tokens are laid out where an unchunked prefill would have put them, so its answer is the one it would have been,
sliding windows included: every mask comes from the tokens' positions, never from their columns.

Requests are admitted while their worst-case cache (prompt plus every token they may generate, in the slot
layout's rows and columns) fits the KV budget worked out at startup, and at most `max_batch` at once; a prefill
takes at most PREFILL_TOKENS tokens per turn, left padding included, a long prompt's chunk too, so that arrivals
delay the running streams by one bounded forward whatever their length. An out-of-memory error stays with the
requests that caused it: a prefill that runs out is retried one request at a time and fails only the one that does
not fit, a chunk that runs out fails its request; a decode step that runs out sheds the newest requests, each told
why, until the step fits.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from worker_transformers.generation.events import EngineThread, Sequence
from worker_transformers.generation.grammar import allowed_tokens
from worker_transformers.generation.sampling import BatchSampler, TokenLogprobs, logprobs_of
from worker_transformers.generation.slot_cache import SlotCache, attention_masks, decode_masks

log = logging.getLogger(__name__)

PREFILL_TOKENS = 4096  # tokens of one turn's prefill, padding included (a longer prompt goes in chunks of it)
# The slot layout gives every row as many columns as the longest sequence spans, and reclaims columns only once
# half of them are free: this many times the longest reservation per row bounds what it allocates.
LAYOUT_SLACK = 2
# Requests that join together and start with this many tokens alike or more (a chat template's system prompt,
# one request's n choices) compute those once, in a forward of their own, and copy their keys and values.
SHARED_PREFIX_MIN = 16
_oom_events = itertools.count(1)


@dataclass(frozen=True)
class _Asks:
    """Whether any request in the batch has a grammar, and whether any asks for log-probabilities."""

    grammar: bool
    logprobs: bool


class ShedForMemory(torch.OutOfMemoryError):
    """This request was dropped so that the others in its batch could go on when the device ran out of memory."""


@dataclass
class _Chunks:
    """A prompt longer than PREFILL_TOKENS, prefilled a chunk per turn into a row after the batch's, for the
    requests that share it (a request's n choices): they join the batch at its last chunk."""

    sequences: list[Sequence]
    row: int
    start: int  # the column of the prompt's first token; it ends at `end`, where its row's first decode step goes
    done: int = 0  # the prompt's tokens prefilled so far

    @property
    def prompt(self) -> list[int]:
        return self.sequences[0].prompt_ids

    @property
    def end(self) -> int:
        return self.start + len(self.prompt)


class Batcher(EngineThread):
    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int,
        eos_ids: set[int],
        num_layers: int,
        windows: dict[str, int | None],
        token_budget: int | None = None,
        start: bool = True,
    ) -> None:
        super().__init__("batcher")
        self.model = model
        # Read once: the model's own properties look through its parameters each time, a cost in every step.
        self.device, self.dtype = model.device, model.dtype
        self.max_batch = max_batch
        self.eos_ids = eos_ids
        self.windows = windows
        self.token_budget = token_budget  # cache tokens (rows x columns) the batch may occupy; None: no limit
        self.additive_masks = model.config._attn_implementation != "sdpa"
        self._active: list[Sequence] = []  # in row order
        self._starts: list[int] = []  # each row's first cache column
        self._column = 0  # where the next decode step writes
        self._chunks: _Chunks | None = None  # the prompt being prefilled in chunks, if any
        self._cache = SlotCache(num_layers, 0, 0, self.device)
        self._last = self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._seen: torch.Tensor | None = None  # (rows, vocab): the repetition penalty's tokens, when one asks
        self._counts: torch.Tensor | None = None  # (rows, vocab): generated tokens' counts, when a penalty asks
        self._sampler = BatchSampler(self.device)
        self._batch_asks = _Asks(grammar=False, logprobs=False)  # what the rows in the batch ask for
        self.peak_batch = 0  # the most sequences decoded together so far (for tests and benchmarks)
        if start:  # not for choice.py's check, which drives the steps itself
            self._thread.start()

    def cancel(self, sequence: Sequence) -> None:
        sequence.cancelled = True
        with self._wake:
            self._wake.notify()

    def in_flight(self) -> int:
        chunks = self._chunks
        return len(self._active) + len(self._waiting) + (len(chunks.sequences) if chunks is not None else 0)

    @property
    def max_request_tokens(self) -> int | None:
        """The largest reservation (prompt and new tokens) a request alone can have here; None: no limit."""
        return None if self.token_budget is None else self.token_budget // LAYOUT_SLACK

    # The batcher thread

    @torch.inference_mode()
    def _run(self) -> None:
        while (joining := self._admit()) is not None:
            try:
                if joining and len(joining[0].prompt_ids) > PREFILL_TOKENS:
                    self._chunks = self._chunks_of(joining)
                if self._chunks is not None:
                    self._prefill_chunk_safely()
                    self._retire()
                elif joining:
                    self._prefill_safely(joining)
                    self._retire()  # answers that ended at their first token
                if self._active:
                    self._decode_safely()
                self._retire()
            except Exception as error:  # noqa: BLE001 - the thread must survive; every caller gets the error
                log.exception("generation failed; failing the %d requests in flight", len(self._active))
                self._fail_all(error, joining)

    def _admit(self) -> list[Sequence] | None:
        """Requests that join the batch now (waiting while there is nothing to do); None once closed and idle."""
        with self._wake:
            while not self._waiting and not self._active and self._chunks is None:
                if self._closed:
                    return None
                self._wake.wait()
            admitted: list[Sequence] = []
            if self._chunks is not None:
                return admitted  # the others wait behind the prompt being prefilled in chunks
            longest = 0  # the prefill's rows are padded to its longest prompt
            while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                sequence = self._waiting[0]
                if sequence.cancelled:
                    self._waiting.popleft()
                    continue
                if longest > PREFILL_TOKENS:  # prefilled in chunks, with only the requests that share its prompt
                    if sequence.prompt_ids != admitted[0].prompt_ids:
                        break
                elif admitted and (len(admitted) + 1) * max(longest, len(sequence.prompt_ids)) > PREFILL_TOKENS:
                    break
                if not self._within_budget([*self._active, *admitted, sequence]):
                    break
                admitted.append(self._waiting.popleft())
                longest = max(longest, len(sequence.prompt_ids))
            return admitted

    def _within_budget(self, sequences: list[Sequence]) -> bool:
        if self.token_budget is None:
            return True
        return len(sequences) * LAYOUT_SLACK * max(s.reserved_tokens for s in sequences) <= self.token_budget

    def _prefill_safely(self, joining: list[Sequence]) -> None:
        try:
            self._prefill(joining)
        except torch.OutOfMemoryError as error:
            self._release_memory()
            if len(joining) == 1:
                event = next(_oom_events)
                log.error(
                    "out of memory prefilling a %d-token prompt; failing that request", len(joining[0].prompt_ids)
                )
                joining[0].fail(error, event)
                return
            for sequence in joining:  # one at a time: only the request that does not fit fails
                self._prefill_safely([sequence])

    def _prefill_chunk_safely(self) -> None:
        chunks = self._chunks
        chunks.sequences = [s for s in chunks.sequences if not s.cancelled]
        if not chunks.sequences:  # nobody wants its answer any more
            return self._drop_chunks()
        try:
            self._prefill_chunk(chunks)
        except torch.OutOfMemoryError as error:
            self._release_memory()
            self._drop_chunks()
            log.error("out of memory prefilling a %d-token prompt in chunks; failing that request", len(chunks.prompt))
            event = next(_oom_events)
            for sequence in chunks.sequences:
                sequence.fail(error, event)

    def _decode_safely(self) -> None:
        event = None
        while self._active:
            try:
                return self._decode_step()
            except torch.OutOfMemoryError:
                self._release_memory()
                event = event or next(_oom_events)
                newest = max(range(len(self._active)), key=lambda row: self._active[row].arrival)
                log.error(
                    "out of memory decoding %d sequences (%d cache columns); shedding the newest request",
                    len(self._active),
                    self._column,
                )
                self._active[newest].fail(_shed(), event)
                self._retire()

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _prefill(self, joining: list[Sequence]) -> None:
        joining, sources = _sharing_prompts(joining)
        computed = len(joining) - len(sources)  # the rows the forward fills; the others copy one of them
        rows = len(self._active)
        longest = max(len(s.prompt_ids) for s in joining)
        self._make_room(rows + len(joining), longest)
        end = max(self._column, longest)  # the prompts end at the column the batch writes next
        start = end - longest
        cache = self._cache
        new_rows, computed_rows = slice(rows, rows + len(joining)), slice(rows, rows + computed)
        cache.positions[new_rows] = -1
        shared = _shared_prefix(joining[:computed])
        try:
            if shared:
                self._prefill_prefix(joining[0].prompt_ids[:shared], computed_rows, start)
            logits = self._prefill_rows(joining[:computed], computed_rows, shared, end)
        except BaseException:
            cache.positions[new_rows] = -1
            raise
        # each row's first column: where its prompt begins, or the prefix it shares with the others
        self._join(joining, sources, logits, end, start if shared else None)

    def _chunks_of(self, joining: list[Sequence]) -> _Chunks:
        """The long prompt's place: a row after the batch's, its columns ending where the batch's next column will
        be once the running rows have decoded a step between each two of its chunks. So it ends where its row's
        first decode step goes (no gap in its row), and the batch spans the columns it would span had the prompt
        joined unchunked after those steps: the layout's bound, and the KV budget, hold as they are."""
        length = len(joining[0].prompt_ids)
        steps = -(-length // PREFILL_TOKENS) - 1 if self._active else 0
        end = max(self._column + steps, length)
        return _Chunks(joining, len(self._active), end - length)

    def _prefill_chunk(self, chunks: _Chunks) -> None:
        """The long prompt's next PREFILL_TOKENS tokens into its row, their masks from their positions like any
        prefill's (a sliding window reaches back into the chunks before); after its last chunk, the requests that
        share it join the batch."""
        self._make_room(len(self._active), 0)  # and the chunks' row and columns
        cache, row, prompt = self._cache, chunks.row, chunks.prompt
        if chunks.done == 0:
            cache.positions[row] = -1
        first, last = chunks.done, min(chunks.done + PREFILL_TOKENS, len(prompt))
        start, end = chunks.start + first, chunks.start + last
        ids = torch.tensor([prompt[first:last]], device=self.device)
        positions = torch.arange(first, last, device=self.device)[None]
        cache.positions[row, start:end] = positions[0]
        cache.rows, cache.write_start, cache.write_end = slice(row, row + 1), start, end
        masks = attention_masks(
            cache.positions[row : row + 1, :end], positions, self.windows, self.dtype, self.additive_masks
        )
        logits = self._forward(ids, positions, masks)
        chunks.done = last
        if last < len(prompt):
            return
        rows, joining = len(self._active), chunks.sequences
        self._make_room(rows + len(joining), 0)
        if row != rows:  # rows the batch freed meanwhile: its row comes right after the batch's
            cache.move_row(row, rows, chunks.end)
        cache.positions[rows + 1 : rows + len(joining)] = -1
        self._chunks = None
        self._join(joining, [0] * (len(joining) - 1), logits, chunks.end)

    def _drop_chunks(self) -> None:
        """Forget the prompt being prefilled in chunks: no row after the batch's holds anything."""
        self._chunks = None
        self._cache.positions[len(self._active) :] = -1
        if not self._active:
            self._column = 0

    def _join(
        self, joining: list[Sequence], sources: list[int], logits: torch.Tensor, end: int, start: int | None = None
    ) -> None:
        """The requests whose prompts now end at column `end` in the rows after the batch's join it: their first
        tokens from the prefill's last logits (`logits`' rows are the computed rows; the requests after them copy
        row `sources[i]`'s cache). `start`: the rows' first column, when not where their prompts begin (a shared
        prefix sits at the longest prompt's start)."""
        cache, rows = self._cache, len(self._active)
        computed = len(joining) - len(sources)
        new_rows = slice(rows, rows + len(joining))
        for copy, source in enumerate(sources, start=rows + computed):
            cache.copy_row(rows + source, copy, end)
        if sources:
            logits = logits[torch.tensor([*range(computed), *sources], device=self.device)]
        sampler = BatchSampler(self.device)
        sampler.set_rows([s.sampling for s in joining], [s.generator for s in joining])
        vocab = logits.shape[-1]
        seen = counts = None
        if self._seen is not None or any(s.sampling.repetition_penalty != 1.0 for s in joining):
            seen = torch.zeros(len(joining), vocab, dtype=torch.bool, device=self.device)
            for i, sequence in enumerate(joining):
                seen[i, torch.tensor(sequence.prompt_ids, device=self.device)] = True
        if self._counts is not None or any(s.sampling.counts_tokens for s in joining):
            counts = torch.zeros(len(joining), vocab, device=self.device)
        allowed = allowed_tokens([s.grammar for s in joining], vocab, self.device)
        tokens = sampler.pick(logits, seen, counts, allowed)
        reports = _logprobs(joining, logits, tokens)
        self._column = max(self._column, end)
        self._last[new_rows] = tokens
        self._positions[new_rows] = torch.tensor([len(s.prompt_ids) for s in joining], device=self.device)
        picked = torch.arange(len(joining), device=self.device)
        if seen is not None:
            seen[picked, tokens] = True
            self._seen = self._seen if self._seen is not None else self._row_state(vocab, torch.bool)
            self._seen[new_rows] = seen
        if counts is not None:
            counts[picked, tokens] += 1
            self._counts = self._counts if self._counts is not None else self._row_state(vocab, torch.float32)
            self._counts[new_rows] = counts
        self._active.extend(joining)
        self._starts.extend(end - len(s.prompt_ids) if start is None else start for s in joining)
        self._set_sampler_rows()
        self.peak_batch = max(self.peak_batch, len(self._active))
        for sequence, token, report in zip(joining, tokens.tolist(), reports):
            sequence.accept(token, self.eos_ids, report)

    def _prefill_prefix(self, prefix: list[int], rows: slice, start: int) -> None:
        """The prompt tokens every one of `rows` starts with, computed once in the first of them at columns from
        `start`, and its keys and values copied to the others' same columns."""
        cache = self._cache
        first, columns = slice(rows.start, rows.start + 1), slice(start, start + len(prefix))
        positions = torch.arange(len(prefix), device=self.device)[None]
        cache.positions[first, columns] = positions
        cache.rows, cache.write_start, cache.write_end = first, columns.start, columns.stop
        kv_positions = cache.positions[first, : columns.stop]
        masks = attention_masks(kv_positions, positions, self.windows, self.dtype, self.additive_masks)
        self._forward(torch.tensor([prefix], device=self.device), positions, masks)
        cache.share_columns(rows.start, slice(rows.start + 1, rows.stop), columns)

    def _prefill_rows(self, sequences: list[Sequence], rows: slice, offset: int, end: int) -> torch.Tensor:
        """The last logits of each sequence's prompt from token `offset` on (the tokens before it are in the
        cache already), prefilled into `rows`, left-padded to end at column `end`."""
        width = max(len(s.prompt_ids) for s in sequences) - offset
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        positions = torch.full((len(sequences), width), -1, dtype=torch.long)
        for i, sequence in enumerate(sequences):
            length = len(sequence.prompt_ids)
            ids[i, width - length + offset :] = torch.tensor(sequence.prompt_ids[offset:])
            positions[i, width - length + offset :] = torch.arange(offset, length)
        ids, positions = ids.to(self.device), positions.to(self.device)
        cache = self._cache
        cache.positions[rows, end - width : end] = positions
        cache.rows, cache.write_start, cache.write_end = rows, end - width, end
        kv_positions = cache.positions[rows, :end]
        masks = attention_masks(kv_positions, positions, self.windows, self.dtype, self.additive_masks)
        return self._forward(ids, positions.clamp(min=0), masks)

    def _decode_step(self) -> None:
        rows = len(self._active)
        self._make_room(rows, 0)
        cache, column = self._cache, self._column
        live = slice(0, rows)
        cache.positions[live, column] = self._positions[live]
        cache.rows, cache.write_start, cache.write_end = live, column, column + 1
        positions = self._positions[live, None]
        kv_positions = cache.positions[live, : column + 1]
        masks = decode_masks(kv_positions, positions, self.windows, self.dtype, self.additive_masks)
        logits = self._forward(self._last[live, None], positions, masks)
        seen = self._seen[live] if self._seen is not None else None
        counts = self._counts[live] if self._counts is not None else None
        # Grammars and log-probabilities cost a pass each only in batches with a request that asks for them.
        grammars = self._batch_asks.grammar
        allowed = allowed_tokens([s.grammar for s in self._active], logits.shape[-1], self.device) if grammars else None
        tokens = self._sampler.pick(logits, seen, counts, allowed)
        reports = _logprobs(self._active, logits, tokens) if self._batch_asks.logprobs else [None] * rows
        self._column = column + 1
        self._last[live] = tokens
        self._positions[live] += 1
        if seen is not None or counts is not None:
            picked = torch.arange(rows, device=self.device)
            if seen is not None:
                self._seen[picked, tokens] = True
            if counts is not None:
                self._counts[picked, tokens] += 1
        for sequence, token, report in zip(self._active, tokens.tolist(), reports):  # the step's one copy to host
            if not sequence.finished:
                sequence.accept(token, self.eos_ids, report)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, masks: dict[str, torch.Tensor] | torch.Tensor
    ) -> torch.Tensor:
        """The last position's logits, for `ids` at `positions` (none negative) written into the rows and columns
        of the cache that the caller chose."""
        cache = self._cache
        out = self.model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=positions,
            past_key_values=cache,
            cache_position=torch.arange(cache.write_start, cache.write_end, device=self.device),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _make_room(self, rows: int, prompt_length: int) -> None:
        """Enough rows, and columns for a prompt of `prompt_length` ending at the next column and the decode step
        after it, keeping a prompt being prefilled in chunks: reclaim the columns before every row's first, and
        grow (doubling) only when reclaiming leaves less than half free."""
        cache, chunks, used = self._cache, self._chunks, self._column
        if chunks is not None:  # its row, and its columns (they may end past the batch's next one)
            rows, used = max(rows, chunks.row + 1), max(used, chunks.end)
        if rows <= cache.row_capacity and max(used, prompt_length) + 1 <= cache.column_capacity:
            return
        first, kept, held = min(self._starts, default=self._column), len(self._active), self._column
        if chunks is not None:  # what its chunks so far wrote is kept
            first, held = min(first, chunks.start), max(held, chunks.start + chunks.done)
            kept = min(chunks.row + 1, cache.row_capacity)
        needed = max(used - first, prompt_length) + 1
        column_capacity = cache.column_capacity
        if needed > column_capacity // 2:
            column_capacity = max(2 * needed, 16)
        row_capacity = max(cache.row_capacity, min(self.max_batch, max(2 * cache.row_capacity, rows, 1)))
        cache.resize(row_capacity, column_capacity, kept, slice(first, held))
        self._column -= first
        self._starts = [start - first for start in self._starts]
        if chunks is not None:
            chunks.start -= first
        if row_capacity != self._last.shape[0]:
            self._last = _grown(self._last, row_capacity)
            self._positions = _grown(self._positions, row_capacity)
            if self._seen is not None:
                self._seen = _grown(self._seen, row_capacity)
            if self._counts is not None:
                self._counts = _grown(self._counts, row_capacity)

    def _row_state(self, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, vocab) state for every row the cache has, made when the first request needs it."""
        return torch.zeros(self._last.shape[0], vocab, dtype=dtype, device=self.device)

    def _retire(self) -> None:
        """Drop finished and cancelled sequences: the last row moves into each freed one."""
        row = 0
        changed = False
        while row < len(self._active):
            sequence = self._active[row]
            if not (sequence.finished or sequence.cancelled):
                row += 1
                continue
            changed = True
            last = len(self._active) - 1
            if row != last:
                self._cache.move_row(last, row, self._column)
                for state in (self._last, self._positions, self._seen, self._counts):
                    if state is not None:
                        state[row] = state[last]
                self._active[row], self._starts[row] = self._active[last], self._starts[last]
            self._cache.positions[last] = -1
            self._active.pop()
            self._starts.pop()
        if changed:
            self._set_sampler_rows()
            if not self._active:
                self._column = 0

    def _fail_all(self, error: BaseException, joining: list[Sequence]) -> None:
        chunked = self._chunks.sequences if self._chunks is not None else []
        for sequence in dict.fromkeys([*self._active, *joining, *chunked]):
            sequence.fail(error)
        self._active, self._starts, self._column, self._chunks = [], [], 0, None
        self._cache.positions.fill_(-1)
        self._set_sampler_rows()

    def _set_sampler_rows(self) -> None:
        self._sampler.set_rows([s.sampling for s in self._active], [s.generator for s in self._active])
        self._batch_asks = _Asks(
            grammar=any(s.grammar is not None for s in self._active),
            logprobs=any(s.sampling.logprobs is not None for s in self._active),
        )


def _sharing_prompts(joining: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """The joining requests with one of each prompt first, then the requests whose prompt is among those (a
    request's n choices), and for each of the latter the index of the first with its prompt: their prefill is
    computed once and copied."""
    first: dict[tuple[int, ...], int] = {}
    distinct, sharing, sources = [], [], []
    for sequence in joining:
        key = tuple(sequence.prompt_ids)
        if key in first:
            sharing.append(sequence)
            sources.append(first[key])
        else:
            first[key] = len(distinct)
            distinct.append(sequence)
    return distinct + sharing, sources


def _shared_prefix(sequences: list[Sequence]) -> int:
    """How many leading prompt tokens all of `sequences` share, when computing them once is worth a forward of
    its own (SHARED_PREFIX_MIN tokens or more, as a chat template's system prompt gives); else 0. Every prompt
    keeps one token of its own at least: its last position's logits give its first token."""
    if len(sequences) < 2:
        return 0
    prompts = [s.prompt_ids for s in sequences]
    # commonprefix compares only the least and the greatest of the lists: fast for long shared prompts
    shared = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
    return shared if shared >= SHARED_PREFIX_MIN else 0


def _logprobs(sequences: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> list[TokenLogprobs | None]:
    """Each row's log-probabilities for the requests that ask for them (None for the others)."""
    asking = [row for row, s in enumerate(sequences) if s.sampling.logprobs is not None]
    reports: list[TokenLogprobs | None] = [None] * len(sequences)
    if asking:
        index = torch.tensor(asking, device=logits.device)
        top = [sequences[row].sampling.logprobs for row in asking]
        for row, report in zip(asking, logprobs_of(logits[index], tokens[index], top)):
            reports[row] = report
    return reports


def _grown(state: torch.Tensor, rows: int) -> torch.Tensor:
    grown = state.new_zeros(rows, *state.shape[1:])
    kept = min(rows, state.shape[0])
    grown[:kept] = state[:kept]
    return grown


def _shed() -> ShedForMemory:
    return ShedForMemory(
        "out of memory on the device: this request, the newest in its batch, was dropped so the others could go on"
    )
