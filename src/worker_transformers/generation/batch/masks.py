"""The attention masks of the batch's forwards, built from each cached token's position, never from its column.

Rows need not line up in the slot cache (slot_cache.py): left padding, the columns skipped when a longer prompt
joins, and a prompt prefilled in chunks all leave columns that hold no token of a row (position -1). So every
mask says which cached token each query may see from the two tokens' positions: at or before its own, and within
its attention kind's reach (a sliding window: the last `window` positions; chunked attention, Llama 4's: the
positions of its own chunk). Models with several attention kinds (Gemma 2 to 4, gpt-oss, Llama 4) get one mask per
kind, keyed by the names their config's `layer_types` use, as transformers' own mask functions would build them;
layer kinds that take no attention mask (linear attention, convolutions, state-space layers) get None, or the 2D
mask of a left-padded prefill's tokens, with which transformers' models keep the padding out of their states.

Bloom builds its ALiBi bias from a 2D mask of the tokens each row holds, so it is given that instead (`held`):
with full attention only, a 2D mask of held columns says the same as the 4D one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Reach(NamedTuple):
    """Which earlier tokens a query of one attention kind sees: every one (full attention), the last `window`
    positions (sliding), or those of its own `chunk` of positions (chunked)."""

    window: int | None = None
    chunk: int | None = None


# Layer kinds a model's mask mapping names, keyed as its config's layer_types say: their reach, or None where the
# layer takes no attention mask. One attention kind and nothing else is keyed "attention".
Kinds = dict[str, Reach | None]


def attention_masks(
    kv_positions: torch.Tensor,
    query_positions: torch.Tensor,
    kinds: Kinds,
    dtype: torch.dtype,
    additive: bool,
    decode: bool = False,
    padded: bool = False,
    blocks: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None] | torch.Tensor | None:
    """The 4D masks (rows, 1, queries, columns) for each attention kind in `kinds`: a query sees the cached tokens
    at or before its own position, within its kind's reach. A query with no token of its own (left padding:
    position -1) sees only its own column, so its row of attention stays defined; nothing reads what it computes.
    `additive` gives eager attention's 0 / -inf form instead of booleans. One attention kind gives a tensor, as
    models with one attention kind expect (their recurrent layers' masks are None for a 4D mask); several give a
    dict keyed by kind, None for the kinds that take no mask; none (a purely recurrent model) gives None.

    `decode`: the same masks for a decode step, in a few operations instead of a dozen: each row's one query is
    its newest token, at a later position than every other token the row holds, and no row is padding, so a
    query sees exactly the columns that hold a token (within its reach).

    `padded`: a prefill with left padding, whose recurrent kinds are given the 2D mask (rows, queries) of the
    forward's own tokens, as transformers' models take it: they zero the padding's inputs, so that a recurrent
    state starts from it unchanged (then the masks are a dict whatever the attention kinds; a purely recurrent
    model's is that 2D mask alone).

    `blocks`: (rows, queries) the image each of the forward's queries belongs to (-1: none), for a model whose
    image tokens see each other both ways (Gemma 3): a query also sees the later tokens of its own image, within
    its kind's reach."""
    attending = {kind: reach for kind, reach in kinds.items() if reach is not None}
    recurrent_padding = (query_positions >= 0).long() if padded and len(attending) < len(kinds) else None
    if not attending:
        return recurrent_padding
    kv = kv_positions[:, None, None, :]
    query = query_positions[:, None, :, None]
    if decode:
        held = kv >= 0
        masks = {kind: _within(held, kv, query, reach) for kind, reach in attending.items()}
    else:
        seen = (kv >= 0) & (kv <= query)
        if blocks is not None:
            seen = seen | _same_image(blocks, kv_positions.shape[1])
        masks = {
            kind: _padding_sees_itself(_within(seen, kv, query, reach), query_positions)
            for kind, reach in attending.items()
        }
    formed = {kind: _form(mask, dtype, additive) for kind, mask in masks.items()}
    if len(formed) == 1 and recurrent_padding is None:
        return next(iter(formed.values()))
    return {kind: formed.get(kind, recurrent_padding) for kind in kinds}


def held_columns(kv_positions: torch.Tensor) -> torch.Tensor:
    """The 2D mask (rows, columns) of the columns that hold a token of their row: for models that build their
    own masks and position biases from one (Bloom's ALiBi), where every kind is full attention."""
    return (kv_positions >= 0).long()


def _within(seen: torch.Tensor, kv: torch.Tensor, query: torch.Tensor, reach: Reach) -> torch.Tensor:
    if reach.window is not None:
        seen = seen & (query - kv < reach.window)
    if reach.chunk is not None:
        seen = seen & (kv.div(reach.chunk, rounding_mode="floor") == query.div(reach.chunk, rounding_mode="floor"))
    return seen


def _same_image(blocks: torch.Tensor, columns: int) -> torch.Tensor:
    """(rows, 1, queries, columns): whether a query and a column hold tokens of one image. The queries are the
    forward's own tokens, in the last columns; an image lies within one forward."""
    held = torch.full((blocks.shape[0], columns), -1, dtype=blocks.dtype, device=blocks.device)
    held[:, columns - blocks.shape[1] :] = blocks
    return (blocks[:, None, :, None] == held[:, None, None, :]) & (blocks >= 0)[:, None, :, None]


def _padding_sees_itself(mask: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    queries, columns = mask.shape[2], mask.shape[3]
    padding = (query_positions < 0)[:, None, :, None]
    own_column = (
        torch.arange(columns, device=mask.device)[None, None, None, :]
        == (torch.arange(queries, device=mask.device) + columns - queries)[None, None, :, None]
    )
    return mask | (padding & own_column)


def _form(mask: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    if not additive:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def layer_kinds(layer_types: Sequence[str] | None, reaches: Sequence[Reach | None]) -> Kinds:
    """Layer kind -> reach, from the config's layer types (if it names them) and each layer's reach as the
    model's own cache shows it (None: the layer keeps no keys and values). A kind some layer keeps keys and values
    for is an attention kind, with that layer's reach; the others (recurrent layers, and experts or MLPs with no
    attention) take no mask. Layers that reuse another layer's keys and values (Gemma 4's shared layers) keep none
    themselves but share their kind's name with the layers that do."""
    if not layer_types:
        attending = [reach for reach in reaches if reach is not None]
        return {"attention": attending[0] if attending else None}
    kinds: Kinds = dict.fromkeys(layer_types)
    for kind, reach in zip(layer_types, reaches):
        if reach is not None and kinds[kind] is None:
            kinds[kind] = reach
    return kinds
