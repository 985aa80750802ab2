"""Generation, the seam the job formats (serving/) talk to: a request in generation's terms (its prompt's token
ids, sampling settings, stop strings, grammar) in; its events (text as it comes, then the end) out.

`Generation` holds what every request shares: the tokenizer's incremental decoding, the grammar compiler, the
model's end-of-sequence tokens, and the engine (engine.py) chosen at startup by the ENGINE setting, or by
choice.py when it is `auto`: the batcher for models it can batch, else `generate` one request at a time, or
transformers' continuous batching when ENGINE=continuous asks for it. The checks a request must pass before it
is queued (`check`) come first, so a request that is refused is refused before its first chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker_transformers.generation import choice
from worker_transformers.generation.batch.batcher import Batcher, ShedForMemory
from worker_transformers.generation.batch.compiled import DecodeGraph
from worker_transformers.generation.continuous import ContinuousEngine
from worker_transformers.generation.engine import Engine
from worker_transformers.generation.errors import DeviceFailed, GenerationFailed, OutOfMemory, RequestError
from worker_transformers.generation.events import Delta, Done, Event, Failed, Sequence
from worker_transformers.generation.grammar import Grammar, Grammars
from worker_transformers.generation.sampling import Sampling
from worker_transformers.generation.serial import SerialEngine
from worker_transformers.generation.textstream import Detokenizer, TextStream
from worker_transformers.generation.vision import Pixels, VisionModel
from worker_transformers.loading.loader import free_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One answer to generate. `grammar` is compiled once per request and never advanced itself: the answer
    takes a copy (a request's n choices share it)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    grammar: Grammar | None = None
    pixels: Pixels | None = None  # the prompt's processed images, for a vision-language model
    keep_special_tokens: bool = False  # the text shows them: a reader of the model's markup needs them


class Generation:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_input_tokens: int,
        max_batch: int,
        max_new_tokens: int,
        engine_setting: str = "auto",
        image_prompt: tuple[list[int], Pixels] | None = None,
        compile_mode: str = "off",
        compile_artifacts: Path | None = None,
    ) -> None:
        """`image_prompt`: for a model that takes images, a sample image prompt its processor made (its ids and
        processed images), with which the batcher is checked; None: the worker takes no images. `compile_mode`
        (COMPILE): whether the batcher's decode step is compiled, its compiled code kept in `compile_artifacts`;
        the compile itself starts when startup says (`decode_graph.start`)."""
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.model_type = model.config.model_type
        self.generation_config = model.generation_config
        eos = _eos_ids(model, tokenizer)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.grammars = Grammars(tokenizer, max(self.vocab_size, len(tokenizer)), eos)
        self.vision = VisionModel.of(model) if image_prompt is not None else None
        self.engine_kind, layout, why = choice.choose(
            model, self.detokenizer, engine_setting, self.vision, image_prompt
        )
        longest_request = max_input_tokens + max_new_tokens
        self.engine = _start_engine(
            self.engine_kind, model, tokenizer, eos, layout, why, max_batch, longest_request, self.vision
        )
        self.decode_graph: DecodeGraph | None = None  # the batcher's compiled decode step, where it has one
        if self.engine_kind == "batch" and compile_mode != "off":
            why_eager = DecodeGraph.why_not(model, layout)
            if why_eager:
                log.info("decode step: eager, not compiled (%s)", why_eager)
            else:
                self.decode_graph = self.engine.graph = DecodeGraph(model, layout, compile_artifacts, max_batch)

    @property
    def warmed_up(self) -> bool:
        """Whether choosing the engine ran it already (the batcher's check: batch/check.py), so that the first
        job pays no first-call costs without a warm-up generation of its own."""
        return self.engine_kind == "batch"

    @property
    def concurrency(self) -> int:
        """Requests the engine runs at once: what the SDK should hand this worker."""
        return self.engine.max_batch

    def check(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, images: int = 0) -> None:
        """RequestError when the request could never fit the engine's KV cache, names a token outside the
        vocabulary, or has `images` the engine cannot take."""
        if images and self.engine_kind == "continuous":
            raise RequestError(
                "messages: ENGINE=continuous (transformers' continuous batching) takes no images; send text only, "
                "or serve this model with ENGINE=auto"
            )
        limit = self.engine.max_request_tokens
        if limit is not None and len(prompt_ids) + max_new_tokens > limit:
            raise RequestError(
                f"max_new_tokens: {len(prompt_ids)} prompt tokens and up to {max_new_tokens} new ones need more KV "
                f"cache than this worker has ({limit} tokens for one request); send a shorter prompt or ask for "
                "fewer tokens"
            )
        outside = [token for token, _ in sampling.logit_bias if token >= self.vocab_size]
        if outside:
            raise RequestError(
                f"logit_bias: token {outside[0]} is not in this model's vocabulary (0 to {self.vocab_size - 1})"
            )

    def submit(self, job: Job, emit: Callable[[Event], None]) -> Sequence:
        sequence = Sequence(
            prompt_ids=job.prompt_ids,
            max_new_tokens=job.max_new_tokens,
            sampling=job.sampling,
            text=TextStream(self.detokenizer, job.prompt_ids, job.stop, job.keep_special_tokens),
            emit=emit,
            generator=job.sampling.generator(self.engine.device),
            grammar=None if job.grammar is None else job.grammar.copy(),
            pixels=job.pixels,
        )
        self.engine.submit(sequence)
        return sequence

    async def stream(self, job: Job) -> AsyncIterator[Delta | Done]:
        """The job's events as the engine produces them. Leaving early (the job was cancelled or timed out) takes
        the request out of the engine."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sequence = self.submit(job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = _raised(await events.get())
                yield event
                if isinstance(event, Done):
                    return
        finally:
            if not sequence.finished:
                self.engine.cancel(sequence)

    def events(self, job: Job) -> Iterator[Delta | Done]:
        """The job's events, blocking: for scripts, tests and benchmarks outside an event loop."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(job, events.put)
        while True:
            event = _raised(events.get())
            yield event
            if isinstance(event, Done):
                return

    def close(self) -> None:
        self.engine.close()


def _start_engine(kind, model, tokenizer, eos, layout, why, max_batch, longest_request, vision) -> Engine:
    """The engine `kind` names (choice.py chose it, `why`), started, and what it holds logged."""
    if kind == "serial":
        log.info("engine: serial, one request at a time through generate (%s)", why)
        return SerialEngine(model, eos, tokenizer.pad_token_id)
    # The cache's room: the GPU's free memory, or half the host's (the page cache holds the memory-mapped
    # weights and the rest of the worker).
    free = free_bytes(model.device) or 0
    budget = choice.memory_budget(model, free if model.device.type == "cuda" else free // 2)
    if kind == "batch":
        engine = Batcher(model, max_batch, eos, layout, budget, vision=vision)
        held = f"a cache budget of {budget / 1e9:.2f} GB"
        if layout.kv_bytes_per_token:
            held += f" ({budget // layout.kv_bytes_per_token} tokens of keys and values)"
        if layout.state_bytes_per_row:
            held += f", recurrent states of {layout.state_bytes_per_row / 1e6:.2f} MB per sequence"
    else:
        engine = ContinuousEngine(model, max_batch, eos, budget // max(layout.kv_bytes_per_token, 1), longest_request)
        held = f"a paged KV cache of {engine.cache_tokens} tokens"
    log.info("engine: %s (%s), up to %d sequences per step, %s", kind, why, engine.max_batch, held)
    return engine


def _raised(event: Event) -> Delta | Done:
    """The event, or the failure it reports raised as the kind of GenerationFailed the job formats tell apart."""
    if not isinstance(event, Failed):
        return event
    error = event.error
    if isinstance(error, torch.OutOfMemoryError):
        raise OutOfMemory(isinstance(error, ShedForMemory), event.oom_event) from error
    if isinstance(error, torch.AcceleratorError):
        failed = f"the device failed while generating ({type(error).__name__}); retry the request"
        raise DeviceFailed(failed) from error
    raise GenerationFailed(f"generation failed: {type(error).__name__}") from error


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}
