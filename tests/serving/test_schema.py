import pytest

from worker_transformers.serving.schema import DEFAULT_MAX_NEW_TOKENS, RequestError, parse_request

CHAT = [{"role": "user", "content": "hi"}]


def refused(job_input, cap=1024) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request(job_input, cap)
    return str(caught.value)


def test_a_prompt_alone_gets_every_default():
    request = parse_request({"prompt": "Hello"}, 1024)
    assert request.prompt == "Hello" and request.messages is None
    assert request.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert (request.temperature, request.top_p, request.top_k, request.repetition_penalty) == (0.7, 1.0, 0, 1.0)
    assert (request.stop, request.seed, request.stream) == ([], None, False)


def test_the_default_length_never_exceeds_the_cap():
    assert parse_request({"prompt": "Hello"}, 10).max_new_tokens == 10


def test_messages_are_typed():
    request = parse_request({"messages": [{"role": "system", "content": "Be brief."}, *CHAT]}, 1024)
    assert [m.role for m in request.messages] == ["system", "user"]


@pytest.mark.parametrize(
    ("job_input", "expected"),
    [
        ({}, "input: send exactly one of prompt or messages"),
        ({"prompt": "a", "messages": CHAT}, "input: send exactly one of prompt or messages"),
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"prompt": 5}, "prompt: Input should be a valid string"),
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be 'system'"),
        ({"messages": [{"role": "user"}]}, "messages.0.content: Field required"),
        ({"messages": [{"role": "user", "content": "x", "nickname": "bob"}]}, "messages.0.nickname: Extra inputs"),
        ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
        ({"prompt": "a", "max_new_tokens": 2000}, "max_new_tokens: 2000 is more than MAX_NEW_TOKENS=1024"),
        ({"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens: Input should be a valid integer"),
        ({"prompt": "a", "temperature": 2.5}, "temperature: Input should be less than or equal to 2"),
        ({"prompt": "a", "temperature": -0.1}, "temperature: Input should be greater than or equal to 0"),
        ({"prompt": "a", "temperature": True}, "temperature: Input should be a valid number"),
        ({"prompt": "a", "top_p": 0}, "top_p: Input should be greater than 0"),
        ({"prompt": "a", "top_p": 1.5}, "top_p: Input should be less than or equal to 1"),
        ({"prompt": "a", "top_k": -1}, "top_k: Input should be greater than or equal to 0"),
        ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty: Input should be greater than 0"),
        ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
        ({"prompt": "a", "stop": "END"}, "stop: Input should be a valid list"),
        ({"prompt": "a", "stop": [""]}, "stop: stop strings must not be empty"),
        ({"prompt": "a", "seed": 1.5}, "seed: Input should be a valid integer"),
        ({"prompt": "a", "seed": 2**64}, "seed: Input should be less than or equal to 18446744073709551615"),
        ({"prompt": "a", "repetition_penalty": float("inf")}, "repetition_penalty: Input should be a finite number"),
        ({"prompt": "a", "temperature": float("nan")}, "temperature: Input should be a finite number"),
        ({"": 1, "prompt": "a"}, "'': Extra inputs are not permitted"),
        ({"a key with spaces": 1, "prompt": "a"}, "'a key with spaces': Extra inputs are not permitted"),
        ({"prompt": "a", "stream": "yes"}, "stream: Input should be a valid boolean"),
        ({"prompt": "a", "max_tokens": 5}, "max_tokens: Extra inputs are not permitted"),
    ],
)
def test_a_bad_field_is_named_with_its_reason(job_input, expected):
    assert refused(job_input).startswith(expected)


@pytest.mark.parametrize("job_input", [None, "a prompt", ["prompt"], 3])
def test_input_that_is_not_an_object_is_refused(job_input):
    assert refused(job_input).startswith("input: expected a JSON object")


def test_every_problem_is_reported_at_once_without_echoing_the_input():
    message = refused({"prompt": "secret text", "top_p": 0, "top_k": -1})
    assert "top_p:" in message and "top_k:" in message
    assert "secret text" not in message


def test_integer_values_are_accepted_for_float_fields():
    request = parse_request({"prompt": "a", "temperature": 0, "top_p": 1, "repetition_penalty": 2}, 1024)
    assert request.greedy and request.repetition_penalty == 2.0
