"""The sampler at the edges of what the schema admits: it always returns a real token id."""

import pytest
import torch

from worker_transformers.serving.sampling import Sampler
from worker_transformers.serving.schema import parse_request

VOCAB = 1000


def sampler(**fields) -> Sampler:
    return Sampler(parse_request({"prompt": "x", **fields}, 64), torch.device("cpu"))


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
    logits = torch.randn(VOCAB) * 20
    logits[0] = 0.0  # a seen token whose logit is exactly 0: 0 x an infinite penalty would be nan
    seen = torch.arange(0, VOCAB, 3)
    token = sampler(seed=1, **fields).pick(logits, seen)
    assert 0 <= token < VOCAB


def test_top_k_1_and_a_tiny_temperature_are_greedy():
    logits = torch.randn(VOCAB)
    best = int(logits.argmax())
    assert sampler(temperature=1.0, top_k=1, seed=3).pick(logits, torch.tensor([0])) == best
    assert sampler(temperature=1e-9, seed=3).pick(logits, torch.tensor([0])) == best


def test_the_same_seed_gives_the_same_tokens_and_another_seed_other_tokens():
    logits = torch.zeros(VOCAB)  # uniform: every draw is up to the generator
    seen = torch.tensor([0])
    draws = lambda seed: [s.pick(logits, seen) for s in [sampler(temperature=1.0, seed=seed)] for _ in range(20)]  # noqa: E731
    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.zeros(VOCAB)
    logits[7] = 1.0
    logits[8] = 0.9
    assert sampler(temperature=0, repetition_penalty=2.0).pick(logits, torch.tensor([7])) == 8
    assert sampler(temperature=0).pick(logits, torch.tensor([7])) == 7
