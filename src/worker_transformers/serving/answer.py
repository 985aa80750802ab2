"""The one reader of an answer, for every job format (plain.py, openai/routes.py): the events of a request's
generation read into the pieces of its answer, and an answer gathered whole.

Pieces are answer text (a str), reasoning, tool calls, and the log-probabilities of the tokens behind the pieces
that follow. A chat's answer is read for reasoning and tool calls as it streams, by the model's format
(tools/reader.py); a prompt's text, or the answer of a model whose format reads nothing, is its answer as it comes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from worker_transformers.generation.events import Delta, Done
from worker_transformers.generation.sampling import TokenLogprobs
from worker_transformers.serving.schema import GenerationRequest
from worker_transformers.serving.tools.reader import (
    Call,
    CallArguments,
    CallReader,
    CallStart,
    ForcedCallReader,
    Reasoning,
    ToolFormat,
    call_reader,
)


@dataclass(frozen=True)
class Logprobs:
    """The log-probabilities of the tokens behind the pieces that follow (when the request asked for them)."""

    items: tuple[TokenLogprobs, ...]


Piece = str | Reasoning | CallStart | CallArguments | Call | Logprobs  # a str is answer text


def read(frontend, request: GenerationRequest, prepared, tool_format: ToolFormat) -> AsyncIterator[Piece | Done]:
    """The pieces of `request`'s answer as `frontend` (frontend.py) generates it, then its Done."""
    reader = call_reader(tool_format, request, prepared.chat or "")
    keep_special = getattr(reader, "keeps_special_tokens", False)
    return _pieces(frontend.stream(request, prepared, keep_special_tokens=keep_special), reader)


async def _pieces(
    events: AsyncIterator[Delta | Done], reader: CallReader | ForcedCallReader | None
) -> AsyncIterator[Piece | Done]:
    """An event's log-probabilities come first, as a Logprobs piece, then the pieces its text makes."""
    async for event in events:
        if event.logprobs:
            yield Logprobs(event.logprobs)
        pieces = reader.feed(event.text) if reader is not None else [event.text]
        if isinstance(event, Done) and reader is not None:
            pieces += reader.finish(event.finish_reason)
        for piece in pieces:
            if piece != "":
                yield piece
        if isinstance(event, Done):
            yield event


@dataclass
class Answer:
    """One answer's pieces, gathered."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    done: Done | None = None

    def take(self, piece: Piece | Done) -> None:
        """Gather a piece; a call's start and fragments are whole in its Call."""
        if isinstance(piece, (CallStart, CallArguments)):
            return
        if isinstance(piece, Done):
            self.done = piece
        elif isinstance(piece, Call):
            self.calls.append(piece)
        elif isinstance(piece, Reasoning):
            self.reasoning.append(piece.text)
        elif isinstance(piece, Logprobs):
            self.logprobs.extend(piece.items)
        else:
            self.text.append(piece)


async def gather(pieces: AsyncIterator[Piece | Done]) -> Answer:
    answer = Answer()
    async for piece in pieces:
        answer.take(piece)
        if answer.done is not None:
            return answer
    raise RuntimeError("the generation ended without a final event")


def finish_reason(done: Done, calls: int) -> str:
    """OpenAI's finish reason, which the plain format shares: `tool_calls` when the answer ended by calling
    tools."""
    return "tool_calls" if calls and done.finish_reason != "length" else done.finish_reason


def usage(dones: list[Done]) -> dict[str, int]:
    """The usage of all of a request's answers (its n choices): its prompt once, every answer's tokens."""
    prompt, completion = dones[0].prompt_tokens, sum(done.completion_tokens for done in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_json(tokenizer: PreTrainedTokenizerBase, logprobs: list[TokenLogprobs]) -> list[dict[str, Any]]:
    """Log-probabilities as OpenAI's chat completions give them: each token's text, its UTF-8 bytes, its
    log-probability and the likeliest tokens' at its position."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [
        {**entry(item.token, item.logprob), "top_logprobs": [entry(token, lp) for token, lp in item.top]}
        for item in logprobs
    ]
