"""JSON tool calls scanned as they are written: each call's name once it is whole, its arguments exactly as written,
however the text is cut into pieces."""

import json

from hypothesis import given
from hypothesis import strategies as st

from worker_transformers.serving.tools.arguments import CallScanner

# JSON values with the characters that could mislead a scanner: quotes, escapes, braces inside strings.
tricky_text = st.text(alphabet=st.sampled_from('ab{}[]",:\\ é🙂\n'), max_size=8)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=8,
)
arguments = st.dictionaries(tricky_text, values, max_size=4)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
separators = st.sampled_from([(", ", ": "), (",", ":"), (" ,  ", " :\n ")])


def scanned(text: str, cuts: list[int], name: str | None = None) -> CallScanner:
    scanner = CallScanner(name=name)
    edges = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for start, end in zip(edges, edges[1:]):
        scanner.feed(text[start:end])
    return scanner


@given(st.lists(st.tuples(names, arguments), min_size=1, max_size=3), separators, st.lists(st.integers(0, 10**6)))
def test_a_list_of_calls_gives_each_name_and_its_arguments_as_written(calls, separators, cuts):
    written = [json.dumps(args, separators=separators, ensure_ascii=False) for _, args in calls]
    text = "[" + ", ".join(f'{{"name": {json.dumps(n)}, "arguments": {w}}}' for (n, _), w in zip(calls, written)) + "]"
    scanner = scanned(text, cuts)
    assert [(c.name, scanner.arguments(c)) for c in scanner.calls] == [(n, w) for (n, _), w in zip(calls, written)]
    assert all(c.arguments_end is not None for c in scanner.calls)


@given(names, arguments, st.lists(st.integers(0, 10**6)))
def test_one_call_with_its_arguments_first_and_llamas_parameters_key(name, args, cuts):
    written = json.dumps(args)
    scanner = scanned(f'{{"parameters": {written}, "name": {json.dumps(name)}}}', cuts)
    [call] = scanner.calls
    assert (call.name, scanner.arguments(call)) == (name, written)


@given(arguments, st.lists(st.integers(0, 10**6)))
def test_arguments_alone_under_a_known_name_and_every_prefix_is_the_start_of_the_whole(args, cuts):
    written = json.dumps(args, ensure_ascii=False)
    scanner = CallScanner(name="f")
    seen = ""
    for start in range(len(written)):
        scanner.feed(written[start])
        now = scanner.arguments(scanner.calls[0])
        assert now.startswith(seen)
        seen = now
    assert seen == written and scanner.calls[0].arguments_end == len(written)


def test_arguments_written_as_a_string_are_not_streamed():
    scanner = scanned('{"name": "f", "arguments": "{\\"a\\": 1}"}', [5, 20])
    [call] = scanner.calls
    assert call.name == "f" and call.arguments_are_text and scanner.arguments(call) == ""
