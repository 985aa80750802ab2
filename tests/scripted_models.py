"""Tiny real models that answer a given prompt with given text, greedily: to drive the worker through a model's
own markup (tool calls, reasoning) token by token, as a real model of that family writes it.

The model is the tiny Llama of conftest.make_tiny_model whose layers write nothing into the residual stream
(their output projections are zero), so the logits are a function of the last token alone: a bigram table, set
through the embeddings and an untied lm_head. Each piece of a scripted answer is one added token (a special one
where the family's tokenizer has it special), so every step of the chain is a distinct token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Script:
    """A conversation (and the tools shown) and the pieces the model answers it with, one token each."""

    messages: list[dict[str, Any]]
    pieces: list[str]
    tools: list[dict[str, Any]] | None = None
    variables: dict[str, Any] = field(default_factory=dict)  # for the chat template (enable_thinking, ...)


def make_scripted_model(
    folder: Path,
    base: Path,
    template: str,
    scripts: list[Script],
    special: tuple[str, ...] = (),
    markup: tuple[str, ...] = (),
    response_template: dict[str, Any] | None = None,
) -> Path:
    """A copy of the tiny model in `base` with `template` as its chat template, answering each script's prompt with
    its pieces and then its end-of-sequence token. `special`: pieces that are special tokens in the real tokenizer
    (markers that decoding without special tokens would drop). `markup`: more tokens of the template's own (so a
    prompt ends in a token of its own). `response_template`: the tokenizer's, when it ships one."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(base)
    pieces = [piece for script in scripts for piece in script.pieces]
    assert len(set(pieces)) == len(pieces), "each piece must be a token of its own, once"
    tokenizer.add_tokens([*markup, *(p for p in pieces if p not in special)])
    tokenizer.add_special_tokens({"additional_special_tokens": [p for p in pieces if p in special]})
    tokenizer.chat_template = template
    if response_template is not None:
        tokenizer.response_template = response_template
    token = tokenizer.convert_tokens_to_ids

    chain: dict[int, int] = {}
    for script in scripts:
        text = tokenizer.apply_chat_template(
            script.messages, tools=script.tools, add_generation_prompt=True, tokenize=False, **script.variables
        )
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-1]] + [token(p) for p in script.pieces]
        for current, following in zip(ids, ids[1:] + [tokenizer.eos_token_id]):
            assert chain.get(current, following) == following, f"two scripts go on differently from {current}"
            chain[current] = following

    model = LlamaForCausalLM.from_pretrained(base, tie_word_embeddings=False)
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
