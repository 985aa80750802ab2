"""The plain job format: a job's input is a GenerationRequest's fields (schema.py); its answer is
`{"text", "finish_reason", "usage", "model"}`, with `logprobs`, `reasoning_content` and `tool_calls` when it has
them. Streamed, it comes as chunks (`{"text"}` with the log-probabilities of its tokens, `{"reasoning_content"}`,
`{"tool_calls"}`) and ends with that shape, its text and calls already sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from transformers import PreTrainedTokenizerBase

from worker_transformers.generation.events import Done
from worker_transformers.serving.answer import Answer, Piece, finish_reason, gather, logprobs_json, read, usage
from worker_transformers.serving.schema import GenerationRequest, RequestError, parse_request
from worker_transformers.serving.tools.reader import Call, Reasoning, ToolCallFailed, ToolFormat


class PlainJobs:
    """Answers plain jobs through the frontend (frontend.py)."""

    def __init__(self, frontend, max_new_tokens: int, model_defaults: Mapping[str, Any], tool_format: ToolFormat):
        self.frontend = frontend
        self.max_new_tokens = max_new_tokens
        self.model_defaults = model_defaults
        self.tool_format = tool_format

    async def handle(self, job_input: Any) -> AsyncIterator[dict[str, Any]]:
        # Everything the caller can get wrong is checked before the first chunk: a stream's consumers never
        # see an error yielded after it.
        try:
            request = parse_request(job_input, self.max_new_tokens, self.model_defaults)
            self.tool_format.check(request)
            prepared = await asyncio.to_thread(self.frontend.prepare, request)
        except RequestError as error:
            yield {"error": str(error)}
            return
        pieces = read(self.frontend, request, prepared, self.tool_format)
        try:
            if request.stream:
                async for chunk in self._chunks(request, pieces):
                    yield chunk
            else:
                yield response(await gather(pieces), request, self.frontend.model_name, self.frontend.tokenizer)
        except ToolCallFailed as error:
            yield {"error": str(error)}

    async def _chunks(self, request: GenerationRequest, pieces: AsyncIterator[Piece | Done]) -> AsyncIterator[dict]:
        """A chunk per piece; a chunk of text carries the log-probabilities gathered since the last one."""
        tokenizer = self.frontend.tokenizer
        sent = Answer()  # the calls sent, and the log-probabilities not sent yet
        async for piece in pieces:
            if isinstance(piece, Done):
                sent.done = piece
                yield response(sent, request, self.frontend.model_name, tokenizer, streamed=True)
            elif isinstance(piece, Call):
                sent.calls.append(piece)
                yield {"tool_calls": [piece.openai()]}
            elif isinstance(piece, Reasoning):
                yield {"reasoning_content": piece.text}
            elif isinstance(piece, str):
                chunk = {"text": piece}
                if request.logprobs:
                    chunk["logprobs"] = logprobs_json(tokenizer, sent.logprobs)
                yield chunk
                sent.logprobs = []
            else:
                sent.take(piece)


def response(
    answer: Answer,
    request: GenerationRequest,
    model_name: str,
    tokenizer: PreTrainedTokenizerBase,
    streamed: bool = False,
) -> dict[str, Any]:
    """The answer's last (or only) object: a stream's has no text and no calls, its chunks carried them."""
    done = answer.done
    body = {
        "text": "" if streamed else "".join(answer.text),
        "finish_reason": finish_reason(done, len(answer.calls)),
        "usage": usage([done]),
        "model": model_name,
    }
    if request.logprobs:
        body["logprobs"] = logprobs_json(tokenizer, answer.logprobs)
    if answer.reasoning:
        body["reasoning_content"] = "".join(answer.reasoning)
    if answer.calls and not streamed:
        body["tool_calls"] = [call.openai() for call in answer.calls]
    return body
