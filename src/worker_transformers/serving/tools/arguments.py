"""Tool calls written as JSON, read as they are generated: each call's name as soon as it is known, then its
arguments' text as it grows, so that a stream can show a call before it has ended (as OpenAI streams them).

Two shapes are read: the arguments alone (`{"city": "Paris"}`, where the call's name came before them, in the
format's markup or in the request), and whole calls, one object or a list of them, with the name inside
(`{"name": "get_weather", "arguments": {...}}`; Llama 3 writes `parameters`). The arguments are passed on exactly
as written, from their opening brace to its matching closing one, so what streamed is the start of the whole.
Arguments written as a JSON string are not streamed: their text is known only once decoded, at the end.

This reads the structure only (strings, nesting, keys); whether the JSON is valid is for the parser that reads the
whole call when it ends (reader.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class ScannedCall:
    """What the text has shown of one call so far."""

    name: str | None = None
    arguments_start: int | None = None  # where its arguments' text begins in the scanned text
    arguments_end: int | None = None  # just past their end, once they are whole
    arguments_are_text: bool = False  # written as a JSON string (or a bare literal): not streamed


@dataclass
class _Container:
    kind: str  # "{" or "["
    key: str | None = None  # in an object: the key whose value comes (or is being read)
    expecting_key: bool = True


@dataclass
class CallScanner:
    """Scans JSON text for calls. `name` given: the text is that call's arguments; None: the text is a call object
    or a list of them."""

    name: str | None = None
    text: str = ""
    calls: list[ScannedCall] = field(default_factory=list)
    _stack: list[_Container] = field(default_factory=list)
    _pos: int = 0
    _in_string: bool = False
    _escaped: bool = False
    _string_start: int = 0

    def __post_init__(self) -> None:
        if self.name is not None:
            self.calls.append(ScannedCall(name=self.name))

    def feed(self, text: str) -> None:
        self.text += text
        for self._pos in range(self._pos, len(self.text)):
            self._step(self.text[self._pos])
        self._pos = len(self.text)

    def arguments(self, call: ScannedCall) -> str:
        """The call's arguments' text scanned so far (all of it once they are whole); empty until they begin or
        when they are a string."""
        if call.arguments_start is None or call.arguments_are_text:
            return ""
        end = call.arguments_end if call.arguments_end is not None else len(self.text)
        return self.text[call.arguments_start : end]

    # The call objects sit at depth 1 (one call) or 2 (a list of calls); their arguments one deeper.
    def _call_depth(self) -> int:
        return 2 if self._stack and self._stack[0].kind == "[" else 1

    def _step(self, char: str) -> None:
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                self._string_ended(self.text[self._string_start : self._pos])
            return
        if char == '"':
            self._value_starts(char)
            self._in_string, self._string_start = True, self._pos + 1
        elif char in "{[":
            self._value_starts(char)
            self._stack.append(_Container(char))
        elif char in "}]":
            if self._stack:
                self._stack.pop()
                self._value_ended()
        elif char == ":" and self._stack and self._stack[-1].kind == "{":
            self._stack[-1].expecting_key = False
        elif char == "," and self._stack:
            top = self._stack[-1]
            top.key, top.expecting_key = None, top.kind == "{"
        elif not char.isspace():
            self._value_starts(char)  # a character of a number, true, false or null

    def _value_starts(self, char: str) -> None:
        """A value (not a key) may begin at the current position, with `char`: maybe a call's arguments, or a new
        call. Only an object or an array is arguments to stream; anything else is read at the end."""
        text = char not in "{["
        depth = len(self._stack)
        if self.name is not None:
            if depth == 0 and self.calls[0].arguments_start is None:
                self.calls[0].arguments_start, self.calls[0].arguments_are_text = self._pos, text
            return
        top = self._stack[-1] if self._stack else None
        if top is not None and top.kind == "{" and top.expecting_key:
            return  # a key, not a value
        if depth == self._call_depth() - 1 and char == "{":  # a call object opens
            self.calls.append(ScannedCall())
        elif depth == self._call_depth() and top.key in ARGUMENT_KEYS and self.calls:
            call = self.calls[-1]
            if call.arguments_start is None:
                call.arguments_start, call.arguments_are_text = self._pos, text

    def _string_ended(self, raw: str) -> None:
        top = self._stack[-1] if self._stack else None
        if top is not None and top.kind == "{" and top.expecting_key:
            top.key = _decoded(raw)
            return
        if self.name is None and len(self._stack) == self._call_depth() and top.key == "name" and self.calls:
            self.calls[-1].name = _decoded(raw)
        self._value_ended()

    def _value_ended(self) -> None:
        """A value has just ended (its last character is at the current position)."""
        depth = len(self._stack)
        arguments_depth = 0 if self.name is not None else self._call_depth()
        if depth != arguments_depth or not self.calls:
            return
        call = self.calls[-1]
        top = self._stack[-1] if self._stack else None
        in_arguments = self.name is not None or (top is not None and top.key in ARGUMENT_KEYS)
        if in_arguments and call.arguments_start is not None and call.arguments_end is None:
            call.arguments_end = self._pos + 1


def _decoded(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return raw
