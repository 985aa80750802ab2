"""Generation: a validated request in, text with its finish reason and token counts out, whole or streamed.

The engine owns the tokenizer and the generator that runs the model: the batcher for models it can batch, else
`generate` one request at a time (choice.py decides, at startup), or transformers' continuous batching when
ENGINE=continuous asks for it. Rendering and tokenizing the input and its caps (prompt.py), the check that a
request can fit the KV budget and the compilation of its grammar (grammar.py) happen before anything is queued
(`prepare`), so a request that is refused is refused before its first chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker_transformers.generation import choice
from worker_transformers.generation.batcher import Batcher, ShedForMemory
from worker_transformers.generation.continuous import ContinuousGenerator
from worker_transformers.generation.events import Delta, Done, Event, Failed, Sequence
from worker_transformers.generation.grammar import Grammar, Grammars
from worker_transformers.serving.prompt import Prompts
from worker_transformers.generation.sampling import Sampling, TokenLogprobs
from worker_transformers.serving.schema import GenerationRequest, RequestError
from worker_transformers.generation.serial import SerialGenerator
from worker_transformers.generation.textstream import Detokenizer, TextStream
from worker_transformers.serving.tools import forced_call_schema

log = logging.getLogger(__name__)


class GenerationFailed(RuntimeError):
    """The model failed while generating (not the caller's fault); the cause is chained and was logged."""


class OutOfMemory(GenerationFailed):
    """The device ran out of memory for this request; its memory has been released. `event` names the
    out-of-memory event, which may have failed other requests too."""

    def __init__(self, shed: bool, event: int | None) -> None:
        super().__init__()
        self.shed, self.event = shed, event

    def __str__(self) -> str:
        what = (
            "the request, the newest in its batch, was dropped so the others could go on"
            if self.shed
            else "the request was dropped and its memory freed"
        )
        return (
            f"out of memory on the device while generating; {what}: retry it, and if it recurs lower "
            "MAX_CONCURRENCY, MAX_NEW_TOKENS or MAX_INPUT_TOKENS, or use a larger GPU"
        )


class DeviceFailed(GenerationFailed):
    """The device itself failed (a CUDA error such as a device-side assert): every later call fails too, so the
    worker asks to be replaced."""


def _failure(failed: Failed) -> GenerationFailed:
    error = failed.error
    if isinstance(error, torch.OutOfMemoryError):
        return OutOfMemory(isinstance(error, ShedForMemory), failed.oom_event)
    if isinstance(error, torch.AcceleratorError):
        return DeviceFailed(f"the device failed while generating ({type(error).__name__}); retry the request")
    return GenerationFailed(f"generation failed: {type(error).__name__}")


@dataclass(frozen=True)
class Prepared:
    """A request ready to queue: its prompt's token ids and, when its answer has a form, the grammar of it,
    compiled once and never advanced itself (each answer, one per choice, takes a copy)."""

    ids: list[int]
    grammar: Grammar | None = None


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_input_tokens: int,
        max_batch: int,
        max_new_tokens: int,
        engine: str = "auto",
    ) -> None:
        self.tokenizer = tokenizer
        self.detokenizer = Detokenizer(tokenizer)
        self.model_name = model_name
        self.max_input_tokens = max_input_tokens
        self.model_type = model.config.model_type
        self.generation_config = model.generation_config
        self.prompts = Prompts(tokenizer, model_name, max_input_tokens)
        eos = _eos_ids(model, tokenizer)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.grammars = Grammars(tokenizer, max(self.vocab_size, len(tokenizer)), eos)
        self.kind, shape, why = choice.choose(model, self.detokenizer, engine)
        if self.kind == "batch":
            budget = choice.kv_token_budget(model, shape, _free_bytes(model.device))
            self.generator = Batcher(model, max_batch, eos, shape.num_layers, shape.windows, budget)
            log.info(
                "engine: batch (%s), up to %d sequences per step, a KV budget of %d tokens (%.2f GB)",
                why,
                max_batch,
                budget,
                budget * shape.kv_bytes_per_token / 1e9,
            )
        elif self.kind == "continuous":
            budget = choice.kv_token_budget(model, shape, _free_bytes(model.device))
            self.generator = ContinuousGenerator(model, max_batch, eos, budget, max_input_tokens + max_new_tokens)
            log.info(
                "engine: continuous (%s), up to %d sequences per step, a paged KV cache of %d tokens (%.2f GB)",
                why,
                self.generator.max_batch,
                self.generator.cache_tokens,
                self.generator.cache_tokens * shape.kv_bytes_per_token / 1e9,
            )
        else:
            self.generator = SerialGenerator(model, eos, tokenizer.pad_token_id)
            log.info("engine: serial, one request at a time through generate (%s)", why)

    @property
    def concurrency(self) -> int:
        """Requests this engine runs at once: what the SDK should hand this worker."""
        return self.generator.max_batch

    def prepare(self, request: GenerationRequest) -> Prepared:
        """The request's token ids (prompt.py) and grammar; RequestError when it could never fit the KV budget,
        names a token outside the vocabulary, or has a schema that cannot be enforced."""
        ids = self.prompts.ids(request)
        limit = self.generator.max_request_tokens
        if limit is not None and len(ids) + request.max_new_tokens > limit:
            raise RequestError(
                f"max_new_tokens: {len(ids)} prompt tokens and up to {request.max_new_tokens} new ones need more KV "
                f"cache than this worker has ({limit} tokens for one request); send a shorter prompt or ask for "
                "fewer tokens"
            )
        outside = [token for token in request.logit_bias or {} if int(token) >= self.vocab_size]
        if outside:
            raise RequestError(
                f"logit_bias: token {outside[0]} is not in this model's vocabulary (0 to {self.vocab_size - 1})"
            )
        schema = request.json_schema()
        if request.required_tool is not None:
            schema = forced_call_schema(request), "tools"
        return Prepared(ids, None if schema is None else self.grammars.compile(*schema))

    def submit(self, request: GenerationRequest, prepared: Prepared, emit: Callable[[Event], None]) -> Sequence:
        sequence = Sequence(
            prompt_ids=prepared.ids,
            max_new_tokens=request.max_new_tokens,
            sampling=(sampling := Sampling.of(request)),
            text=TextStream(self.detokenizer, prepared.ids, request.stop),
            emit=emit,
            generator=sampling.generator(self.generator.device),
            grammar=None if prepared.grammar is None else prepared.grammar.copy(),
        )
        self.generator.submit(sequence)
        return sequence

    async def stream(self, request: GenerationRequest, prepared: Prepared) -> AsyncIterator[Delta | Done]:
        """Events for one request as the batcher produces them. Leaving early (the job was cancelled or
        timed out) takes the request out of the batch."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sequence = self.submit(request, prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise _failure(event) from event.error
                yield event
                if isinstance(event, Done):
                    return
        finally:
            if not sequence.finished:
                self.generator.cancel(sequence)

    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        """The whole answer, blocking: for scripts, tests and benchmarks outside an event loop."""
        events: queue.Queue[Event] = queue.Queue()
        self.submit(request, self.prepare(request), events.put)
        pieces, logprobs = [], []
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise _failure(event) from event.error
            pieces.append(event.text)
            logprobs.extend(event.logprobs)
            if isinstance(event, Done):
                return self.response("".join(pieces), event, logprobs if request.logprobs else None)

    def close(self) -> None:
        self.generator.close()
        self.prompts.close()

    def response(self, text: str, done: Done, logprobs: list[TokenLogprobs] | None = None) -> dict[str, Any]:
        answer = {"text": text, "finish_reason": done.finish_reason, "usage": usage(done), "model": self.model_name}
        if logprobs is not None:
            answer["logprobs"] = self.logprobs_json(logprobs)
        return answer

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs_json(self, logprobs: list[TokenLogprobs] | tuple[TokenLogprobs, ...]) -> list[dict[str, Any]]:
        """Log-probabilities as OpenAI's chat completions give them: each token's text, its UTF-8 bytes, its
        log-probability and the likeliest tokens' at its position."""

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return [
            {**entry(item.token, item.logprob), "top_logprobs": [entry(token, lp) for token, lp in item.top]}
            for item in logprobs
        ]


def usage(done: Done) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list) else {eos}


def _free_bytes(device: torch.device) -> int:
    """Memory left for the KV cache now that the model is loaded: free GPU memory, or the host's available
    memory (half of it: the page cache holds the memory-mapped weights and the rest of the worker)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from worker_transformers.startup.prefetch import host_memory_free

    return (host_memory_free() or 0) // 2
