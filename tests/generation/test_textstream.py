"""Incremental detokenization: the text streamed is exactly the tokenizer's decoding, a character split across
tokens is released whole, and stop strings never show, even in part."""

import pytest
from tiny_tokenizers import byte_level_tokenizer, metaspace_tokenizer

from worker_transformers.generation.textstream import Detokenizer, TextStream

TOKENIZERS = {"byte-level": byte_level_tokenizer(), "metaspace": metaspace_tokenizer()}
ANSWER = " lived in 北海道 with a café 🎉, naïve; ok"


def stream(tokenizer, prompt: str, answer: str, stop=()) -> tuple[list[str], TextStream]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    stream = TextStream(Detokenizer(tokenizer), prompt_ids, stop)
    chunks = []
    for token in tokenizer(answer, add_special_tokens=False)["input_ids"]:
        stream.push(token)
        chunks.append(stream.release())
        if stream.stopped:  # as the engine does: no token after a stop string
            break
    stream.finish()
    chunks.append(stream.release(final=True))
    return [c for c in chunks if c], stream


@pytest.mark.parametrize("name", TOKENIZERS)
def test_prompt_and_streamed_text_are_the_decoding_of_all_ids(name):
    tokenizer = TOKENIZERS[name]
    prompt = "The capital of"
    chunks, _ = stream(tokenizer, prompt, ANSWER)
    ids = tokenizer(prompt)["input_ids"] + tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert prompt + "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_character_split_across_tokens_never_streams_as_a_replacement_character(name):
    tokenizer = TOKENIZERS[name]
    # 北海道 and 🎉 are not in the tiny vocabularies' corpus: each character takes several byte tokens.
    assert len(tokenizer("🎉", add_special_tokens=False)["input_ids"]) > 1
    chunks, _ = stream(tokenizer, "Hi", ANSWER)
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "北海道" in "".join(chunks) and "🎉" in "".join(chunks)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_stop_string_ends_the_text_and_no_part_of_it_is_streamed(name):
    chunks, text = stream(TOKENIZERS[name], "Hi", ANSWER, stop=["café"])
    assert "".join(chunks) == " lived in 北海道 with a "
    assert text.stopped and not any("caf" in chunk for chunk in chunks)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_bytes_that_are_no_character_do_not_hold_back_the_text_after_them(name):
    """A model can emit any bytes: a lone lead byte followed by words is U+FFFD and those words, streamed as they
    come, so a stop string after it is found mid-stream, not only at the end."""
    tokenizer = TOKENIZERS[name]
    lead_byte = "<0xE5>" if name == "metaspace" else "å"  # byte-level BPE writes the byte 0xE5 as this symbol
    broken = tokenizer.convert_tokens_to_ids(lead_byte)
    words = tokenizer(" then go on: one, two", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer("Hi")["input_ids"]
    text = TextStream(Detokenizer(tokenizer), prompt_ids, stop=["two"])
    released = []
    for token in [broken, *words]:
        text.push(token)
        released.append(text.release())
        if text.stopped:
            break
    assert text.stopped, "the stop string was not seen while streaming"
    whole = tokenizer.decode(prompt_ids + [broken, *words], skip_special_tokens=True)
    assert "".join(released) == whole[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :].split("two")[0]
    assert "\ufffd" in "".join(released)


def test_a_prompt_ending_in_a_byte_token_followed_by_bytes_that_are_no_character_loses_none_of_the_answer():
    """A chat prompt ends with "\n", a byte token in Llama 2-style vocabularies; a model's first tokens may be
    bytes that are no character. Decoded with the prompt, they would turn its "\n" to U+FFFD too."""
    tokenizer = TOKENIZERS["metaspace"]
    newline = tokenizer.convert_tokens_to_ids("<0x0A>")
    prompt_ids = tokenizer("Hi", add_special_tokens=False)["input_ids"] + [newline]
    broken = [tokenizer.convert_tokens_to_ids(b) for b in ("<0xE5>", "<0xFF>")]
    words = tokenizer(" then go on", add_special_tokens=False)["input_ids"]
    text = TextStream(Detokenizer(tokenizer), prompt_ids)
    released = []
    for token in [*broken, *words]:
        text.push(token)
        released.append(text.release())
    text.finish()
    released.append(text.release(final=True))
    answer = "".join(released)
    assert answer == tokenizer.decode([*broken, *words], skip_special_tokens=True)
    assert answer.endswith(" then go on") and answer.startswith("\ufffd")
    assert released[-1] != answer, "the words after the bytes were held back to the end"


@pytest.mark.parametrize("name", TOKENIZERS)
def test_special_tokens_show_only_in_a_stream_that_keeps_them(name):
    """A reader of a model's markup (tool calls, reasoning) needs its markers, and many are special tokens."""
    tokenizer = TOKENIZERS[name]
    prompt_ids = tokenizer("The capital of")["input_ids"]
    answer = tokenizer("<|im_start|> lived<|im_end|> in 北海道", add_special_tokens=False)["input_ids"]
    texts = {}
    for keep in (False, True):
        text = TextStream(Detokenizer(tokenizer), prompt_ids, keep_special_tokens=keep)
        for token in answer:
            text.push(token)
        text.finish()
        texts[keep] = text.release(final=True)
    assert "<|im_start|>" not in texts[False] and "北海道" in texts[False]
    assert texts[True].count("<|im_start|>") == texts[True].count("<|im_end|>") == 1 and "北海道" in texts[True]
