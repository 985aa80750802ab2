"""Token ids in, text out, one token at a time: incremental detokenization and stop strings.

Decoding each token on its own breaks multi-byte characters and words that tokenizers merge, and decoding
the whole output at every step costs O(n^2). So only a short window of recent tokens is decoded, and text
is released once it stops changing. Text that could still become the start of a stop string is held back
until it cannot, so a stream never shows part of a stop string that is then cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class TextStream:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # decode window start: tokens before it are settled
        self._read = 0  # tokens up to here have been turned into text
        self.text = ""  # everything decoded so far, cut at a stop string once one is found
        self._released = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found; `text` ends before it

    def push(self, token_id: int) -> None:
        """Add one generated token; sets `stopped` when the text now contains a stop string."""
        self._ids.append(token_id)
        self._advance(last=False)

    def finish(self) -> None:
        """No more tokens: settle whatever the window still holds, even an incomplete character."""
        if not self.stopped:
            self._advance(last=True)

    def _advance(self, last: bool) -> None:
        settled = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        # A trailing U+FFFD means the window ends inside a multi-byte character: wait for the next token.
        if len(window) <= len(settled) or (window.endswith("\ufffd") and not last):
            return
        before = len(self.text)
        self.text += window[len(settled) :]
        self._prefix, self._read = self._read, len(self._ids)
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
