"""The cache of a running batch: one preallocated buffer per layer, a row per sequence, shared columns.

Every sequence in the batch writes its next token's keys and values into the same column each decode step, so
a step is one forward over (rows, 1) tokens whatever the sequences' lengths. A sequence that joins is prefilled
straight into free rows, its prompt right-aligned to end at the current column (a long prompt prefilled in chunks,
at the column the batch reaches by its last chunk); a sequence that leaves frees its row, and the last row moves
into it. So joining and leaving copy one sequence's keys and values at most, never
the batch's, and a step appends in place instead of concatenating the cache. Which cached token each query may
see is said by explicit masks built from each column's token position (masks.py). Columns no row needs any more
are reclaimed by moving the live ones left; growth doubles, so both cost O(1) per step amortized.

A model's layers keep what their kind needs, each as transformers' own cache layer of that kind would, so the
model's code runs on this cache unchanged:
- attention layers (full, sliding, chunked): keys and values, (rows, heads, columns, head dim) (`SlotLayer`);
- recurrent layers (linear attention, convolutions, state-space layers: Qwen 3.5, LFM2, Mamba 2, ...): their
  states, a fixed size per row whatever the sequence's length (`SlotStateLayer`); a forward reads and updates
  the states of the rows it addresses, in place;
- layers with both (Falcon-H1's) keep both; layers that keep nothing (Gemma 4's layers that reuse another
  layer's keys and values, Nemotron-H's MLP layers) are transformers' `DummyLayer`.
A forward's `writing` says which rows and columns it addresses, and whether its rows go on from the states they
hold (a decode step, a long prompt's later chunk) or start afresh (a prefill).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, LinearAttentionCacheLayerMixin


class _Target(NamedTuple):
    """Where the forward running now writes: its rows, the columns from `start` to `end`, and whether its rows go
    on from the recurrent states they hold."""

    rows: slice
    start: int
    end: int
    continuing: bool = False


_NOWHERE = _Target(slice(0, 0), 0, 0)

# What each layer of a model keeps, by the kind of the layer transformers' own DynamicCache builds for it.
ATTENTION, STATE, BOTH, NOTHING = "attention", "state", "both", "nothing"


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, (row capacity, heads, column capacity, head dim). The owning cache
    says which rows and columns a forward addresses."""

    is_sliding = False
    is_compileable = False

    def __init__(self, cache: SlotCache) -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._allocate_keys_and_values(key_states, value_states)

    def _allocate_keys_and_values(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = self.cache.row_capacity, self.cache.column_capacity
        heads, k_dim, v_dim = key_states.shape[1], key_states.shape[-1], value_states.shape[-1]
        self.keys = key_states.new_zeros(rows, heads, columns, k_dim)
        self.values = value_states.new_zeros(rows, heads, columns, v_dim)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self._allocate_keys_and_values(key_states, value_states)
        rows, start, end, _ = self.cache.target
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


class SlotStateLayer(LinearAttentionCacheLayerMixin):
    """One recurrent layer's states: `number_of_states` convolution windows and recurrent states, each a buffer of
    (row capacity, ...) made at the layer's first update. The model sees, and updates in place, the rows the
    forward addresses: `conv_states` and `recurrent_states` are views of them, and `has_previous_state` says
    whether those rows go on from their states."""

    is_compileable = False
    supports_early_init = False
    record_past = False

    def __init__(self, cache: SlotCache, number_of_states: int = 1) -> None:
        # Not the mixin's __init__: its per-state dicts are views of the addressed rows here (the properties below).
        self.cache = cache
        self.number_of_states = number_of_states
        self.conv_kernel_size: dict[int, int] = {}
        self._conv: dict[int, torch.Tensor] = {}
        self._recurrent: dict[int, torch.Tensor] = {}

    @property
    def conv_states(self) -> dict[int, torch.Tensor]:
        rows = self.cache.target.rows
        return {index: state[rows] for index, state in self._conv.items()}

    @property
    def recurrent_states(self) -> dict[int, torch.Tensor]:
        rows = self.cache.target.rows
        return {index: state[rows] for index, state in self._recurrent.items()}

    @property
    def has_previous_state(self) -> dict[int, bool]:
        return dict.fromkeys(range(self.number_of_states), self.cache.target.continuing)

    @property
    def is_conv_states_initialized(self) -> dict[int, bool]:
        return {index: index in self._conv for index in range(self.number_of_states)}

    @property
    def is_recurrent_states_initialized(self) -> dict[int, bool]:
        return {index: index in self._recurrent for index in range(self.number_of_states)}

    def lazy_initialization(
        self,
        conv_states: torch.Tensor | None = None,
        recurrent_states: torch.Tensor | None = None,
        state_idx: int = 0,
        conv_kernel_size: int | None = None,
    ) -> None:
        rows = self.cache.row_capacity
        if conv_states is not None:
            kernel = conv_kernel_size or conv_states.shape[-1]
            self.conv_kernel_size[state_idx] = kernel
            self._conv[state_idx] = conv_states.new_zeros(rows, *conv_states.shape[1:-1], kernel)
        if recurrent_states is not None:
            self._recurrent[state_idx] = recurrent_states.new_zeros(rows, *recurrent_states.shape[1:])

    def update_conv_state(
        self, conv_states: torch.Tensor, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs
    ) -> torch.Tensor:
        """The convolution's input with the window the rows held before it (none for a prefill: zeros where the
        prompt is shorter than the kernel), its last kernel-width columns kept as the rows' new window."""
        if state_idx not in self._conv:
            self.lazy_initialization(conv_states=conv_states, state_idx=state_idx, conv_kernel_size=conv_kernel_size)
        kernel, held = self.conv_kernel_size[state_idx], self._conv[state_idx][self.cache.target.rows]
        if self.cache.target.continuing:
            full = torch.cat([held, conv_states], dim=-1)
        else:
            full = torch.nn.functional.pad(conv_states, (max(0, kernel - conv_states.shape[-1]), 0))
        held.copy_(full[..., -kernel:])
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        if state_idx not in self._recurrent:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        held = self._recurrent[state_idx][self.cache.target.rows]
        held.copy_(recurrent_states)
        return held

    def resize(self, rows: int, columns: int, keep_rows: int, keep: slice) -> None:
        for states in (self._conv, self._recurrent):
            for index, old in states.items():
                states[index] = old.new_zeros(rows, *old.shape[1:])
                states[index][:keep_rows] = old[:keep_rows]

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        """Rows `targets` take row `source`'s states: only ever for the same tokens (a request's n choices)."""
        for states in (self._conv, self._recurrent):
            for state in states.values():
                state[targets] = state[source]



class SlotHybridLayer(SlotLayer, SlotStateLayer):
    """A layer with attention and recurrent state both (Falcon-H1's): keys and values, and per-row states."""

    def __init__(self, cache: SlotCache, number_of_states: int = 1) -> None:
        SlotLayer.__init__(self, cache)
        SlotStateLayer.__init__(self, cache, number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2:  # keys and values, as an attention update passes them
            self._allocate_keys_and_values(*args)
        else:
            SlotStateLayer.lazy_initialization(self, *args, **kwargs)

    def resize(self, rows: int, columns: int, keep_rows: int, keep: slice) -> None:
        SlotLayer.resize(self, rows, columns, keep_rows, keep)
        SlotStateLayer.resize(self, rows, columns, keep_rows, keep)

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        SlotLayer.share_columns(self, source, targets, columns)
        SlotStateLayer.share_columns(self, source, targets, columns)


class _Nothing(DummyLayer):
    """A layer that keeps nothing, so has nothing to move."""

    def resize(self, rows: int, columns: int, keep_rows: int, keep: slice) -> None:
        pass

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        pass


class LayerSpec(NamedTuple):
    """What one layer keeps (ATTENTION, STATE, BOTH or NOTHING), and how many states of each kind."""

    keeps: str
    number_of_states: int = 1


class SlotCache(Cache):
    """The cache handed to the model on every forward of the batch; `writing` says where that forward writes."""

    def __init__(
        self,
        layers: list[LayerSpec],
        row_capacity: int,
        column_capacity: int,
        device: torch.device,
    ) -> None:
        super().__init__(layers=[self._layer(spec) for spec in layers])
        self.row_capacity = row_capacity
        self.column_capacity = column_capacity
        self.target = _NOWHERE
        # The position of the token each (row, column) holds; -1 where it holds none.
        self.positions = torch.full((row_capacity, column_capacity), -1, dtype=torch.long, device=device)

    def _layer(self, spec: LayerSpec) -> SlotLayer | SlotStateLayer | DummyLayer:
        if spec.keeps == ATTENTION:
            return SlotLayer(self)
        if spec.keeps == STATE:
            return SlotStateLayer(self, spec.number_of_states)
        if spec.keeps == BOTH:
            return SlotHybridLayer(self, spec.number_of_states)
        return _Nothing()

    @contextmanager
    def writing(self, rows: slice, start: int, end: int, continuing: bool = False) -> Iterator[SlotCache]:
        """The cache for a forward that writes its tokens' keys and values into `rows`, columns `start` to `end`;
        `continuing`: its rows go on from the recurrent states they hold (else a prefill starts them afresh)."""
        self.target = _Target(rows, start, end, continuing)
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
        """Row `target` holds what row `source` holds, in its first `width` columns, and its states."""
        self.share_columns(source, slice(target, target + 1), slice(0, width))

    def share_columns(self, source: int, targets: slice, columns: slice) -> None:
        """Rows `targets` hold what row `source` holds in `columns` (a prompt's prefix they all start with)."""
        for layer in self.layers:
            layer.share_columns(source, targets, columns)
        self.positions[targets, columns] = self.positions[source, columns]

    def move_row(self, source: int, target: int, width: int) -> None:
        self.copy_row(source, target, width)
        self.positions[source] = -1
