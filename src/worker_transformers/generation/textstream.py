"""Token ids in, text out, one token at a time: incremental detokenization and stop strings.

The text must be exactly what the tokenizer makes of the whole sequence. Decoding the generated tokens on their
own is not that: a SentencePiece-style tokenizer (Metaspace: Llama 2, Mistral, Gemma) drops the leading space of
the first word it decodes, so "The capital of" + "lived" would come out where `decode(prompt + answer)` gives
"The capital of lived". So the decoder is seeded with the prompt's last tokens, and only what those tokens and
the new ones decode to beyond the seed is released. `tokenizers`' DecodeStream does exactly this without
re-decoding the answer each step.

Tokenizers with byte fallback (<0xE5>-style tokens for characters outside the vocabulary) decode a run of byte
tokens as one group, so a byte token's text is known only once its run ends; and a model can emit any bytes,
valid UTF-8 or not. For those, a window decoder releases text only at clean boundaries: after a token that is
not a byte token, and not ending in U+FFFD (a character that later bytes may complete). A character split across
tokens is never released as U+FFFD mid-stream; bytes that can never be one (followed by a character of their own)
come out as the tokenizer decodes them, U+FFFD, as soon as that is settled; at the end whatever is held is settled
against the whole decoding.

Text that could still become the start of a stop string is held back until it cannot, so a stream never shows
part of a stop string that is then cut.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

# Prompt tokens the decoder is seeded with: enough for any decoder's context (a word's leading space, a
# multi-byte character split across tokens), few enough to cost nothing.
SEED_TOKENS = 8
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

Decode = Callable[[Sequence[int]], str]


class Detokenizer:
    """How one tokenizer's ids become text, worked out once (the engine keeps one for its tokenizer). Special tokens
    are left out of the text, unless a stream keeps them (`TextStream(keep_special_tokens=True)`): the markers of
    many models' tool calls and reasoning are special tokens, and whoever reads that markup needs them."""

    def __init__(self, tokenizer) -> None:
        self.decode: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.decode_special: Decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend if isinstance(backend, Tokenizer) else None
        decoder = self.backend.decoder if self.backend is not None else None
        byte_fallback = decoder is None or b'"ByteFallback"' in decoder.__getstate__()
        self.byte_tokens = (
            frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.match(token))
            if byte_fallback
            else frozenset()
        )
        # DecodeStream releases a byte token's text before its run ends; the window decoder waits.
        self.use_decode_stream = self.backend is not None and not byte_fallback


class _WindowDecoder:
    """Decode a short window of recent tokens and release what it adds to the settled part, at clean boundaries."""

    def __init__(self, detokenizer: Detokenizer, seed: Sequence[int], decode: Decode) -> None:
        self._decode = decode
        self._byte_tokens = detokenizer.byte_tokens
        self._ids = list(seed)
        self._prefix = 0  # window start: tokens before it are settled
        self._read = len(self._ids)  # tokens up to here have been turned into text

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        if token_id in self._byte_tokens:  # a run of byte tokens decodes as one: wait for its end
            return None
        settled = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        new = window[len(settled) :]
        # Only the end of a decoding can still change: bytes already followed by a character of their own are
        # settled, even when they are no character (U+FFFD), while a character cut short at the end may be
        # completed by the next tokens (or settled by the end).
        if not new or not window.startswith(settled) or new.endswith("\ufffd"):
            return None
        self._prefix, self._read = self._read, len(self._ids)
        return new


class TextStream:
    def __init__(
        self,
        detokenizer: Detokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        keep_special_tokens: bool = False,
    ) -> None:
        """`prompt_ids` are the ids the generated ones follow."""
        self._detokenizer = detokenizer
        self._decode = detokenizer.decode_special if keep_special_tokens else detokenizer.decode
        self._seed = list(prompt_ids[-SEED_TOKENS:])
        # A run of byte tokens decodes as one group, so the prompt's trailing byte tokens (Llama 2's and Gemma's
        # "\n" is <0x0A>, which ends most chat prompts) would run on into the answer's first ones: followed by
        # bytes that are no character, the prompt's own text would change ("\n" turns to U+FFFD), and nothing
        # of the answer would line up with it. The seed stops at the prompt's last other token.
        while self._seed and self._seed[-1] in detokenizer.byte_tokens:
            self._seed.pop()
        if detokenizer.use_decode_stream:
            stream = DecodeStream(ids=self._seed, skip_special_tokens=not keep_special_tokens)
            backend = detokenizer.backend
            self._step = lambda token_id: stream.step(backend, token_id)
        else:
            self._step = self._window_step
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._accounted = 0  # tokens whose text the decoder has released
        self._window: _WindowDecoder | None = None
        self._decoded = ""  # everything the decoder released, before any stop string is cut
        self.text = ""  # the answer so far, cut at a stop string once one is found
        self._released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; `text` ends before it

    def push(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        try:
            piece = self._step(token_id)
        except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception for bytes that are not UTF-8
            # DecodeStream gives up on bytes that are not UTF-8 (a model can emit any byte tokens): the window
            # decoder takes over from the last token whose text was released.
            self._step = self._window_step
            pieces = [self._step(t) for t in self._ids[self._accounted :]]
            piece = None if pieces[-1] is None else "".join(p or "" for p in pieces)
        if piece is not None:
            self._accounted = len(self._ids)
            if piece:
                self._extend(piece)

    def _window_step(self, token_id: int) -> str | None:
        if self._window is None:
            seed = (self._seed + self._ids[: self._accounted])[-SEED_TOKENS:]
            self._window = _WindowDecoder(self._detokenizer, seed, self._decode)
        return self._window.step(token_id)

    def finish(self) -> None:
        """No more tokens: settle whatever the decoder still holds, so the text is exactly the tokenizer's
        decoding of the prompt's tail and the answer, less the tail's own text."""
        if self.stopped or not self._ids:
            return
        decode = self._decode
        whole, seed = decode(self._seed + self._ids), decode(self._seed)
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
