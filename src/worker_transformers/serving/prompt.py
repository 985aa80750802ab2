"""A request's input as token ids: the chat template applied to messages, or the prompt as is, and the caps.

A chat template is code (Jinja) that ships with the model, and the messages it runs on are the caller's: a
template that loops, always or only on some content, would hold a thread for good, and Python cannot stop a
thread. So templates render in child processes forked from the worker (they inherit the tokenizer, nothing is
imported again), one per request rendering at that moment, reused across requests; one that has not
answered within TEMPLATE_TIMEOUT_S is killed, the job fails with a message naming the template, and the next
render forks a fresh child. A render costs the worker a pipe round trip on top of the template itself.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from multiprocessing.connection import Connection
from typing import Any

from transformers import PreTrainedTokenizerBase

from worker_transformers.serving.schema import GenerationRequest, RequestError

TEMPLATE_TIMEOUT_S = 5.0
PARENT_CHECK_S = 1.0
# Tokens average 3-5 characters of text; no real prompt averages 16, so text past 16 per allowed token is
# refused unread.
CHARS_PER_TOKEN_LIMIT = 16


class TemplateTimeout(RequestError):
    """The chat template did not finish rendering in time; its child process was stopped."""


class Prompts:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_name: str, max_input_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_input_tokens = max_input_tokens
        self._idle: queue.SimpleQueue[_Renderer] = queue.SimpleQueue()

    def ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the request's input. Raises RequestError naming the field."""
        self._check_size(request)
        if request.messages is not None:
            text = self.render(request.template_messages(), request.template_tools())
            # The template already holds the special tokens (BOS, turn markers); do not add them twice.
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if len(ids) > self.max_input_tokens:
            field = "messages" if request.messages is not None else "prompt"
            raise RequestError(
                f"{field}: {len(ids)} tokens is more than MAX_INPUT_TOKENS={self.max_input_tokens}; send less"
            )
        if not ids:
            raise RequestError("prompt: the text has no tokens")
        return ids

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The chat template applied to `messages` (and `tools`, when the request has them), within
        TEMPLATE_TIMEOUT_S."""
        if not self.tokenizer.chat_template:
            raise RequestError("messages: this model has no chat template; send prompt instead")
        try:
            renderer = self._idle.get_nowait()
        except queue.Empty:
            renderer = _Renderer(self.tokenizer)
        answer = renderer.render(messages, tools, TEMPLATE_TIMEOUT_S)
        if answer is None:
            renderer.stop()
            raise TemplateTimeout(
                f"messages: the chat template of {self.model_name} did not finish rendering them within "
                f"{TEMPLATE_TIMEOUT_S:.0f} s and was stopped; the template loops on this input: fix the model's "
                "chat template (chat_template.jinja or tokenizer_config.json), or send prompt instead"
            )
        self._idle.put(renderer)
        kind, detail = answer
        if kind == "error":  # the template's own refusal (raise_exception), such as roles out of order
            raise RequestError(f"messages: the chat template of {self.model_name} refused them: {detail}")
        return detail

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().stop()
            except queue.Empty:
                return

    def _check_size(self, request: GenerationRequest) -> None:
        """Refuse text far beyond MAX_INPUT_TOKENS before tokenizing it: tokenizing megabytes costs seconds of
        CPU, only to refuse them afterwards."""
        field = "messages" if request.messages is not None else "prompt"
        size = (
            sum(len(m.content or "") for m in request.messages) if request.messages is not None else len(request.prompt)
        )
        limit = CHARS_PER_TOKEN_LIMIT * self.max_input_tokens
        if size > limit:
            raise RequestError(
                f"{field}: {size} characters is more than {limit} ({CHARS_PER_TOKEN_LIMIT} per token of "
                f"MAX_INPUT_TOKENS={self.max_input_tokens}); send less"
            )


class _Renderer:
    """One child process that renders the tokenizer's chat template for each message list sent to it."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        context = multiprocessing.get_context("fork")  # inherits the tokenizer: no imports, no pickling
        self._connection, child_end = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child_end, tokenizer, os.getpid()), name="chat-template", daemon=True
        )
        self._process.start()
        child_end.close()

    def render(self, messages: list[dict[str, Any]], tools: list | None, timeout_s: float) -> tuple[str, str] | None:
        """("text", the rendered text) or ("error", the template's message); None when it did not answer in time."""
        self._connection.send((messages, tools))
        if not self._connection.poll(timeout_s):
            return None
        return self._connection.recv()

    def stop(self) -> None:
        self._process.kill()
        self._process.join()
        self._connection.close()


def _serve(connection: Connection, tokenizer: PreTrainedTokenizerBase, worker_pid: int) -> None:
    # A worker that exits without stopping its children (os._exit, SIGKILL) leaves this one waiting: other
    # children forked later hold copies of this pipe's worker end, so no end-of-file comes. Hence the check.
    while True:
        while not connection.poll(PARENT_CHECK_S):
            if os.getppid() != worker_pid:
                return
        try:
            messages, tools = connection.recv()
        except EOFError:  # the worker closed its end
            return
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except Exception as error:  # jinja2's TemplateError from raise_exception, or a template that is broken
            connection.send(("error", f"{type(error).__name__}: {error}"))
        else:
            connection.send(("text", text))
