"""The engine on a tiny random Llama: lengths, finish reasons, stop strings, seeds, the input cap."""

import pytest

from worker_transformers.serving.schema import RequestError, parse_request


def run(engine, **job):
    return engine.generate(parse_request(job, 64))


def test_output_has_text_finish_reason_usage_and_model(tiny_engine, tiny_settings):
    out = run(tiny_engine, prompt="The capital of France", max_new_tokens=5, temperature=0)
    assert set(out) == {"text", "finish_reason", "usage", "model"}
    assert isinstance(out["text"], str)
    assert out["model"] == tiny_settings.model_name
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(tiny_engine.tokenizer("The capital of France")["input_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_new_tokens_ends_with_length(tiny_engine):
    # The tiny model, greedy, repeats " three" and never reaches its end-of-turn token.
    out = run(tiny_engine, prompt="one, two, three", max_new_tokens=7, temperature=0)
    assert (out["finish_reason"], out["usage"]["completion_tokens"]) == ("length", 7)
    assert out["text"] == " three" * 7


def test_an_end_of_turn_token_ends_with_stop_and_is_not_text(tiny_settings):
    from worker_transformers.worker import setup

    engine = setup(tiny_settings)
    try:
        # The tiny model, greedy, repeats " three" after this prompt: make that its end-of-turn token.
        three = engine.tokenizer(" three", add_special_tokens=False)["input_ids"]
        assert len(three) == 1
        engine.generation.engine.eos_ids = {three[0]}
        out = run(engine, prompt="one, two, three", max_new_tokens=7, temperature=0)
        assert (out["text"], out["finish_reason"], out["usage"]["completion_tokens"]) == ("", "stop", 1)
    finally:
        engine.close()


def test_greedy_is_deterministic(tiny_engine):
    first = run(tiny_engine, prompt="Hello world", max_new_tokens=12, temperature=0)
    second = run(tiny_engine, prompt="Hello world", max_new_tokens=12, temperature=0)
    assert first == second


def test_a_seed_makes_sampling_reproducible(tiny_engine):
    job = dict(prompt="Hello world", max_new_tokens=16, temperature=1.5, seed=1234)
    texts = {run(tiny_engine, **job)["text"] for _ in range(3)}
    assert len(texts) == 1
    others = {run(tiny_engine, **{**job, "seed": seed})["text"] for seed in range(8)}
    assert len(others) > 1, "different seeds should not all give the same sample"


def test_chat_messages_go_through_the_chat_template(tiny_engine):
    messages = [{"role": "user", "content": "hi"}]
    out = run(tiny_engine, messages=messages, max_new_tokens=3, temperature=0)
    rendered = tiny_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out["usage"]["prompt_tokens"] == len(tiny_engine.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_a_stop_string_ends_the_text_before_it(tiny_engine):
    free = run(tiny_engine, prompt="Hello world", max_new_tokens=24, temperature=0)
    text = free["text"]
    assert len(text) > 4, "the tiny model should produce some text"
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = run(tiny_engine, prompt="Hello world", max_new_tokens=24, temperature=0, stop=[stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]
    assert stop not in cut["text"]
    assert cut["usage"]["completion_tokens"] <= free["usage"]["completion_tokens"]


def test_a_prompt_over_max_input_tokens_is_refused_with_its_size(tiny_engine):
    long_prompt = "one two three " * 2000
    with pytest.raises(RequestError) as caught:
        run(tiny_engine, prompt=long_prompt, max_new_tokens=1)
    message = str(caught.value)
    tokens = len(tiny_engine.tokenizer(long_prompt)["input_ids"])
    assert (
        message
        == f"prompt: {tokens} tokens is more than MAX_INPUT_TOKENS={tiny_engine.prompts.max_input_tokens}; send less"
    )


def test_messages_to_a_model_without_chat_template_are_refused(tmp_path):
    from conftest import make_tiny_model

    from worker_transformers.config import Settings
    from worker_transformers.worker import setup

    folder = make_tiny_model(tmp_path / "plain", chat_template=False)
    engine = setup(Settings.from_env({"MODEL_NAME": str(folder)}))
    try:
        with pytest.raises(RequestError, match="messages: this model has no chat template; send prompt instead"):
            run(engine, messages=[{"role": "user", "content": "hi"}])
        never_ends = {str(engine.tokenizer.eos_token_id): -100}  # a random model may draw its end at once
        assert run(engine, prompt="hi", max_new_tokens=2, logit_bias=never_ends)["usage"]["completion_tokens"] == 2
    finally:
        engine.close()


def test_megabytes_of_text_are_refused_before_tokenizing_with_the_size_and_the_limit(tiny_engine):
    huge = "word " * 2_000_000  # 10 MB
    with pytest.raises(RequestError) as caught:
        run(tiny_engine, prompt=huge, max_new_tokens=1)
    limit = 16 * tiny_engine.prompts.max_input_tokens
    assert str(caught.value) == (
        f"prompt: {len(huge)} characters is more than {limit} (16 per token of "
        f"MAX_INPUT_TOKENS={tiny_engine.prompts.max_input_tokens}); send less"
    )


def test_a_request_that_could_never_fit_the_kv_budget_is_refused_with_its_size_and_the_others_are_admitted_in_turn(
    tiny_settings,
):
    from worker_transformers.worker import setup

    engine = setup(tiny_settings)
    try:
        prompt_tokens = len(engine.tokenizer("one, two, three")["input_ids"])
        # Room for one request of the prompt and 20 new tokens, the layout's slack counted.
        batcher = engine.generation.engine
        batcher.memory_budget = 2 * (prompt_tokens + 20) * batcher.layout.kv_bytes_per_token
        with pytest.raises(RequestError, match=rf"^max_new_tokens: {prompt_tokens} prompt tokens and up to 21 new"):
            run(engine, prompt="one, two, three", max_new_tokens=21, temperature=0)
        engine.generation.engine.peak_batch = 0
        out = run(engine, prompt="one, two, three", max_new_tokens=20, temperature=0)
        assert out["usage"]["completion_tokens"] == 20

        import asyncio

        async def three_at_once():
            async def one():
                request = parse_request({"prompt": "one, two, three", "max_new_tokens": 20, "temperature": 0}, 64)
                return [event async for event in engine.stream(request, engine.prepare(request))]

            return await asyncio.gather(one(), one(), one())

        assert all(events[-1].completion_tokens == 20 for events in asyncio.run(three_at_once()))
        assert engine.generation.engine.peak_batch == 1  # each waited for the one before it to leave room
    finally:
        engine.close()
