"""A request in flight and what it reports, alike for every engine (engine.py): text as it comes, then the end."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker_transformers.generation.grammar import Grammar
from worker_transformers.generation.sampling import Sampling, TokenLogprobs
from worker_transformers.generation.textstream import TextStream
from worker_transformers.generation.vision import Pixels

log = logging.getLogger(__name__)

_arrivals = itertools.count()


@dataclass(frozen=True)
class Delta:
    text: str
    # The generated tokens since the last event, when the request asked for log-probabilities: a token whose
    # text is held back (part of a character, maybe of a stop string) is reported with the event that shows it.
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass(frozen=True)
class Done:
    text: str  # the last piece of text, held back until now
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprobs, ...] = ()


class GrammarFailed(RuntimeError):
    """A token the request's grammar allowed could not be taken by it (a fault of the grammar library)."""


@dataclass(frozen=True)
class Failed:
    error: BaseException
    # The out-of-memory event this failure belongs to: several requests failed by one event count once.
    oom_event: int | None = None


Event = Delta | Done | Failed


@dataclass(eq=False)
class Sequence:
    """One request in flight. `emit` delivers events to whoever waits for them, from the engine's thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    text: TextStream
    emit: Callable[[Event], None]
    generator: torch.Generator | None = None  # the request's own random stream (sampling.py)
    grammar: Grammar | None = None  # what the answer must be (grammar.py)
    pixels: Pixels | None = None  # the prompt's processed images (vision.py)
    generated: list[int] = field(default_factory=list)
    unreported: list[TokenLogprobs] = field(default_factory=list)  # log-probabilities not yet in an event
    cancelled: bool = False  # set by the consumer when nobody wants the rest any more
    finished: bool = False
    arrival: int = field(default_factory=lambda: next(_arrivals))  # the newest are shed first

    @property
    def reserved_tokens(self) -> int:
        """The most cache this request can come to need: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens

    def accept(self, token: int, eos_ids: set[int], logprobs: TokenLogprobs | None = None) -> None:
        """Take the next generated token (with its log-probabilities, when the request asked for them): turn it
        into text, and decide whether the request is done."""
        self.generated.append(token)
        if token in eos_ids:
            return self.finish("stop")
        if logprobs is not None:
            self.unreported.append(logprobs)
        self.text.push(token)
        if self.grammar is not None:
            if (problem := self.grammar.consume(token)) is not None:
                log.error("the grammar could not take token %d: %s", token, problem)
                return self.fail(GrammarFailed(problem))
            if self.grammar.complete:
                return self.finish("stop")
        if self.text.stopped:
            return self.finish("stop")
        if len(self.generated) >= self.max_new_tokens:
            return self.finish("length")
        delta = self.text.release()
        if delta:
            self.emit(Delta(delta, self._report()))

    def finish(self, reason: str) -> None:
        self.text.finish()
        self.finished = True
        text = self.text.release(final=True)
        self.emit(Done(text, reason, len(self.prompt_ids), len(self.generated), self._report()))

    def _report(self) -> tuple[TokenLogprobs, ...]:
        reported, self.unreported = tuple(self.unreported), []
        return reported

    def fail(self, error: BaseException, oom_event: int | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.emit(Failed(error, oom_event))

