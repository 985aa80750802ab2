"""The engine choice: the batcher's startup check crosses the model's windows and chunks, costs a few forwards,
and any model whose code does not take the batcher's inputs, or answers otherwise with them, is served serially
with the reason, never failing startup; the cache budget counts each row's recurrent states."""

import logging

import pytest
import torch
import transformers
from tiny_tokenizers import byte_level_tokenizer
from transformers import AutoModelForCausalLM

from worker_transformers.config import ConfigError
from worker_transformers.generation import choice
from worker_transformers.generation.batch.batcher import LAYOUT_SLACK, Batcher
from worker_transformers.generation.batch.layout import probe
from worker_transformers.generation.batch.masks import Reach
from worker_transformers.generation.batch.slot_cache import SlotCache
from worker_transformers.generation.events import Sequence
from worker_transformers.generation.sampling import GREEDY
from worker_transformers.generation.textstream import Detokenizer, TextStream

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def detokenizer():
    return Detokenizer(byte_level_tokenizer())


def tiny(config_class, **arguments):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_class(vocab_size=300, **arguments)).eval()


def batched_forwards(model, monkeypatch) -> list[tuple[int, int]]:
    """The shapes of the model's forwards over the batcher's cache, recorded from now on."""
    shapes = []
    forward = model.forward

    def recording(*args, **kwargs):
        if isinstance(kwargs.get("past_key_values", kwargs.get("cache_params")), SlotCache):
            shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    return shapes


def test_the_check_pads_crosses_the_smallest_window_in_two_chunks_and_costs_six_batched_forwards(detokenizer, monkeypatch):
    model = tiny(transformers.MistralConfig, **SMALL, sliding_window=12)
    shapes = batched_forwards(model, monkeypatch)
    engine, layout, _ = choice.choose(model, detokenizer, "auto")
    assert engine == "batch" and layout.kinds == {"attention": Reach(window=12)}
    # two prompts (3 and 5 tokens) left-padded together and their step, the long one's two chunks (14 tokens: past
    # the window) with a step between, then all three
    assert shapes == [(2, 5), (2, 1), (1, 7), (2, 1), (1, 7), (3, 1)]


def test_a_model_whose_code_fails_on_the_batchers_inputs_is_served_serially_with_the_reason(
    detokenizer, monkeypatch, caplog
):
    model = tiny(transformers.LlamaConfig, **SMALL)
    forward = model.forward

    def failing(*args, **kwargs):
        if isinstance(kwargs.get("past_key_values"), SlotCache):
            raise ValueError("too many values to unpack (expected 2)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with caplog.at_level(logging.WARNING):
        engine, _, why = choice.choose(model, detokenizer, "auto")
    assert engine == "serial"
    assert why == "the batched forward failed (ValueError: too many values to unpack (expected 2))"
    assert why in caplog.text
    with pytest.raises(ConfigError, match=r"^ENGINE=batch, but the batched forward failed \(ValueError"):
        choice.choose(model, detokenizer, "batch")


def test_a_model_that_answers_otherwise_over_the_batchers_cache_is_served_serially(detokenizer, monkeypatch):
    model = tiny(transformers.LlamaConfig, **SMALL)
    forward = model.forward

    def drifting(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(kwargs.get("past_key_values"), SlotCache) and kwargs["input_ids"].shape[0] == 3:
            out.logits = out.logits + 1.0  # only once three rows decode together
        return out

    monkeypatch.setattr(model, "forward", drifting)
    engine, _, why = choice.choose(model, detokenizer, "auto")
    assert (engine, why) == ("serial", "the batched logits differ from the model's own at all three decoding")


def test_a_hybrid_is_batched_with_its_layer_kinds_named_and_refused_by_transformers_continuous_batching(detokenizer):
    config = dict(
        SMALL,
        head_dim=16,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_conv_kernel_dim=4,
    )
    model = tiny(transformers.Qwen3_5TextConfig, **config)
    engine, layout, why = choice.choose(model, detokenizer, "auto")
    assert engine == "batch" and layout.recurrent and layout.state_bytes_per_row > 0
    assert why == "its cache batches: 1 recurrent layers, 1 attention layers"
    assert layout.kinds == {"linear_attention": None, "full_attention": Reach()}
    with pytest.raises(ConfigError, match=r"^ENGINE=continuous, but transformers' continuous batching takes attention"):
        choice.choose(model, detokenizer, "continuous")


def test_the_budget_counts_each_rows_recurrent_states_beside_its_keys_and_values(detokenizer):
    model = tiny(transformers.Mamba2Config, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4, head_dim=16, n_groups=1)
    layout = probe(model)
    assert layout.kv_bytes_per_token == 0 and layout.state_bytes_per_row > 0
    batcher = Batcher(model, 8, set(), layout, memory_budget=int(2.5 * layout.state_bytes_per_row), start=False)
    assert batcher.max_request_tokens is None  # a recurrent row's size is the same whatever its length

    def sequence() -> Sequence:
        return Sequence([5, 6, 7], 100_000, GREEDY, TextStream(detokenizer, [5, 6, 7]), lambda event: None)

    assert batcher._within_budget([sequence(), sequence()]) and not batcher._within_budget([sequence()] * 3)
    hybrid = probe(tiny(transformers.JambaConfig, **SMALL, attn_layer_period=2, attn_layer_offset=1, num_experts=2))
    row = LAYOUT_SLACK * 10 * hybrid.kv_bytes_per_token + hybrid.state_bytes_per_row
    batcher = Batcher(model, 8, set(), hybrid, memory_budget=2 * row, start=False)
    assert batcher.max_request_tokens == (2 * row - hybrid.state_bytes_per_row) // (
        LAYOUT_SLACK * hybrid.kv_bytes_per_token
    )
