"""The slot cache's attention masks: the decode step's quick masks are the general ones for a decode step."""

import torch

from worker_transformers.generation.batch.masks import Reach, attention_masks


def test_a_decode_steps_quick_masks_equal_the_general_masks_for_rows_with_gaps_and_sliding_windows():
    # Four rows over nine columns: left padding and skipped columns hold -1, and each row's last column holds its
    # newest token, the one the step's query is for.
    kv_positions = torch.tensor(
        [
            [0, 1, 2, 3, 4, 5, 6, 7, 8],
            [-1, -1, -1, 0, 1, 2, -1, 3, 4],
            [-1, -1, -1, -1, -1, -1, -1, -1, 0],
            [-1, 0, 1, 2, 3, 4, 5, 6, 7],
        ]
    )
    queries = kv_positions[:, -1:]
    windows = {"full_attention": Reach(), "sliding_attention": Reach(window=3)}
    for additive in (False, True):
        general = attention_masks(kv_positions, queries, windows, torch.float32, additive)
        quick = attention_masks(kv_positions, queries, windows, torch.float32, additive, decode=True)
        assert general.keys() == quick.keys()
        for kind in windows:
            assert torch.equal(general[kind], quick[kind]), kind
    sliding = attention_masks(kv_positions, queries, windows, torch.float32, False, decode=True)["sliding_attention"]
    assert sliding[1, 0, 0].tolist() == [False] * 5 + [True, False, True, True]


def test_a_single_attention_kind_gives_one_mask():
    kv_positions = torch.tensor([[-1, 0, 1]])
    mask = attention_masks(kv_positions, kv_positions[:, -1:], {"attention": Reach()}, torch.float32, False, decode=True)
    assert mask.tolist() == [[[[False, True, True]]]]
