"""A synthetic checkpoint for the cold-start benchmark: a Llama of random float32 weights, at least 1 GB in
two safetensors shards with their index, and the default model's tokenizer. It measures loading at a size
the default model does not reach, with no download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_synthetic_model(folder: Path, tokenizer_from: Path, min_bytes: int = 10**9) -> Path:
    """Write the checkpoint to `folder`; returns `folder`."""
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    hidden, intermediate = 1024, 4096
    per_layer = 4 * (2 * hidden * hidden + 2 * (hidden * hidden // 4) + 3 * hidden * intermediate)  # q, o, k, v, mlp
    layers = max(1, -(-(min_bytes - 4 * vocab * hidden) // per_layer))  # ceil, with the embedding counted
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype=torch.float32,
    )
    with torch.device("meta"):
        shapes = {
            name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items() if name != "lm_head.weight"
        }
    generator = torch.Generator().manual_seed(0)
    names = list(shapes)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=generator) * 0.02
            weight_map[name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return folder
