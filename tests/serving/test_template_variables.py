"""A request's variables for the chat template (`chat_template_kwargs`, `reasoning_effort`) reach it, through the
real renderer child, and one the template does not read is refused by name instead of changing nothing."""

import pytest
from conftest import CHATML
from transformers import AutoTokenizer

from worker_transformers.serving.openai.bodies import ChatCompletionBody
from worker_transformers.serving.prompt import Prompts
from worker_transformers.serving.schema import GenerationRequest, RequestError, parse_request

# Qwen 3's switch and gpt-oss's effort, as those templates read them, in front of ChatML.
THINKING = (
    "{% if reasoning_effort is defined %}Reasoning: {{ reasoning_effort }}\n{% endif %}"
    + CHATML
    + "{% if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = THINKING
    prompts = Prompts(tokenizer, "tiny", max_input_tokens=512)
    yield prompts
    prompts.close()


def rendered(prompts, **fields) -> list[int]:
    request = parse_request({"messages": [{"role": "user", "content": "Hi"}], **fields}, 64)
    ids, _, _ = prompts.inputs(request)
    return ids


def expected(prompts, **variables) -> list[int]:
    """The ids of what the template renders with these variables, rendered here in-process."""
    tokenizer = prompts.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False, **variables
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_template_reads_the_requests_variables(prompts):
    plain = rendered(prompts)
    assert plain == expected(prompts)
    no_thinking = rendered(prompts, chat_template_kwargs={"enable_thinking": False})
    assert no_thinking == expected(prompts, enable_thinking=False) != plain
    assert rendered(prompts, chat_template_kwargs={"enable_thinking": True}) == plain
    effort = rendered(prompts, reasoning_effort="high")
    assert effort == expected(prompts, reasoning_effort="high") != plain


def test_a_variable_the_template_does_not_read_is_refused_by_name(prompts):
    with pytest.raises(RequestError) as caught:
        rendered(prompts, chat_template_kwargs={"thinking": True})
    message = str(caught.value)
    assert message.startswith("chat_template_kwargs.thinking: the chat template of tiny does not read 'thinking'")
    assert "enable_thinking" in message and "reasoning_effort" in message, "the variables it does read"
    with pytest.raises(RequestError, match="^chat_template_kwargs.messages: the worker sets 'messages' itself"):
        rendered(prompts, chat_template_kwargs={"messages": []})


def test_reasoning_effort_for_a_template_without_it_is_refused_by_name(tiny_model_dir):
    prompts = Prompts(AutoTokenizer.from_pretrained(tiny_model_dir), "tiny", max_input_tokens=512)
    try:
        with pytest.raises(RequestError, match="^reasoning_effort: the chat template of tiny does not read"):
            rendered(prompts, reasoning_effort="low")
    finally:
        prompts.close()


def test_the_fields_are_checked_and_taken_by_the_openai_body():
    with pytest.raises(RequestError, match="reasoning_effort"):
        parse_request({"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "extreme"}, 64)
    with pytest.raises(RequestError, match="^chat_template_kwargs: only a chat"):
        parse_request({"prompt": "Hi", "chat_template_kwargs": {"enable_thinking": False}}, 64)
    body = ChatCompletionBody.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "reasoning_content": "They greet."},
                {"role": "user", "content": "Bye"},
            ],
            "reasoning_effort": "low",
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    request = body.to_request(64, {})
    assert isinstance(request, GenerationRequest)
    assert request.template_variables() == {"enable_thinking": False, "reasoning_effort": "low"}
    assert request.template_messages()[1]["reasoning_content"] == "They greet."
