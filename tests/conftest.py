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
