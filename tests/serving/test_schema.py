import pytest
from pydantic import ValidationError

from worker_transformers.serving.openai.bodies import ChatCompletionBody
from worker_transformers.serving.schema import DEFAULT_MAX_NEW_TOKENS, RequestError, describe, parse_request

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


# --- content parts (images for vision-language models)

IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png?token=secret", "detail": "low"}}


def test_content_parts_keep_their_images_in_order():
    content = [{"type": "text", "text": "Compare "}, IMAGE, {"type": "text", "text": "and"}, IMAGE]
    request = parse_request(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]}, 64
    )
    assert request.image_urls() == [
        ("https://example.com/cat.png?token=secret", "messages.1.content.1"),
        ("https://example.com/cat.png?token=secret", "messages.1.content.3"),
    ]
    assert request.template_messages()[1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Compare "},
            {"type": "image"},
            {"type": "text", "text": "and"},
            {"type": "image"},
        ],
    }
    assert request.text_size() == len("Be brief.") + len("Compare and")


def test_text_parts_alone_are_one_string():
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    request = parse_request({"messages": [{"role": "user", "content": content}]}, 64)
    assert request.template_messages() == [{"role": "user", "content": "Hello, world"}]
    assert (request.image_urls(), request.text_size()) == ([], 12)
    assert parse_request({"prompt": "four"}, 64).text_size() == 4


def test_a_required_call_is_added_to_a_system_message_of_parts():
    tool = {"type": "function", "function": {"name": "f"}}
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    request = parse_request({"messages": [system, *CHAT], "tools": [tool], "tool_choice": "required"}, 64)
    assert request.template_messages()[0] == {
        "role": "system",
        "content": "Be brief.\n\nAnswer only with a call of one of the tools.",
    }


@pytest.mark.parametrize(
    ("content", "role", "says"),
    [
        (
            [{"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}],
            "user",
            "messages.0.content.1.type: 'input_audio' parts are not taken; send text and image_url parts",
        ),
        (
            [{"type": "video_url", "video_url": {"url": "https://x/v.mp4"}}],
            "user",
            "messages.0.content.0.type: 'video_url' parts are not taken; send text and image_url parts",
        ),
        ([{"text": "x"}], "user", "messages.0.content.0.type: Field required; send text and image_url parts"),
        (
            [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
            "user",
            "messages.0.content.0.image_url.url: send an http(s) URL or a data URL (data:image/png;base64,...)",
        ),
        ([{"type": "image_url", "image_url": {}}], "user", "messages.0.content.0.image_url.url: Field required"),
        (
            [{"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "max"}}],
            "user",
            "messages.0.content.0.image_url.detail: Input should be 'auto', 'low' or 'high'",
        ),
        (
            [{"type": "text", "text": "x", "extra": 1}],
            "user",
            "messages.0.content.0.extra: Extra inputs are not permitted",
        ),
        (
            [IMAGE],
            "system",
            "messages.0.content.0.type: image_url parts are taken only in user messages; move the image there",
        ),
        (5, "user", "messages.0.content: send a string or a list of text and image_url parts"),
        (
            ["x"],
            "user",
            'messages.0.content.0: send a part as an object such as {"type": "text", "text": "..."}',
        ),
    ],
)
def test_a_bad_content_part_is_named_by_its_place(content, role, says):
    assert refused({"messages": [{"role": role, "content": content}]}) == says


def test_every_bad_part_is_named_along_with_other_fields():
    content = [{"type": "file"}, {"type": "text", "text": 1}]
    assert refused({"messages": [{"role": "user", "content": content}], "temperature": 5}) == (
        "messages.0.content.0.type: 'file' parts are not taken; send text and image_url parts; "
        "messages.0.content.1.text: Input should be a valid string; "
        "temperature: Input should be less than or equal to 2"
    )


def test_an_openai_body_passes_images_through_and_joins_text():
    text = {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    user = {"role": "user", "content": [IMAGE, {"type": "text", "text": "What is it?"}]}
    request = ChatCompletionBody.model_validate({"model": "m", "messages": [text, user]}).to_request(64, {})
    assert request.template_messages() == [
        {"role": "system", "content": "ab"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]
    assert request.image_urls() == [(IMAGE["image_url"]["url"], "messages.1.content.0")]


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (
            {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "input_audio", "input_audio": {}}]},
            "messages.0.content.1.type: 'input_audio' parts are not taken; send text and image_url parts",
        ),
        (
            {"role": "developer", "content": [IMAGE]},
            "messages.0.content.0.type: image_url parts are taken only in user messages; move the image there",
        ),
    ],
)
def test_an_openai_body_names_a_bad_part_by_its_place(message, says):
    with pytest.raises(ValidationError) as caught:
        ChatCompletionBody.model_validate({"model": "m", "messages": [message]})
    assert describe(caught.value) == says
    assert caught.value.errors()[0]["loc"] == ("messages",)  # the OpenAI error's `param`
