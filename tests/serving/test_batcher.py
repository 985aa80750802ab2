"""The batcher's turns on a tiny random Llama: what one turn's prefill takes in."""

import queue

from worker_transformers.serving import batcher as batcher_module
from worker_transformers.serving.events import Done
from worker_transformers.serving.schema import parse_request


def recorded_prefills(generator, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, columns) of each prefill forward the batcher runs from now on."""
    prefills = []
    forward = generator._forward

    def recording(ids, positions, masks):
        if ids.shape[1] > 1:
            prefills.append(tuple(ids.shape))
        return forward(ids, positions, masks)

    monkeypatch.setattr(generator, "_forward", recording)
    return prefills


def answers_in_one_turn(engine, requests) -> list[str]:
    """Every request submitted before the batcher takes the first, and each one's whole text."""
    boxes: list[queue.Queue] = [queue.Queue() for _ in requests]
    with engine.generator._wake:
        for request, box in zip(requests, boxes):
            engine.submit(request, engine.prepare(request), box.put)
    texts = []
    for box in boxes:
        pieces = [box.get()]
        while not isinstance(pieces[-1], Done):
            pieces.append(box.get())
        texts.append("".join(piece.text for piece in pieces))
    return texts


def test_a_turns_prefill_stays_within_prefill_tokens_counting_the_padding_and_answers_are_unchanged(
    tiny_engine, monkeypatch
):
    prompts = ["one two three four five six seven eight nine ten eleven twelve", "hi", "a b", "yes", "no"]
    requests = [parse_request({"prompt": p, "max_new_tokens": 6, "temperature": 0}, 64) for p in prompts]
    alone = [tiny_engine.generate(r)["text"] for r in requests]
    lengths = [len(tiny_engine.prepare(r).ids) for r in requests]
    # Room for the long prompt and one short one side by side, unpadded; padded, the long one goes alone.
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", lengths[0] + max(lengths[1:]))
    prefills = recorded_prefills(tiny_engine.generator, monkeypatch)
    assert answers_in_one_turn(tiny_engine, requests) == alone
    assert prefills[0] == (1, lengths[0])  # with a short one beside it, it would be padded past the limit
    assert all(rows * columns <= batcher_module.PREFILL_TOKENS for rows, columns in prefills[1:])
    assert sum(rows for rows, _ in prefills) == len(requests)


def test_requests_with_one_prompt_share_its_prefill_and_answer_as_they_would_alone(tiny_engine, monkeypatch):
    prompt = "one two three four five six"
    jobs = [
        {"prompt": prompt, "max_new_tokens": 6, "temperature": 0},
        {"prompt": prompt, "max_new_tokens": 6, "temperature": 1.0, "seed": 1},
        {"prompt": "a b", "max_new_tokens": 6, "temperature": 0},
        {"prompt": prompt, "max_new_tokens": 6, "temperature": 1.0, "seed": 2},
    ]
    requests = [parse_request(job, 64) for job in jobs]
    alone = [tiny_engine.generate(r)["text"] for r in requests]
    prefills = recorded_prefills(tiny_engine.generator, monkeypatch)
    texts = answers_in_one_turn(tiny_engine, requests)
    assert [rows for rows, _ in prefills] == [2], "each distinct prompt is prefilled once"
    assert texts == alone
    assert len({texts[i] for i in (0, 1, 3)}) > 1  # the copies sample on their own


def test_prompts_that_start_alike_compute_the_shared_start_once_and_answer_as_they_would_alone(
    tiny_engine, monkeypatch
):
    preamble = "What is the capital of France? A small model says hello to the world. "
    prompts = [preamble + "one two", preamble + "Stop here, then go on: one, two, three", preamble + "yes"]
    requests = [parse_request({"prompt": p, "max_new_tokens": 8, "temperature": 0}, 64) for p in prompts]
    requests.append(requests[1])  # the same prompt again: a copy of its row, prefix and all
    alone = [tiny_engine.generate(r)["text"] for r in requests]
    ids = [tiny_engine.prepare(r).ids for r in requests[:3]]
    shared = next(i for i, column in enumerate(zip(*ids)) if len(set(column)) > 1)
    assert shared >= batcher_module.SHARED_PREFIX_MIN
    prefills = recorded_prefills(tiny_engine.generator, monkeypatch)
    assert answers_in_one_turn(tiny_engine, requests) == alone
    # the shared start once, in a row of its own; then each distinct prompt's own tokens, padded to the longest
    assert prefills == [(1, shared), (3, max(map(len, ids)) - shared)]


def test_prompts_that_share_less_than_the_minimum_are_prefilled_together_in_one_forward(tiny_engine, monkeypatch):
    prompts = ["What is the capital of France?", "What is the capital of Paris and France?"]
    requests = [parse_request({"prompt": p, "max_new_tokens": 4, "temperature": 0}, 64) for p in prompts]
    ids = [tiny_engine.prepare(r).ids for r in requests]
    prefills = recorded_prefills(tiny_engine.generator, monkeypatch)
    answers_in_one_turn(tiny_engine, requests)
    assert prefills == [(2, max(map(len, ids)))]
