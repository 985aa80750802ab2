"""Structured output: a grammar per request that says which tokens may come next, enforced while decoding.

llguidance compiles a JSON Schema into a matcher that, before each step, marks the tokens that keep the text
valid (a bitmask, computed on the host in tens of microseconds while the device runs the forward), and after it
takes the token chosen. It was chosen over xgrammar, which does the same: llguidance has no dependencies (xgrammar
pulls triton and tvm-ffi into the image), needs no compilation step per tokenizer beyond reading its vocabulary,
and refuses a schema keyword it does not implement instead of ignoring it. Each request has its own matcher, so
requests with different schemas, or none, share a batch: a row without one allows every token.

The JSON comes compact, with no whitespace between its tokens: a model cannot pad it out forever, and an answer
that fits in `max_new_tokens` is valid.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import llguidance
import llguidance.hf
import torch

from worker_transformers.generation.errors import RequestError

log = logging.getLogger(__name__)

_JSON_OPTIONS = {"whitespace_flexible": False}


class Grammar:
    """One request's matcher: the tokens it allows next, and the tokens it has taken."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def copy(self) -> Grammar:
        """An independent matcher in the same state (for an engine that runs ahead of the request)."""
        return Grammar(self._matcher.deep_copy())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into `bitmask[row]` (int32, 32 tokens a word, on the host)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def consume(self, token: int) -> str | None:
        """Take the chosen token; what went wrong when the grammar could not (None: it could)."""
        if self._matcher.consume_token(token) and not self._matcher.is_error():
            return None
        return self._matcher.get_error() or f"token {token} is not allowed here"

    @property
    def complete(self) -> bool:
        """Whether the text is whole: nothing more may follow it."""
        return self._matcher.is_stopped()


class Grammars:
    """Compiles requests' JSON Schemas against this model's vocabulary. The vocabulary's own form for llguidance
    takes a second or so to build for a large tokenizer: it is built on the first request that needs it, not at
    startup, which structured output must not slow down."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        # Tokens that write no text: a grammar that allows only these at the start cannot be written at all.
        self._textless = sorted(set(eos_ids) | set(getattr(tokenizer, "all_special_ids", ())))
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _vocabulary(self, field: str) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                started = time.monotonic()
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None
                    )
                except ValueError as error:  # not a fast (tokenizers) tokenizer
                    raise RequestError(
                        f"{field}: structured output needs a tokenizer with a tokenizer.json ({error}); this model's "
                        "has none"
                    ) from None
                log.info("structured output: the vocabulary was read in %.2f s", time.monotonic() - started)
            return self._tokenizer

    def compile(self, schema: dict[str, Any], field: str) -> Grammar:
        """A grammar for JSON text valid under `schema`; RequestError naming `field` when it cannot be compiled."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as error:
            raise RequestError(f"{field}: not a JSON Schema ({error})") from None
        matcher = llguidance.LLMatcher(self._vocabulary(field), grammar, log_level=0)
        if matcher.is_error():
            reason = " ".join(matcher.get_error().split())[:300]
            raise RequestError(f"{field}: the schema cannot be enforced ({reason}); simplify it")
        grammar = Grammar(matcher)
        [first] = allowed_tokens([grammar], self.vocab_size, torch.device("cpu"))
        first[self._textless] = False
        if not first.any():
            raise RequestError(f"{field}: no token of this model's vocabulary can begin such JSON")
        return grammar


def allowed_tokens(grammars: list[Grammar | None], vocab: int, device: torch.device) -> torch.Tensor | None:
    """(rows, vocab) booleans: the tokens each row's grammar allows next, every token for a row without one; None
    when no row has a grammar."""
    if all(grammar is None for grammar in grammars):
        return None
    words = (vocab + 31) // 32
    bitmask = torch.full((len(grammars), words), -1, dtype=torch.int32)
    for row, grammar in enumerate(grammars):
        if grammar is not None:
            grammar.fill(bitmask, row)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    allowed = (bitmask.to(device, non_blocking=True)[:, :, None] >> bits) & 1
    return allowed.view(len(grammars), words * 32)[:, :vocab].bool()
