"""The batched sampler: always a real token id at the edges of what the schema admits, each row with its own
settings, draws that follow the softmax, and a seeded row that picks the same tokens whatever shares its batch."""

import pytest
import torch

from worker_transformers.generation.sampling import ARGMAX_BLOCK, BatchSampler, Sampling, argmax
from worker_transformers.serving.frontend import sampling_of
from worker_transformers.serving.schema import parse_request

VOCAB = 1000
CPU = torch.device("cpu")


def sampling(**fields) -> Sampling:
    return sampling_of(parse_request({"prompt": "x", **fields}, 64))


def sampler_for(rows: list[Sampling]) -> BatchSampler:
    sampler = BatchSampler(CPU)
    sampler.set_rows(rows, [row.generator(CPU) for row in rows])
    return sampler


def pick(rows: list[Sampling], logits: torch.Tensor, seen=None) -> list[int]:
    return sampler_for(rows).pick(logits, seen).tolist()


def draws(rows: list[Sampling], logits: torch.Tensor, steps: int) -> list[list[int]]:
    """`steps` successive picks for each row (each row's generator advancing), as one list per row."""
    sampler = sampler_for(rows)
    return [list(column) for column in zip(*(sampler.pick(logits, None).tolist() for _ in range(steps)))]


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-300},
        {"temperature": 2.0, "top_p": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e300},
        {"temperature": 1.0, "repetition_penalty": 3.4028235677973366e38},  # inf once rounded to float32
        {"temperature": 0.5, "top_k": 2**62},
        {"temperature": 1.0, "top_k": 1},
    ],
)
def test_extreme_settings_still_pick_a_token(fields):
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 20
    logits[0, 0] = 0.0  # a seen token whose logit is exactly 0: 0 x an infinite penalty would be nan
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, ::3] = True
    [token] = pick([sampling(seed=1, **fields)], logits, seen=seen)
    assert 0 <= token < VOCAB


def test_top_k_1_and_a_tiny_temperature_are_greedy():
    logits = torch.randn(2, VOCAB)
    best = logits.argmax(-1).tolist()
    assert pick([sampling(temperature=1.0, top_k=1, seed=3)] * 2, logits) == best
    assert pick([sampling(temperature=1e-9, seed=3)] * 2, logits) == best


def test_each_row_keeps_its_own_settings_in_one_batch():
    logits = torch.zeros(3, VOCAB)
    logits[:, 5] = 3.0
    logits[:, 6] = 2.9
    rows = [sampling(temperature=0), sampling(temperature=1.0, top_k=1, seed=1), sampling(temperature=2.0, seed=2)]
    greedy, top1, hot = draws(rows, logits, 200)
    assert set(greedy) == {5} and set(top1) == {5}
    assert len(set(hot)) > 10  # temperature 2 over a nearly flat vocabulary: many different tokens


def test_a_seeded_row_picks_the_same_tokens_whatever_shares_its_batch_and_in_whichever_row():
    torch.manual_seed(1)
    logits = torch.randn(1, VOCAB)
    mine = sampling(temperature=1.0, top_p=0.9, seed=42)
    [alone] = draws([mine], logits, 30)
    others = [sampling(temperature=0.7, top_k=50, seed=7), sampling(temperature=0), sampling(top_p=0.5, seed=3)]
    batch = torch.cat([torch.randn(2, VOCAB), logits, torch.randn(1, VOCAB)])
    shared = draws([others[0], others[1], mine, others[2]], batch, 30)[2]
    assert shared == alone
    assert len(set(alone)) > 1  # and the draws do change from step to step


def test_the_same_seed_gives_the_same_tokens_and_another_seed_other_tokens():
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is up to the noise

    def twenty(seed):
        return draws([sampling(temperature=1.0, seed=seed)], logits, 20)[0]

    assert twenty(5) == twenty(5)
    assert twenty(5) != twenty(6)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_draws_follow_the_softmax_and_within_top_p_the_renormalised_nucleus(top_p):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]) if top_p == 1.0 else torch.tensor([0.5, 0.3, 0.15, 0]) / 0.95
    rows = [sampling(temperature=1.0, top_p=top_p, seed=seed) for seed in range(2000)]
    picked = torch.tensor(draws(rows, logits.expand(len(rows), -1), 10)).flatten()
    frequencies = torch.bincount(picked, minlength=4).float() / len(picked)
    assert torch.allclose(frequencies, expected, atol=0.015), (frequencies, expected)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    [picked] = draws([sampling(temperature=1.0, top_p=0.8, seed=0)], logits, 300)
    assert set(picked) == {0, 1}
    # a nucleus of one token, which the rejection sampler reaches only through its sorted path
    flat = torch.linspace(0, 1e-3, VOCAB)[None, :]  # nearly uniform, the likeliest token last
    [tiny] = draws([sampling(temperature=1.0, top_p=1e-6, seed=0)], flat, 5)
    assert set(tiny) == {VOCAB - 1}


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = 1.0
    logits[0, 8] = 0.9
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, 7] = True
    assert pick([sampling(temperature=0, repetition_penalty=2.0)], logits, seen=seen) == [8]
    assert pick([sampling(temperature=0)], logits) == [7]


@pytest.mark.parametrize("vocab", [ARGMAX_BLOCK * 3, ARGMAX_BLOCK * 3 + 17, ARGMAX_BLOCK - 1])
def test_the_blockwise_argmax_is_torchs_including_ties_across_blocks_and_in_the_tail(vocab):
    torch.manual_seed(0)
    scores = torch.randn(6, vocab)
    scores[1, [vocab // 2, 5, vocab - 1]] = 10.0  # a tie across blocks and the tail: the first wins
    scores[2, vocab - 1] = 10.0  # the maximum in the tail
    scores[3] = float("-inf")
    scores[4, [vocab // 2 + 1, vocab // 2]] = float("inf")
    scores[5] = scores[5].round()  # many ties within a block
    assert argmax(scores).tolist() == scores.argmax(-1).tolist()
