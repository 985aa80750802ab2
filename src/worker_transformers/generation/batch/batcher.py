"""Continuous batching: one thread runs the model for every request in flight, over a slot cache (slot_cache.py).

Each turn of the loop prefills the requests that arrived, all in one forward (left-padded, written straight into
their cache rows; requests with the same prompt, such as one request's n choices, share one row's prefill, copied
to the others; prompts that start alike, as a chat template's system prompt makes them, compute that prefix once
in a forward of its own and copy it), then decodes one token for every sequence in the batch at once. A model
with recurrent layers (linear attention, convolutions, state-space layers) tells them which tokens are padding,
so that none enters a recurrent state, and computes no shared prefix (the padding after it would); where its
layers take no padding mask (batch/check.py), it prefills unpadded, a forward for each prompt length. Its rows'
states go on from step to step like the attention layers' keys and values. An image prompt (a vision-language
model's) is prefilled in a forward of its own with its processed images, after the text prompts that join with
it, and never in chunks; its multimodal rotary offset, if the model has one, goes with its row (vision.py). A sequence
leaves the batch the step it finishes or is cancelled, and a waiting one takes its row. The step's inputs stay on
the device: the tokens just chosen are the next step's input and positions advance in place, so the host reads
back only the chosen tokens, once per step.

A prompt longer than PREFILL_TOKENS is prefilled in chunks of PREFILL_TOKENS, one chunk a turn, into a row after
the batch's, and the batch decodes its step between each two chunks; the requests behind it wait, and it joins
the batch (with its n choices, which share its chunks) at its last chunk, whose logits give its first token. Its
tokens are laid out where an unchunked prefill would have put them, so its answer is the one it would have been,
sliding windows included: every mask comes from the tokens' positions, never from their columns; a recurrent
layer's states go on from chunk to chunk (where the model's code allows it: batch/check.py).

Requests are admitted while their worst-case cache (prompt plus every token they may generate, in the slot
layout's rows and columns, and a row's recurrent states) fits the cache budget worked out at startup, and at most
`max_batch` at once; a prefill takes at most PREFILL_TOKENS tokens per turn, left padding included, a long
prompt's chunk too, so that arrivals
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

from worker_transformers.generation.batch.compiled import DecodeGraph
from worker_transformers.generation.batch.layout import CacheLayout, forward_parameters
from worker_transformers.generation.batch.masks import attention_masks, held_columns
from worker_transformers.generation.batch.slot_cache import SlotCache
from worker_transformers.generation.engine import Engine
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.grammar import allowed_tokens
from worker_transformers.generation.sampling import BatchSampler, keep_chosen, penalty_state, rows_logprobs
from worker_transformers.generation.vision import Pixels, VisionModel

log = logging.getLogger(__name__)

PREFILL_TOKENS = 4096  # tokens of one turn's prefill, padding included (a longer prompt goes in chunks of it)
# The slot layout gives every row as many columns as the longest sequence spans, and reclaims columns only once
# half of them are free: this many times the longest reservation per row bounds what it allocates.
LAYOUT_SLACK = 2
# Requests that join together and start with this many tokens alike or more (a chat template's system prompt,
# one request's n choices) compute those once, in a forward of their own, and copy their keys and values.
SHARED_PREFIX_MIN = 16


@dataclass(frozen=True)
class _Asks:
    """Whether any request in the batch has a grammar, and whether any asks for log-probabilities."""

    grammar: bool
    logprobs: bool


class ShedForMemory(torch.OutOfMemoryError):
    """This request was dropped so that the others in its batch could go on when the device ran out of memory."""


@dataclass
class Chunks:
    """A prompt longer than PREFILL_TOKENS, prefilled a chunk per turn into a row after the batch's, for the
    requests that share it (a request's n choices): they join the batch at its last chunk."""

    sequences: list[Sequence]
    row: int
    start: int  # the column of the prompt's first token; it ends at `end`, where its row's first decode step goes
    size: int  # tokens a chunk
    done: int = 0  # the prompt's tokens prefilled so far

    @property
    def prompt(self) -> list[int]:
        return self.sequences[0].prompt_ids

    @property
    def end(self) -> int:
        return self.start + len(self.prompt)


class Batcher(Engine):
    """The batch engine. Its steps, in the order its thread's loop runs them each turn (and check.py and
    the tests run them one by one): `prefill` the requests that join (or `start_chunks` and `prefill_chunk` a
    long prompt), `decode` one token for every row, `retire` the rows that finished."""

    def __init__(
        self,
        model: PreTrainedModel,
        max_batch: int,
        eos_ids: set[int],
        layout: CacheLayout,
        memory_budget: int | None = None,
        start: bool = True,
        vision: VisionModel | None = None,
    ) -> None:
        super().__init__("batcher", model, eos_ids)
        self.dtype = model.dtype
        self.max_batch = max_batch
        self.layout = layout
        self.memory_budget = memory_budget  # bytes the batch's cache may occupy; None: no limit
        self.vision = vision  # what an image prompt's prefill needs (vision.py); None: the model takes no images
        self.additive_masks = model.config._attn_implementation != "sdpa"
        # What the model's forward names: a purely recurrent model's takes no positions (nor masks, some).
        self._takes = forward_parameters(model)
        self.active: list[Sequence] = []  # in row order
        self.starts: list[int] = []  # each row's first cache column
        self.column = 0  # where the next decode step writes
        self.chunks: Chunks | None = None  # the prompt being prefilled in chunks, if any
        self.cache = SlotCache(list(layout.layers), 0, 0, self.device)
        self._last = self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        # Each row's rotary position less its token position: 0, except after an image under multimodal RoPE.
        self._offsets = torch.zeros(0, dtype=torch.long, device=self.device)
        self._seen: torch.Tensor | None = None  # (rows, vocab): the repetition penalty's tokens, when one asks
        self._counts: torch.Tensor | None = None  # (rows, vocab): generated tokens' counts, when a penalty asks
        self._sampler = BatchSampler(self.device)
        self._batch_asks = _Asks(grammar=False, logprobs=False)  # what the rows in the batch ask for
        self.graph: DecodeGraph | None = None  # the compiled decode step, where the model has one (compiled.py)
        if start:  # not for check.py, which drives the steps itself
            self._thread.start()

    def in_flight(self) -> int:
        chunks = self.chunks
        return len(self.active) + len(self._waiting) + (len(chunks.sequences) if chunks is not None else 0)

    @property
    def max_request_tokens(self) -> int | None:
        """The largest reservation (prompt and new tokens) a request alone can have here; None: no limit (no
        budget, or a recurrent model's fixed state per row whatever the request's length)."""
        per_token = self.layout.kv_bytes_per_token
        if self.memory_budget is None or not per_token:
            return None
        return max(0, self.memory_budget - self.layout.state_bytes_per_row) // (LAYOUT_SLACK * per_token)

    # The batcher's thread: a turn at a time, each step's out-of-memory error kept to the requests it concerns

    @torch.inference_mode()
    def _run(self) -> None:
        while (joining := self._admit()) is not None:
            try:
                first = joining[0] if joining else None
                if first and len(first.prompt_ids) > PREFILL_TOKENS and self.layout.chunked_prefill and not first.pixels:
                    self.start_chunks(joining, PREFILL_TOKENS)
                if self.chunks is not None:
                    self._prefill_chunk_safely()
                    self.retire()
                elif joining:
                    self._prefill_safely(joining)
                    self.retire()  # answers that ended at their first token
                if self.active:
                    self._decode_safely()
                self.retire()
            except Exception as error:  # noqa: BLE001 - the thread must survive; every caller gets the error
                log.exception("generation failed; failing the %d requests in flight", len(self.active))
                self._fail_all(error, joining)

    def _admit(self) -> list[Sequence] | None:
        """Requests that join the batch now (waiting while there is nothing to do); None once closed and idle."""
        with self._wake:
            while not self._waiting and not self.active and self.chunks is None:
                if self._closed:
                    return None
                self._wake.wait()
            admitted: list[Sequence] = []
            if self.chunks is not None:
                return admitted  # the others wait behind the prompt being prefilled in chunks
            longest = 0  # the prefill's rows are padded to its longest prompt
            while self._waiting and len(self.active) + len(admitted) < self.max_batch:
                sequence = self._waiting[0]
                if sequence.cancelled:
                    self._waiting.popleft()
                    continue
                if longest > PREFILL_TOKENS:  # prefilled in chunks, with only the requests that share its prompt
                    if sequence.prompt_ids != admitted[0].prompt_ids:
                        break
                elif admitted and (len(admitted) + 1) * max(longest, len(sequence.prompt_ids)) > PREFILL_TOKENS:
                    break
                if not self._within_budget([*self.active, *admitted, sequence]):
                    break
                admitted.append(self._waiting.popleft())
                longest = max(longest, len(sequence.prompt_ids))
            return admitted

    def _within_budget(self, sequences: list[Sequence]) -> bool:
        """Whether these rows fit the budget, each as wide as the layout may make it (its slack times the longest
        reservation) and each with its recurrent states."""
        if self.memory_budget is None:
            return True
        layout = self.layout
        row = LAYOUT_SLACK * max(s.reserved_tokens for s in sequences) * layout.kv_bytes_per_token
        return len(sequences) * (row + layout.state_bytes_per_row) <= self.memory_budget

    def _prefill_safely(self, joining: list[Sequence]) -> None:
        try:
            self.prefill(joining)
        except torch.OutOfMemoryError as error:
            event = self._out_of_memory()
            if len(joining) == 1:
                log.error(
                    "out of memory prefilling a %d-token prompt; failing that request", len(joining[0].prompt_ids)
                )
                joining[0].fail(error, event)
                return
            for sequence in joining:  # one at a time: only the request that does not fit fails
                self._prefill_safely([sequence])

    def _prefill_chunk_safely(self) -> None:
        chunks = self.chunks
        chunks.sequences = [s for s in chunks.sequences if not s.cancelled]
        if not chunks.sequences:  # nobody wants its answer any more
            return self._drop_chunks()
        try:
            self.prefill_chunk()
        except torch.OutOfMemoryError as error:
            event = self._out_of_memory()
            self._drop_chunks()
            log.error("out of memory prefilling a %d-token prompt in chunks; failing that request", len(chunks.prompt))
            for sequence in chunks.sequences:
                sequence.fail(error, event)

    def _decode_safely(self) -> None:
        event = None
        while self.active:
            try:
                self.decode()
                return
            except torch.OutOfMemoryError:
                event = event or self._out_of_memory()
                newest = max(range(len(self.active)), key=lambda row: self.active[row].arrival)
                log.error(
                    "out of memory decoding %d sequences (%d cache columns); shedding the newest request",
                    len(self.active),
                    self.column,
                )
                self.active[newest].fail(_shed(), event)
                self.retire()

    # The steps

    def prefill(self, joining: list[Sequence]) -> torch.Tensor:
        """`joining` prefilled in one forward into the rows after the batch's, and joined to it with their first
        tokens; the forward's logits (one row for each distinct prompt). A recurrent model shares no prefix, and one
        whose layers take no padding mask prefills a forward for each prompt length."""
        recurrent = self.layout.recurrent
        unpadded = recurrent and not self.layout.padded_prefill
        if unpadded:  # prompts of one length in adjacent rows
            joining = sorted(joining, key=lambda s: len(s.prompt_ids))
        joining, sources = _sharing_prompts(joining)
        computed = len(joining) - len(sources)  # the rows the forward fills; the others copy one of them
        texts = [s for s in joining[:computed] if s.pixels is None]  # first: the image prompts come after them
        rows = len(self.active)
        longest = max(len(s.prompt_ids) for s in joining)
        self._make_room(rows + len(joining), longest)
        end = max(self.column, longest)  # the prompts end at the column the batch writes next
        start = end - longest
        new_rows, text_rows = slice(rows, rows + len(joining)), slice(rows, rows + len(texts))
        self.cache.positions[new_rows] = -1
        self._offsets[new_rows] = 0
        # A recurrent state would take in the padding between a shared prefix and each row's rest: no sharing.
        shared = 0 if recurrent else _shared_prefix(texts)
        logits = []
        try:
            if unpadded and texts:
                logits.append(self._prefill_alike(texts, rows, end))
            elif texts:
                if shared:
                    self._prefill_prefix(texts[0].prompt_ids[:shared], text_rows, start)
                logits.append(self._prefill_rows(texts, text_rows, shared, end))
            for row, sequence in enumerate(joining[len(texts) : computed], start=text_rows.stop):
                logits.append(self._prefill_image(sequence, row, end))
        except BaseException:
            self.cache.positions[new_rows] = -1
            raise
        logits = torch.cat(logits)
        # each row's first column: where its prompt begins, or the prefix it shares with the others
        self._join(joining, sources, logits, end, start if shared else None)
        return logits

    def start_chunks(self, joining: list[Sequence], size: int) -> Chunks:
        """The long prompt that `joining` share, to be prefilled `size` tokens a turn. Its place: a row after the
        batch's, its columns ending where the batch's next column will be once the running rows have decoded a
        step between each two of its chunks. So it ends where its row's first decode step goes (no gap in its
        row), and the batch spans the columns it would span had the prompt joined unchunked after those steps:
        the layout's bound, and the cache budget, hold as they are."""
        length = len(joining[0].prompt_ids)
        steps = -(-length // size) - 1 if self.active else 0
        end = max(self.column + steps, length)
        self.chunks = Chunks(joining, len(self.active), end - length, size)
        return self.chunks

    def prefill_chunk(self) -> torch.Tensor:
        """The long prompt's next chunk into its row, their masks from their positions like any prefill's (a
        sliding window reaches back into the chunks before), its recurrent states going on from the chunk before;
        after its last chunk, the requests that share it join the batch. The chunk's logits."""
        chunks = self.chunks
        self._make_room(len(self.active), 0)  # and the chunks' row and columns
        row, prompt = chunks.row, chunks.prompt
        if chunks.done == 0:
            self.cache.positions[row] = -1
        first, last = chunks.done, min(chunks.done + chunks.size, len(prompt))
        ids = torch.tensor([prompt[first:last]], device=self.device)
        positions = torch.arange(first, last, device=self.device)[None]
        logits = self._forward(ids, positions, slice(row, row + 1), chunks.start + first, continuing=first > 0)
        chunks.done = last
        if last < len(prompt):
            return logits
        rows, joining = len(self.active), chunks.sequences
        self._make_room(rows + len(joining), 0)
        if row != rows:  # rows the batch freed meanwhile: its row comes right after the batch's
            self.cache.move_row(row, rows, chunks.end)
        self.cache.positions[rows + 1 : rows + len(joining)] = -1
        self._offsets[rows : rows + len(joining)] = 0
        self.chunks = None
        self._join(joining, [0] * (len(joining) - 1), logits, chunks.end)
        return logits

    def decode(self) -> torch.Tensor:
        """One token for every row of the batch, in one forward; its logits."""
        rows = len(self.active)
        self._make_room(rows, 0)
        live = slice(0, rows)
        positions = self._positions[live, None]
        rotary = positions + self._offsets[live, None] if self.vision and self.vision.rope_index else None
        logits = self._decode_forward(rows, positions, rotary)
        seen = self._seen[live] if self._seen is not None else None
        counts = self._counts[live] if self._counts is not None else None
        # Grammars and log-probabilities cost a pass each only in batches with a request that asks for them.
        asks = self._batch_asks
        allowed = None
        if asks.grammar:
            allowed = allowed_tokens([s.grammar for s in self.active], logits.shape[-1], self.device)
        tokens = self._sampler.pick(logits, seen, counts, allowed)
        reports = rows_logprobs(self._sampler.rows, logits, tokens) if asks.logprobs else [None] * rows
        self.column += 1
        self._last[live] = tokens
        self._positions[live] += 1
        keep_chosen(seen, counts, tokens)
        self._accept(self.active, tokens.tolist(), reports)  # the step's one copy to host
        return logits

    def retire(self) -> None:
        """Drop finished and cancelled sequences: the last row moves into each freed one."""
        row = 0
        changed = False
        while row < len(self.active):
            sequence = self.active[row]
            if not (sequence.finished or sequence.cancelled):
                row += 1
                continue
            changed = True
            last = len(self.active) - 1
            if row != last:
                self.cache.move_row(last, row, self.column)
                for state in (self._last, self._positions, self._offsets, self._seen, self._counts):
                    if state is not None:
                        state[row] = state[last]
                self.active[row], self.starts[row] = self.active[last], self.starts[last]
            self.cache.positions[last] = -1
            self.active.pop()
            self.starts.pop()
        if changed:
            self._set_sampler_rows()
            if not self.active:
                self.column = 0

    # What the steps share

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: slice,
        start: int,
        decode: bool = False,
        continuing: bool = False,
        padded: bool = False,
        rotary: torch.Tensor | None = None,
        pixels: Pixels | None = None,
        blocks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last position's logits of `ids` (rows, tokens) at `positions` (-1: left padding), written into the
        cache's `rows` at the columns from `start` on: the positions recorded there, every query's masks made
        from them (a decode step's quickly: its one query is each row's newest token), then the model run.
        `continuing`: the rows' recurrent states go on from what they hold (else the forward starts them);
        `padded`: some rows are left-padded (their recurrent layers are told which tokens are padding). An image
        prompt's prefill (`_prefill_image`) gives its processed `pixels`, its rotary positions where they are not
        its token positions (`rotary`) and its image `blocks` where the model's images see themselves both ways."""
        end = start + ids.shape[1]
        cache, layout = self.cache, self.layout
        cache.positions[rows, start:end] = positions
        held = cache.positions[rows, :end]
        arguments = {"input_ids": ids, layout.cache_argument: cache, "use_cache": True, "logits_to_keep": 1}
        if "attention_mask" in self._takes:
            arguments["attention_mask"] = (
                held_columns(held)
                if layout.held_mask
                else attention_masks(
                    held, positions, layout.kinds, self.dtype, self.additive_masks, decode, padded, blocks
                )
            )
        if "position_ids" in self._takes:
            arguments["position_ids"] = rotary if rotary is not None else positions if decode else positions.clamp(min=0)
        if pixels is not None:
            arguments.update(pixels.arguments(self._takes, self.device))
        if "cache_position" in self._takes:
            arguments["cache_position"] = torch.arange(start, end, device=self.device)
        with cache.writing(rows, start, end, continuing):
            out = self.model(**arguments)
        return out.logits[:, -1]

    def _decode_forward(self, rows: int, positions: torch.Tensor, rotary: torch.Tensor | None) -> torch.Tensor:
        """A decode step's logits: from the compiled step once it is ready (compiled.py) for batches it serves,
        else the eager forward. A prompt being prefilled in chunks holds a row after the batch's, which the
        compiled step does not keep out of its writes: the eager step serves meanwhile."""
        graph, live = self.graph, slice(0, rows)
        if graph is not None and graph.ready and rows <= graph.most_rows and self.chunks is None:
            # the rows the compiled step runs, and a column to spare after the step's (DecodeGraph.run)
            self._make_room(max(rows, graph.fewest_rows), 0, spare=1)
            try:
                rotary = positions if rotary is None else rotary
                return graph.run(self._last[live, None], positions, rotary, self.cache, rows, self.column)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - the eager step is always there to serve
                graph.ready = False
                log.exception("the compiled decode step failed; the eager step serves from now on")
        return self._forward(
            self._last[live, None], positions, live, self.column, decode=True, continuing=True, rotary=rotary
        )

    def _prefill_prefix(self, prefix: list[int], rows: slice, start: int) -> None:
        """The prompt tokens every one of `rows` starts with, computed once in the first of them at columns from
        `start`, and its keys and values copied to the others' same columns."""
        positions = torch.arange(len(prefix), device=self.device)[None]
        self._forward(torch.tensor([prefix], device=self.device), positions, slice(rows.start, rows.start + 1), start)
        self.cache.share_columns(rows.start, slice(rows.start + 1, rows.stop), slice(start, start + len(prefix)))

    def _prefill_alike(self, sequences: list[Sequence], first_row: int, end: int) -> torch.Tensor:
        """The last logits of each prompt (sorted by length), prefilled unpadded into the rows from `first_row` on
        to end at column `end`: one forward for the prompts of each length."""
        logits = []
        row = first_row
        for length, group in itertools.groupby(sequences, key=lambda s: len(s.prompt_ids)):
            alike = [s.prompt_ids for s in group]
            ids = torch.tensor(alike, device=self.device)
            positions = torch.arange(length, device=self.device).expand(len(alike), length)
            logits.append(self._forward(ids, positions, slice(row, row + len(alike)), end - length))
            row += len(alike)
        return torch.cat(logits)

    def _prefill_image(self, sequence: Sequence, row: int, end: int) -> torch.Tensor:
        """The last logits of an image prompt, prefilled in a forward of its own (its pixels are its own, and it
        is never padded) into `row` to end at column `end`, with its rotary positions and image blocks as the
        model has them (vision.py)."""
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        length = ids.shape[1]
        rotary = self.vision.rotary_positions(ids, sequence.pixels)
        if rotary is not None:
            rotary, self._offsets[row] = rotary
        blocks = self.vision.image_blocks(ids) if self.layout.image_blocks else None
        positions = torch.arange(length, device=self.device)[None]
        return self._forward(
            ids, positions, slice(row, row + 1), end - length, rotary=rotary, pixels=sequence.pixels, blocks=blocks
        )

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
        padded = any(len(s.prompt_ids) - offset < width for s in sequences)
        return self._forward(ids.to(self.device), positions.to(self.device), rows, end - width, padded=padded)

    def _join(
        self, joining: list[Sequence], sources: list[int], logits: torch.Tensor, end: int, start: int | None = None
    ) -> None:
        """The requests whose prompts now end at column `end` in the rows after the batch's join it: their first
        tokens from the prefill's last logits (`logits`' rows are the computed rows; the requests after them copy
        row `sources[i]`'s cache). `start`: the rows' first column, when not where their prompts begin (a shared
        prefix sits at the longest prompt's start)."""
        rows = len(self.active)
        computed = len(joining) - len(sources)
        new_rows = slice(rows, rows + len(joining))
        for copy, source in enumerate(sources, start=rows + computed):
            self.cache.copy_row(rows + source, copy, end)
            self._offsets[copy] = self._offsets[rows + source]
        if sources:
            logits = logits[torch.tensor([*range(computed), *sources], device=self.device)]
        samplings = [s.sampling for s in joining]
        sampler = BatchSampler(self.device)
        sampler.set_rows(samplings, [s.generator for s in joining])
        vocab = logits.shape[-1]
        prompts, nothing_yet = [s.prompt_ids for s in joining], [[] for _ in joining]
        # The batch keeps a state every row has once one of its requests asks for it.
        seen, counts = penalty_state(
            samplings,
            prompts,
            nothing_yet,
            vocab,
            self.device,
            seen=self._seen is not None,
            counts=self._counts is not None,
        )
        tokens = sampler.pick(logits, seen, counts, allowed_tokens([s.grammar for s in joining], vocab, self.device))
        reports = rows_logprobs(samplings, logits, tokens)
        keep_chosen(seen, counts, tokens)
        self.column = max(self.column, end)
        self._last[new_rows] = tokens
        self._positions[new_rows] = torch.tensor([len(s.prompt_ids) for s in joining], device=self.device)
        if seen is not None:
            self._seen = self._seen if self._seen is not None else self._row_state(vocab, torch.bool)
            self._seen[new_rows] = seen
        if counts is not None:
            self._counts = self._counts if self._counts is not None else self._row_state(vocab, torch.float32)
            self._counts[new_rows] = counts
        self.active.extend(joining)
        self.starts.extend(end - len(s.prompt_ids) if start is None else start for s in joining)
        self._set_sampler_rows()
        self.peak_batch = max(self.peak_batch, len(self.active))
        self._accept(joining, tokens.tolist(), reports)

    def _drop_chunks(self) -> None:
        """Forget the prompt being prefilled in chunks: no row after the batch's holds anything."""
        self.chunks = None
        self.cache.positions[len(self.active) :] = -1
        if not self.active:
            self.column = 0

    def _make_room(self, rows: int, prompt_length: int, spare: int = 0) -> None:
        """Enough rows, and columns for a prompt of `prompt_length` ending at the next column and the decode step
        after it (and `spare` columns after that), keeping a prompt being prefilled in chunks: reclaim the columns
        before every row's first, and grow (doubling) only when reclaiming leaves less than half free."""
        cache, chunks, used = self.cache, self.chunks, self.column
        if chunks is not None:  # its row, and its columns (they may end past the batch's next one)
            rows, used = max(rows, chunks.row + 1), max(used, chunks.end)
        if rows <= cache.row_capacity and max(used, prompt_length) + 1 + spare <= cache.column_capacity:
            return
        first, kept, held = min(self.starts, default=self.column), len(self.active), self.column
        if chunks is not None:  # what its chunks so far wrote is kept
            first, held = min(first, chunks.start), max(held, chunks.start + chunks.done)
            kept = min(chunks.row + 1, cache.row_capacity)
        needed = max(used - first, prompt_length) + 1 + spare
        column_capacity = cache.column_capacity
        if needed > column_capacity // 2:
            column_capacity = max(2 * needed, 16)
        row_capacity = max(cache.row_capacity, min(self.max_batch, max(2 * cache.row_capacity, rows, 1)))
        cache.resize(row_capacity, column_capacity, kept, slice(first, held))
        self.column -= first
        self.starts = [start - first for start in self.starts]
        if chunks is not None:
            chunks.start -= first
        if row_capacity != self._last.shape[0]:
            self._last = _grown(self._last, row_capacity)
            self._positions = _grown(self._positions, row_capacity)
            self._offsets = _grown(self._offsets, row_capacity)
            if self._seen is not None:
                self._seen = _grown(self._seen, row_capacity)
            if self._counts is not None:
                self._counts = _grown(self._counts, row_capacity)

    def _row_state(self, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """A (rows, vocab) state for every row the cache has, made when the first request needs it."""
        return torch.zeros(self._last.shape[0], vocab, dtype=dtype, device=self.device)

    def _fail_all(self, error: BaseException, joining: list[Sequence]) -> None:
        chunked = self.chunks.sequences if self.chunks is not None else []
        for sequence in dict.fromkeys([*self.active, *joining, *chunked]):
            sequence.fail(error)
        self.active, self.starts, self.column, self.chunks = [], [], 0, None
        self.cache.positions.fill_(-1)
        self._set_sampler_rows()

    def _set_sampler_rows(self) -> None:
        self._sampler.set_rows([s.sampling for s in self.active], [s.generator for s in self.active])
        self._batch_asks = _Asks(
            grammar=any(s.grammar is not None for s in self.active),
            logprobs=any(s.sampling.logprobs is not None for s in self.active),
        )


def _sharing_prompts(joining: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """The joining requests with one of each prompt first (text prompts, then image prompts), then the requests
    whose prompt is among those (a request's n choices), and for each of the latter the index of the first with
    its prompt: their prefill is computed once and copied. An image prompt is the same only with the same
    processed images (a request's n choices share them): image tokens are alike whatever the image."""
    first: dict[tuple, int] = {}
    distinct, sharing, sources = [], [], []
    for sequence in sorted(joining, key=lambda s: s.pixels is not None):  # stable: the order kept otherwise
        key = (tuple(sequence.prompt_ids), sequence.pixels)
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


def _grown(state: torch.Tensor, rows: int) -> torch.Tensor:
    grown = state.new_zeros(rows, *state.shape[1:])
    kept = min(rows, state.shape[0])
    grown[:kept] = state[:kept]
    return grown


def _shed() -> ShedForMemory:
    return ShedForMemory(
        "out of memory on the device: this request, the newest in its batch, was dropped so the others could go on"
    )
