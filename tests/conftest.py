"""Shared fixtures: a real (tiny, random-weight) causal LM saved with save_pretrained, and the default model.

The tiny model is a Llama with a BPE tokenizer trained here on a few sentences and a ChatML chat template:
every file a Hub model has, a few hundred kB in all, made in about a second.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
# Workers the tests start, in this process or in others, serve on the eager decode step: compiling it costs tens
# of seconds a worker. The tests of the compiled step (generation/test_compiled.py) ask for it by name.
os.environ.setdefault("COMPILE", "off")

from worker_transformers.config import DEFAULT_MODEL, Settings, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "A small model says hello to the world, and the world answers back.",
    "Stop here, then go on: one, two, three, four, five, six, seven, eight.",
] * 20


def make_tiny_model(folder: Path, *, chat_template: bool = True) -> Path:
    """Write a tiny random Llama with a trained BPE tokenizer to `folder` (safetensors weights)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    if chat_template:
        tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir) -> Settings:
    return Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "MAX_NEW_TOKENS": "64"})


@pytest.fixture(scope="session")
def tiny_model_name(tiny_model_dir) -> str:
    """The name the tiny model is served under: MODEL_NAME is its folder."""
    return str(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings):
    from worker_transformers.worker import setup

    engine = setup(tiny_settings)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, in the Hugging Face cache that `make model` (builder/default_model.py) fills."""
    snapshot = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if snapshot is None:
        pytest.fail(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    return snapshot


# A chat template that shows tools (a tools section in the system turn) and renders tool calls and their results.
# After a tool's result the assistant answers straight after `</tool_response>`, without a new turn marker, so
# the last prompt token says which kind of answer comes next (see make_tool_model).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}{{ tool.function | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<tool_response>{{ message.content }}</tool_response>"
    "{% elif message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1].role != 'tool' %}<|im_start|>assistant\n{% endif %}"
)
# How the answers of that template's model are read back (transformers' response parsing).
TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": r"<\|im_start\|>assistant\n|</tool_response>",
    "fields": {
        "tool_calls": {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "repeats": True,
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        },
        "content": {"close_pattern": r"\s*<\|im_end\|>", "content": "text"},
    },
}
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_ANSWER = "It is sunny in Paris."


def make_tool_model(folder: Path) -> Path:
    """A tiny model that, greedily, calls get_weather(city="Paris") when a user turn ends its prompt and answers
    TOOL_ANSWER when a tool's result ends it (scripted_models: the call and the answer are single added tokens)."""
    import json

    from scripted_models import Script, make_scripted_model

    base = make_tiny_model(folder.parent / f"{folder.name}-base")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    asked = [{"role": "user", "content": "Weather?"}]
    answered = [
        *asked,
        {"role": "assistant", "tool_calls": [{"type": "function", "function": TOOL_CALL}]},
        {"role": "tool", "content": "sunny"},
    ]
    scripts = [
        Script(asked, ["<tool_call>", json.dumps(TOOL_CALL), "</tool_call>"], [tool]),
        Script(answered, [TOOL_ANSWER], [tool]),
    ]
    markup = ("<tool_response>", "</tool_response>")
    return make_scripted_model(
        folder, base, TOOL_TEMPLATE, scripts, markup=markup, response_template=TOOL_RESPONSE_TEMPLATE
    )


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory) -> Path:
    return make_tool_model(tmp_path_factory.mktemp("tool-model"))


# The local OpenAI server (serving/openai/server.py) over real HTTP, in front of the worker's real handler and the
# tiny tool-calling model above, started once a session, and the real `openai` client pointed at it.
@pytest.fixture(scope="session")
def tool_engine(tool_model_dir):
    from worker_transformers.worker import setup

    engine = setup(Settings.from_env({"MODEL_NAME": str(tool_model_dir), "MAX_NEW_TOKENS": "32"}))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tool_url(tool_engine, tool_model_dir):
    from api_server import openai_server

    from worker_transformers.serving.handlers import make_handler

    handler = make_handler(tool_engine, Settings.from_env({"MODEL_NAME": str(tool_model_dir), "MAX_NEW_TOKENS": "32"}))
    with openai_server(handler) as url:
        yield url


@pytest.fixture(scope="session")
def tool_client(tool_url):
    import openai

    return openai.OpenAI(base_url=f"{tool_url}/openai/v1", api_key="unused", max_retries=0)


@contextmanager
def out_of_memory_after_first_step(engine) -> Iterator[None]:
    """The device runs out of memory at every forward after the first (injected: this machine has no GPU to
    exhaust), until the block ends."""
    import torch

    model = engine.generation.engine.model
    real_forward, steps = model.forward, {"n": 0}

    def forward(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        model.forward = real_forward
