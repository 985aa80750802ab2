"""The job formats' one way into generation: a validated request (schema.py) in generation's terms (its prompt's
token ids, sampling settings, stop strings, grammar), its events out, whole or streamed.

Rendering and tokenizing the input and its caps (prompt.py), the request's sampling settings checked and clamped,
the check that it can fit the engine's KV cache, and the compilation of its grammar (its response_format, or the
schema of a required tool call) happen before anything is queued (`prepare`), so a request that is refused is
refused before its first chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from worker_transformers.generation.events import Delta, Done, Event, Sequence
from worker_transformers.generation.grammar import Grammar
from worker_transformers.generation.sampling import MAX_PENALTY, MIN_TEMPERATURE, Sampling
from worker_transformers.generation.service import Generation, Job
from worker_transformers.loading.loader import LoadError
from worker_transformers.serving import plain
from worker_transformers.serving.answer import Answer
from worker_transformers.generation.vision import Pixels
from worker_transformers.serving.images import ImageLimits
from worker_transformers.serving.processing import ImagePrompts
from worker_transformers.serving.prompt import Prompts
from worker_transformers.serving.renderer import TemplateRenderers
from worker_transformers.serving.schema import GenerationRequest, RequestError
from worker_transformers.serving.tools.reader import ToolFormat, forced_call_schema


@dataclass(frozen=True)
class Prepared:
    """A request ready to queue: its prompt's token ids and, when its answer has a form, the grammar of it,
    compiled once (each answer, one per choice, takes a copy)."""

    ids: list[int]
    grammar: Grammar | None = None
    pixels: Pixels | None = None  # its processed images, for a vision-language model
    chat: str | None = None  # the chat as the template wrote it, which its answer goes on from (None for a prompt)


class Frontend:
    def __init__(
        self,
        generation: Generation,
        model_name: str,
        max_input_tokens: int,
        renderers: TemplateRenderers | None = None,
        images: ImagePrompts | None = None,
        image_limits: ImageLimits | None = None,
    ) -> None:
        """`renderers`: the chat-template renderers startup began before its imports (prompt.py makes a pool of
        one when there are none). `images`: the model's processor, for a model that takes images."""
        self.generation = generation
        # How its answers are read for tool calls and reasoning (tools/reader.py): nothing read, no tools taken,
        # until startup chooses (`choose_tool_format`), once the chat template has rendered the warm-up.
        self.tool_format = ToolFormat.reading_nothing(generation.model_type)
        self.tokenizer = generation.tokenizer
        self.model_name = model_name
        self.prompts = Prompts(generation.tokenizer, model_name, max_input_tokens, renderers, images, image_limits)

    def prepare(self, request: GenerationRequest) -> Prepared:
        """The request's token ids (prompt.py) and grammar; RequestError when it could never fit the KV cache,
        names a token outside the vocabulary, or has a schema that cannot be enforced."""
        ids, pixels, chat = self.prompts.inputs(request)
        self.generation.check(ids, request.max_new_tokens, sampling_of(request), pixels.images if pixels else 0)
        schema = request.json_schema()
        if request.required_tool is not None:
            schema = forced_call_schema(request), "tools"
        return Prepared(ids, None if schema is None else self.generation.grammars.compile(*schema), pixels, chat)

    def job(self, request: GenerationRequest, prepared: Prepared, keep_special_tokens: bool = False) -> Job:
        return Job(
            prepared.ids,
            request.max_new_tokens,
            sampling_of(request),
            request.stop,
            prepared.grammar,
            prepared.pixels,
            keep_special_tokens,
        )

    def submit(self, request: GenerationRequest, prepared: Prepared, emit: Callable[[Event], None]) -> Sequence:
        return self.generation.submit(self.job(request, prepared), emit)

    def stream(
        self, request: GenerationRequest, prepared: Prepared, keep_special_tokens: bool = False
    ) -> AsyncIterator[Delta | Done]:
        """Events for one request as the engine produces them; leaving early takes it out of the engine. With
        `keep_special_tokens`, the text shows them (for a reader of the model's markup, tools/reader.py)."""
        return self.generation.stream(self.job(request, prepared, keep_special_tokens))

    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        """The whole answer in the plain format, blocking: for scripts, tests and benchmarks outside an event
        loop."""
        answer = Answer()
        for event in self.generation.events(self.job(request, self.prepare(request))):
            answer.text.append(event.text)
            answer.logprobs.extend(event.logprobs)
        answer.done = event
        return plain.response(answer, request, self.model_name, self.tokenizer)

    def warm_up_ids(self) -> list[int]:
        """The warm-up's prompt: a one-message chat rendered by the chat template as a job's is (bounded), or
        plain text for a model without one. A template that fails on it stops startup."""
        if not self.tokenizer.chat_template:
            return self.tokenizer("Hi")["input_ids"]
        try:
            text = self.prompts.render([{"role": "user", "content": "Hi"}])
        except RequestError as error:
            raise LoadError(f"warm-up failed: {str(error).removeprefix('messages: ')}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def choose_tool_format(self, setting: str) -> None:
        """The model's format by RESPONSE_TEMPLATE (tools/formats.py), its chat template's probes rendered as jobs'
        chats are, bounded in time."""

        def render(messages, tools, add_generation_prompt) -> str:
            return self.prompts.render(messages, tools, add_generation_prompt=add_generation_prompt)

        self.tool_format = ToolFormat.of(self.tokenizer, self.generation.model_type, setting, render)

    def close(self) -> None:
        self.generation.close()
        self.prompts.close()


def sampling_of(request: GenerationRequest) -> Sampling:
    """The request's sampling settings, checked and clamped once."""
    return Sampling(
        greedy=request.greedy,
        temperature=max(request.temperature, MIN_TEMPERATURE),
        top_k=min(request.top_k, 1 << 31),  # any k past the vocabulary keeps every token
        top_p=request.top_p,
        # Past these bounds a penalty already pushes seen tokens to the edge of the distribution; inside them
        # it stays a finite float32 (3.4e38, the schema's largest, rounds to inf and 0 x inf is nan).
        repetition_penalty=min(max(request.repetition_penalty, 1 / MAX_PENALTY), MAX_PENALTY),
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=tuple((int(token), bias) for token, bias in (request.logit_bias or {}).items()),
        logprobs=request.top_logprobs if request.logprobs else None,
    )
