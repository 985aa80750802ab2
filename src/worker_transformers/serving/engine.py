"""Generation: a validated request in, text with its finish reason and token counts out, whole or streamed.

The engine owns the tokenizer and the batcher (which owns the model). Tokenizing and the input cap happen
before anything is queued (prompt.py), so a request that is refused is refused before its first chunk.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker_transformers.serving.batcher import Batcher, Delta, Done, Event, Failed, Sequence
from worker_transformers.serving.prompt import Prompts
from worker_transformers.serving.sampling import Sampler
from worker_transformers.serving.schema import GenerationRequest
from worker_transformers.serving.textstream import TextStream


class GenerationFailed(RuntimeError):
    """The model failed while generating (not the caller's fault); the cause is chained and was logged."""


class OutOfMemory(GenerationFailed):
    """The device ran out of memory during this request's batch; the batch's memory has been released."""

    def __str__(self) -> str:
        return (
            "out of memory on the device while generating; the request was dropped and its memory freed: retry it, "
            "and if it recurs lower MAX_CONCURRENCY, MAX_NEW_TOKENS or MAX_INPUT_TOKENS, or use a larger GPU"
        )


def _failure(error: BaseException) -> GenerationFailed:
    if isinstance(error, torch.OutOfMemoryError):
        return OutOfMemory()
    return GenerationFailed(f"generation failed: {type(error).__name__}")


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_input_tokens: int,
        max_batch: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.prompts = Prompts(tokenizer, model_name, max_input_tokens)
        self.batcher = Batcher(model, max_batch, _eos_ids(model, tokenizer))

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return self.prompts.ids(request)

    def submit(self, request: GenerationRequest, ids: list[int], emit: Callable[[Event], None]) -> Sequence:
        sequence = Sequence(
            prompt_ids=ids,
            max_new_tokens=request.max_new_tokens,
            sampler=Sampler(request, self.batcher.device),
            text=TextStream(self._decode, request.stop),
            emit=emit,
        )
        self.batcher.submit(sequence)
        return sequence

    async def stream(self, request: GenerationRequest, ids: list[int]) -> AsyncIterator[Delta | Done]:
        """Events for one request as the batcher produces them. Leaving early (the job was cancelled or
        timed out) takes the request out of the batch."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        sequence = self.submit(request, ids, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            while True:
                event = await events.get()
                if isinstance(event, Failed):
                    raise _failure(event.error) from event.error
                yield event
                if isinstance(event, Done):
                    return
        finally:
            if not sequence.finished:
                self.batcher.cancel(sequence)

    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        """The whole answer, blocking: for scripts, tests and benchmarks outside an event loop."""
        ids = self.prompt_ids(request)
        events: queue.Queue[Event] = queue.Queue()
        self.submit(request, ids, events.put)
        pieces = []
        while True:
            event = events.get()
            if isinstance(event, Failed):
                raise _failure(event.error) from event.error
            pieces.append(event.text)
            if isinstance(event, Done):
                return self.response("".join(pieces), event)

    def close(self) -> None:
        self.batcher.close()
        self.prompts.close()

    def response(self, text: str, done: Done) -> dict[str, Any]:
        return {
            "text": text,
            "finish_reason": done.finish_reason,
            "usage": usage(done),
            "model": self.model_name,
        }

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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
