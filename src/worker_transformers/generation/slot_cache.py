"""The key/value cache of a running batch: one preallocated buffer per layer, a row per sequence, shared columns.

Every sequence in the batch writes its next token's keys and values into the same column each decode step, so
a step is one forward over (rows, 1) tokens whatever the sequences' lengths. A sequence that joins is prefilled
straight into free rows, its prompt right-aligned to end at the current column (a long prompt prefilled in chunks,
at the column the batch reaches by its last chunk); a sequence that leaves frees its row, and the last row moves
into it. So joining and leaving copy one sequence's keys and values at most, never
the batch's, and a step appends in place instead of concatenating the cache.

Which cached token each query may see is said by an explicit 4D attention mask built from each column's token
position (-1: nothing there), so rows need not line up: left padding, the columns skipped when a longer prompt
joins, and sliding windows are all masked the same way. Models with several attention kinds (Gemma 2 and 3,
gpt-oss: sliding and full layers) get one mask per kind, as transformers' own mask functions would build them.
Columns no row needs any more are reclaimed by moving the live ones left; growth doubles, so both cost O(1) per
step amortized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Target(NamedTuple):
    """Where the forward running now writes: its rows, and the columns from `start` to `end`."""

    rows: slice
    start: int
    end: int


_NOWHERE = _Target(slice(0, 0), 0, 0)


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, (row capacity, heads, column capacity, head dim). The owning cache
    says which rows and columns a forward addresses."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = self.cache.row_capacity, self.cache.column_capacity
        heads, k_dim, v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros(rows, heads, columns, k_dim)
        self.values = value_states.new_zeros(rows, heads, columns, v_dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, start, end = self.cache.target
        self.keys[rows, :, start:end] = key_states
        self.values[rows, :, start:end] = value_states
        return self.keys[rows, :, :end], self.values[rows, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.target.end, 0

    def get_seq_length(self) -> int:
        return self.cache.target.start

    def get_max_length(self) -> int:
        return -1

    def resize(self, rows: int, columns: int, keep_rows: int, keep: slice) -> None:
        """Reallocate to (rows, columns), keeping the first `keep_rows` rows' columns `keep`, moved to column 0."""
        if not self.is_initialized:
            return
        width = keep.stop - keep.start
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(rows, old.shape[1], columns, old.shape[3])
            new[:keep_rows, :, :width] = old[:keep_rows, :, keep]
            setattr(self, name, new)

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        if self.is_initialized:
            self.keys[targets, :, columns] = self.keys[source, :, columns]
            self.values[targets, :, columns] = self.values[source, :, columns]


class SlotCache(Cache):
    """The cache handed to the model on every forward of the batch; `writing` says where that forward writes."""

    def __init__(self, num_layers: int, row_capacity: int, column_capacity: int, device: torch.device) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.row_capacity = row_capacity
        self.column_capacity = column_capacity
        self.target = _NOWHERE
        # The position of the token each (row, column) holds; -1 where it holds none.
        self.positions = torch.full((row_capacity, column_capacity), -1, dtype=torch.long, device=device)

    @contextmanager
    def writing(self, rows: slice, start: int, end: int) -> Iterator[SlotCache]:
        """The cache for a forward that writes its tokens' keys and values into `rows`, columns `start` to `end`."""
        self.target = _Target(rows, start, end)
        try:
            yield self
        finally:
            self.target = _NOWHERE

    def resize(self, rows: int, columns: int, keep_rows: int, keep: slice) -> None:
        for layer in self.layers:
            layer.resize(rows, columns, keep_rows, keep)
        width = keep.stop - keep.start
        positions = self.positions.new_full((rows, columns), -1)
        positions[:keep_rows, :width] = self.positions[:keep_rows, keep]
        self.positions = positions
        self.row_capacity, self.column_capacity = rows, columns

    def copy_row(self, source: int, target: int, width: int) -> None:
        """Row `target` holds what row `source` holds, in its first `width` columns."""
        self.share_columns(source, slice(target, target + 1), slice(0, width))

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        """Rows `targets` hold what row `source` holds in `columns` (a prompt's prefix they all start with)."""
        for layer in self.layers:
            layer.share_columns(source, targets, columns)
        self.positions[targets, columns] = self.positions[source, columns]

    def move_row(self, source: int, target: int, width: int) -> None:
        self.copy_row(source, target, width)
        self.positions[source] = -1


def attention_masks(
    kv_positions: torch.Tensor,
    query_positions: torch.Tensor,
    windows: dict[str, int | None],
    dtype: torch.dtype,
    additive: bool,
    decode: bool = False,
) -> dict[str, torch.Tensor] | torch.Tensor:
    """The 4D masks (rows, 1, queries, columns) for each attention kind in `windows` (kind -> sliding window, None
    for full attention): a query sees the cached tokens at or before its own position, within the window. A query
    with no token of its own (left padding: position -1) sees only its own column, so its row of attention stays
    defined; nothing reads what it computes. `additive` gives eager attention's 0 / -inf form instead of booleans.
    A single kind gives a tensor, as models with one attention kind expect; several give a dict keyed by kind.

    `decode`: the same masks for a decode step, in a few operations instead of a dozen: each row's one query is
    its newest token, at a later position than every other token the row holds, and no row is padding, so a
    query sees exactly the columns that hold a token (within the window)."""
    kv = kv_positions[:, None, None, :]
    query = query_positions[:, None, :, None]
    if decode:
        held = kv >= 0
        masks = {kind: held if window is None else held & (kv > query - window) for kind, window in windows.items()}
    else:
        seen = (kv >= 0) & (kv <= query)
        masks = {
            kind: _padding_sees_itself(seen if window is None else seen & (query - kv < window), query_positions)
            for kind, window in windows.items()
        }
    return _by_kind(masks, dtype, additive)


def _by_kind(
    masks: dict[str, torch.Tensor], dtype: torch.dtype, additive: bool
) -> dict[str, torch.Tensor] | torch.Tensor:
    formed = {kind: _form(mask, dtype, additive) for kind, mask in masks.items()}
    return next(iter(formed.values())) if len(formed) == 1 else formed


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


def layer_windows(layer_types: Sequence[str] | None, sliding: Sequence[int | None]) -> dict[str, int | None]:
    """Attention kind -> sliding window, from the config's layer types (if it names them) and each layer's window
    as the model's own cache reports it (None: full attention)."""
    if not layer_types:
        return {"attention": sliding[0] if sliding else None}
    windows: dict[str, int | None] = {}
    for kind, window in zip(layer_types, sliding):
        windows.setdefault(kind, window)
    return windows
