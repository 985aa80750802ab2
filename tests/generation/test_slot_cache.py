"""The slot cache's recurrent layers keep a row's states as transformers' own layer keeps a sequence's, and its
rows move, grow and copy with their states."""

import torch
from transformers.cache_utils import LinearAttentionLayer

from worker_transformers.generation.batch.layout import CacheLayout
from worker_transformers.generation.batch.slot_cache import ATTENTION, NOTHING, STATE, LayerSpec, SlotCache

KERNEL = 4


def states(rows: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 3, tokens, generator=torch.Generator().manual_seed(seed))


def test_a_rows_convolution_window_goes_on_as_transformers_own_layer_keeps_it():
    """A prefill shorter than the kernel, a longer chunk after it, then one-token steps: each update returns what
    transformers' LinearAttentionLayer returns for that sequence alone, and the row keeps its window."""
    cache = SlotCache([LayerSpec(STATE)], row_capacity=3, column_capacity=0, device=torch.device("cpu"))
    layer = cache.layers[0]
    own = LinearAttentionLayer()
    updates = [(states(1, 2, 0), False), (states(1, 5, 1), True), (states(1, 1, 2), True), (states(1, 1, 3), True)]
    for update, continuing in updates:
        with cache.writing(slice(1, 2), 0, 0, continuing):
            assert cache.has_previous_state(0) == continuing
            got = layer.update_conv_state(update, conv_kernel_size=KERNEL)
            held = cache.get_conv_state(0) if continuing else None
        expected = own.update_conv_state(update, conv_kernel_size=KERNEL)
        assert torch.equal(got, expected)
        assert held is None or held.shape == (1, 3, KERNEL)
    assert torch.equal(layer._conv[0][1:2], own.conv_states[0])
    assert not layer._conv[0][[0, 2]].any()  # the other rows were never written


def test_in_place_updates_of_the_rows_a_forward_addresses_land_in_those_rows_only():
    """Models update their states in place (a decode step's kernels): the views they get are of the buffer."""
    cache = SlotCache([LayerSpec(STATE)], row_capacity=4, column_capacity=0, device=torch.device("cpu"))
    layer = cache.layers[0]
    with cache.writing(slice(0, 4), 0, 0):
        layer.update_recurrent_state(torch.zeros(4, 2, 2))
    with cache.writing(slice(1, 3), 0, 0, continuing=True):
        cache.get_recurrent_state(0).add_(1)
    assert layer._recurrent[0][:, 0, 0].tolist() == [0, 1, 1, 0]


def test_rows_move_grow_and_copy_with_their_states_and_layers_that_keep_nothing_are_skipped():
    specs = [LayerSpec(STATE, number_of_states=2), LayerSpec(ATTENTION), LayerSpec(NOTHING)]
    cache = SlotCache(specs, row_capacity=2, column_capacity=4, device=torch.device("cpu"))
    assert CacheLayout(True, layers=tuple(specs)).recurrent
    layer = cache.layers[0]
    for index in (0, 1):
        with cache.writing(slice(0, 2), 0, 0):
            layer.update_recurrent_state(torch.arange(2.0)[:, None].expand(2, 3).clone(), state_idx=index)
    cache.resize(rows=4, columns=8, keep_rows=2, keep=slice(0, 4))
    assert layer._recurrent[1][:, 0].tolist() == [0, 1, 0, 0]
    cache.copy_row(1, 3, width=2)
    cache.move_row(3, 0, width=2)
    assert layer._recurrent[0][:, 0].tolist() == [1, 1, 0, 1] == layer._recurrent[1][:, 0].tolist()
    assert not CacheLayout(True, layers=(LayerSpec(ATTENTION), LayerSpec(NOTHING))).recurrent
