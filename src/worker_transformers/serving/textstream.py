"""Token ids in, text out, one token at a time: incremental detokenization and stop strings.

The text must be exactly what the tokenizer makes of the whole sequence. Decoding the generated tokens on their
own is not that: a SentencePiece-style tokenizer (Metaspace: Llama 2, Mistral, Gemma) drops the leading space of
the first word it decodes, so "The capital of" + "lived" would come out where `decode(prompt + answer)` gives
"The capital of lived". So the decoder is seeded with the prompt's last tokens, and only what those tokens and
the new ones decode to beyond the seed is released. `tokenizers`' DecodeStream does exactly this, without
re-decoding the whole answer each step; tokenizers without a `tokenizers` backend get the same window decoding
in Python. A character whose bytes span tokens is released once complete, never as U+FFFD mid-stream.

Text that could still become the start of a stop string is held back until it cannot, so a stream never shows
part of a stop string that is then cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens the decoder is seeded with: enough for any decoder's context (a word's leading space, a
# multi-byte character split across byte-fallback tokens), few enough to cost nothing.
SEED_TOKENS = 8

Decode = Callable[[Sequence[int]], str]


class _WindowDecoder:
    """DecodeStream's algorithm for a tokenizer that has no `tokenizers` backend: decode a short window of
    recent tokens and release what it adds to the settled part."""

    def __init__(self, decode: Decode, seed: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(seed)
        self._prefix = 0  # window start: tokens before it are settled
        self._read = len(self._ids)  # tokens up to here have been turned into text

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        settled = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means the window ends inside a multi-byte character: wait for the next token.
        if len(window) <= len(settled) or window.endswith("\ufffd"):
            return None
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(settled) :]


class TextStream:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        """`tokenizer` is a transformers tokenizer; `prompt_ids` the ids the generated ones follow."""
        self._seed = list(prompt_ids[-SEED_TOKENS:])
        self._decode: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        backend = getattr(tokenizer, "_tokenizer", None)
        if isinstance(backend, Tokenizer):
            stream = DecodeStream(ids=self._seed, skip_special_tokens=True)
            self._step = lambda token_id: stream.step(backend, token_id)
        else:
            self._step = _WindowDecoder(self._decode, self._seed).step
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._decoded = ""  # everything the decoder released, before any stop string is cut
        self.text = ""  # the answer so far, cut at a stop string once one is found
        self._released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; `text` ends before it

    def push(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        piece = self._step(token_id)
        if piece:
            self._extend(piece)

    def finish(self) -> None:
        """No more tokens: settle whatever the decoder still holds (an incomplete character, say), so the text is
        exactly the tokenizer's decoding of the prompt's tail and the answer, minus the tail's own text."""
        if self.stopped or not self._ids:
            return
        whole, seed = self._decode(self._seed + self._ids), self._decode(self._seed)
        if whole.startswith(seed) and whole[len(seed) :].startswith(self._decoded):
            rest = whole[len(seed) + len(self._decoded) :]
            if rest:
                self._extend(rest)

    def _extend(self, piece: str) -> None:
        before = len(self.text)
        self._decoded += piece
        self.text += piece
        if self._stop:
            self._find_stop(max(0, before - self._hold))

    def _find_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def release(self, final: bool = False) -> str:
        """The text not handed out yet. Until `final`, the last few characters that could begin a stop
        string stay back."""
        end = len(self.text) if final or self.stopped else max(self._released, len(self.text) - self._hold)
        delta = self.text[self._released : end]
        self._released = end
        return delta
