"""What the batch engine needs to know of a model's cache, read from one short forward of the model's own.

transformers' DynamicCache gives each layer the cache layer its kind needs: keys and values for attention (full,
sliding or chunked), convolution and recurrent states for linear-attention and state-space layers, both for
Falcon-H1's hybrid layers, nothing for layers that reuse another's keys and values or have no attention. The
batcher's slot cache (slot_cache.py) keeps the same per layer, a row per sequence, and the masks (masks.py) are
keyed by the config's layer types. A model whose cache holds another kind of layer, or none (its state lives in
the model), or that runs an attention implementation taking no explicit masks, is not batchable here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionLayer,
)

from worker_transformers.generation.batch.masks import Kinds, Reach, layer_kinds
from worker_transformers.generation.batch.slot_cache import ATTENTION, BOTH, NOTHING, STATE, LayerSpec

# Exactly these classes: a subclass (an indexed or quantized layer) keeps something the slot cache does not.
_KEEPS = {
    DynamicLayer: ATTENTION,
    DynamicSlidingWindowLayer: ATTENTION,
    LinearAttentionLayer: STATE,
    LinearAttentionAndFullAttentionLayer: BOTH,
    LinearAttentionAndSlidingWindowAttentionLayer: BOTH,
    DummyLayer: NOTHING,
}
_MASKED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class CacheLayout:
    """A model's cache as the batcher keeps it, or why it cannot."""

    batchable: bool
    why_not: str = ""  # when not batchable: what the cache is
    layers: tuple[LayerSpec, ...] = ()
    kinds: Kinds = field(default_factory=dict)  # mask kind -> its reach (masks.py)
    kv_bytes_per_token: int = 0  # keys and values of one token, every layer
    state_bytes_per_row: int = 0  # recurrent states of one sequence, every layer: fixed, whatever its length
    cache_argument: str = "past_key_values"  # the forward's name for its cache (Mamba's: cache_params)
    held_mask: bool = False  # give the 2D mask of held columns instead of 4D masks (masks.py, Bloom)
    # Whether prompts of several lengths may be prefilled together, left-padded: a recurrent layer must then keep
    # the padding out of its states, given the 2D mask of the forward's tokens (masks.py), as most models' do.
    padded_prefill: bool = True
    # Whether a long prompt may go in chunks: a recurrent layer must then go on from its states over several
    # tokens, which some models' code cannot (Falcon-Mamba's scan takes no initial state).
    chunked_prefill: bool = True
    # Whether an image's tokens see each other both ways in the prefill (Gemma 3's do: masks.py, vision.py).
    image_blocks: bool = False

    @property
    def recurrent(self) -> bool:
        return any(spec.keeps in (STATE, BOTH) for spec in self.layers)

    def describe(self) -> str:
        """What it batches, for the log: '3 recurrent layers, 1 attention layers', and the ways around the model's
        code the check chose (check.py)."""
        counts: dict[str, int] = {}
        for spec in self.layers:
            counts[spec.keeps] = counts.get(spec.keeps, 0) + 1
        what = ", ".join(f"{n} {_WHAT[keeps]}" for keeps, n in counts.items())
        if self.held_mask:
            what += "; a 2D mask of the tokens each row holds"
        if self.recurrent and not self.padded_prefill:
            what += "; prompts prefilled unpadded, one forward per length (its layers take no padding mask)"
        if not self.chunked_prefill:
            what += "; long prompts prefilled whole (its layers cannot go on from their states over several tokens)"
        if self.image_blocks:
            what += "; an image's tokens see each other both ways"
        return what


_WHAT = {
    ATTENTION: "attention layers",
    STATE: "recurrent layers",
    BOTH: "attention + recurrent layers",
    NOTHING: "layers without a cache",
}


@torch.inference_mode()
def probe(model: PreTrainedModel) -> CacheLayout:
    """Run two tokens through the model to see which cache it builds."""
    parameters = forward_parameters(model)
    argument = next((name for name in ("past_key_values", "cache_params") if name in parameters), None)
    if argument is None:
        # RWKV hands its state in and out of its forward, but its one-token step mixes the rows of a batch (its
        # `shifted` broadcasts across them, in transformers 5.23 as in `generate`), so it is served one at a time.
        return CacheLayout(False, "its forward takes no Cache (its state lives inside the model or beside it)")
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, argument, None)
    if type(cache) is not DynamicCache:  # a subclass keeps more than its layers (MiniMax's linear cache)
        kind = type(cache).__name__ if cache is not None else "no cache object (its state lives inside the model)"
        return CacheLayout(False, f"its forward keeps {kind}")
    unknown = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in _KEEPS})
    if unknown:
        return CacheLayout(False, f"its cache holds {', '.join(unknown)} layers")
    keeps = [_KEEPS[type(layer)] for layer in cache.layers]
    attention = model.config._attn_implementation
    if any(k in (ATTENTION, BOTH) for k in keeps) and attention not in _MASKED_ATTENTION:
        return CacheLayout(False, f"it runs {attention} attention, which takes no explicit masks")
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    if layer_types is not None and len(layer_types) != len(cache.layers):
        return CacheLayout(False, f"its config names {len(layer_types)} layer types for {len(cache.layers)} layers")
    reaches = [_reach(layer, layer_types[i] if layer_types else "") for i, layer in enumerate(cache.layers)]
    return CacheLayout(
        batchable=True,
        layers=tuple(LayerSpec(k, getattr(layer, "number_of_states", 1)) for k, layer in zip(keeps, cache.layers)),
        kinds=layer_kinds(layer_types, reaches),
        kv_bytes_per_token=sum(_kv_bytes_per_token(layer) for layer in cache.layers),
        state_bytes_per_row=sum(_state_bytes(layer) for layer in cache.layers),
        cache_argument=argument,
    )


def forward_parameters(model: PreTrainedModel) -> set[str]:
    """The arguments the model's forward names: its class's (a wrapper set on the instance, as benchmarks and
    tests set to watch the forwards, names none)."""
    return set(inspect.signature(type(model).forward).parameters)


def _reach(layer, layer_type: str) -> Reach | None:
    if not isinstance(layer, DynamicLayer):
        return None
    window = getattr(layer, "sliding_window", None)
    if window is not None and "chunked" in layer_type:  # Llama 4: its cache keeps a chunk as a window would
        return Reach(chunk=window)
    return Reach(window=window)


def _kv_bytes_per_token(layer) -> int:
    if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.keys.numel() == 0:
        return 0
    return (layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()


def _state_bytes(layer) -> int:
    if not isinstance(layer, LinearAttentionLayer):
        return 0
    states = [*layer.conv_states.values(), *layer.recurrent_states.values()]
    return sum(s[0].numel() * s.element_size() for s in states if s is not None)
