"""Shared fixtures: a real (tiny, random-weight) causal LM saved with save_pretrained, and the default model.

The tiny model is a Llama with a BPE tokenizer trained here on a few sentences and a ChatML chat template:
every file a Hub model has, a few hundred kB in all, made in about a second.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

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
    TOOL_ANSWER when a tool's result ends it.

    Its layers write nothing into the residual stream (their output projections are zero), so the logits are a
    function of the last token alone: a bigram table, set here through the embeddings and an untied lm_head.
    The call and the answer are single added tokens, so each step of the chain is one distinct token."""
    import json

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_tiny_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    call_text = json.dumps(TOOL_CALL)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", call_text, TOOL_ANSWER])
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.response_template = TOOL_RESPONSE_TEMPLATE
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    asked = [{"role": "user", "content": "Weather?"}]
    answered = [
        *asked,
        {"role": "assistant", "tool_calls": [{"type": "function", "function": TOOL_CALL}]},
        {"role": "tool", "content": "sunny"},
    ]

    def last_token(messages):
        text = tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"][-1]

    token = tokenizer.convert_tokens_to_ids
    chain = {
        last_token(asked): token("<tool_call>"),
        token("<tool_call>"): token(call_text),
        token(call_text): token("</tool_call>"),
        token("</tool_call>"): tokenizer.eos_token_id,
        last_token(answered): token(TOOL_ANSWER),
        token(TOOL_ANSWER): tokenizer.eos_token_id,
    }
    model = LlamaForCausalLM.from_pretrained(folder, tie_word_embeddings=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.config.hidden_size
        assert len(chain) <= hidden, "each token of the chain needs a direction of its own"
        for direction, (current, following) in enumerate(chain.items()):
            model.model.embed_tokens.weight[current] = torch.nn.functional.one_hot(torch.tensor(direction), hidden)
            model.lm_head.weight[following, direction] = 100.0
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
    import threading
    import time

    import uvicorn
    from api_server import free_port

    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.serving.openai.server import make_app

    handler = make_handler(tool_engine, Settings.from_env({"MODEL_NAME": str(tool_model_dir), "MAX_NEW_TOKENS": "32"}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(handler), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join()


@pytest.fixture(scope="session")
def tool_client(tool_url):
    import openai

    return openai.OpenAI(base_url=f"{tool_url}/openai/v1", api_key="unused", max_retries=0)
