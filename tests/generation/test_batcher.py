"""The batcher's turns on tiny random Llamas: what one turn's prefill takes in, and a long prompt's chunks beside
the running streams (PREFILL_TOKENS set to 16), each answer held against the one it gets alone, unchunked."""

import queue
import time

import pytest
import torch

from worker_transformers.config import Settings
from worker_transformers.generation.batch import batcher as batcher_module
from worker_transformers.generation.events import Done, Failed, Sequence
from worker_transformers.generation.sampling import GREEDY
from worker_transformers.serving.schema import GenerationRequest, parse_request
from worker_transformers.generation.textstream import TextStream
from worker_transformers.worker import setup


def recorded_forwards(batcher, monkeypatch, on_forward=lambda shape: None) -> list[tuple[int, int]]:
    """The (rows, tokens) of each forward of the model the batcher runs from now on, prefills and decode steps
    alike; `on_forward` sees each one's shape first."""
    forwards = []
    forward = batcher.model.forward

    def recording(*args, input_ids, **kwargs):
        forwards.append(tuple(input_ids.shape))
        on_forward(forwards[-1])
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(batcher.model, "forward", recording)
    return forwards


def recorded_prefills(batcher, monkeypatch) -> list[tuple[int, int]]:
    """The (rows, columns) of each prefill forward the batcher runs from now on."""
    prefills = []
    recorded_forwards(batcher, monkeypatch, lambda shape: shape[1] > 1 and prefills.append(shape))
    return prefills


def submitted_in_one_turn(engine, requests) -> tuple[list, list[queue.Queue]]:
    """Every request submitted before the batcher takes the first: their sequences, and the boxes of their events."""
    boxes: list[queue.Queue] = [queue.Queue() for _ in requests]
    with engine.generation.engine.one_turn():
        sequences = [engine.submit(r, engine.prepare(r), box.put) for r, box in zip(requests, boxes)]
    return sequences, boxes


def whole_text(box: queue.Queue) -> str:
    pieces = [box.get(timeout=60)]
    while not isinstance(pieces[-1], Done):
        pieces.append(box.get(timeout=60))
    return "".join(piece.text for piece in pieces)


def answers_in_one_turn(engine, requests) -> list[str]:
    """Every request submitted before the batcher takes the first, and each one's whole text."""
    _, boxes = submitted_in_one_turn(engine, requests)
    return [whole_text(box) for box in boxes]


def last_event(box: queue.Queue):
    event = box.get(timeout=60)
    while not isinstance(event, Done | Failed):
        event = box.get(timeout=60)
    return event


def submitted_during_forwards(engine, monkeypatch, schedule) -> list[queue.Queue]:
    """Each (forward number, request) of `schedule` submitted while the batcher's forward of that number waits
    (0: before the first), so that it arrives at a known point of the batch's life; the boxes of their events."""
    boxes = [queue.Queue() for _ in schedule]
    due: dict[int, list] = {}
    for (number, request), box in zip(schedule, boxes):
        due.setdefault(number, []).append((request, engine.prepare(request), box))
    numbers = iter(range(1, 1_000_000))

    def submit_due(shape=None):
        for request, prepared, box in due.pop(next(numbers) if shape else 0, []):
            engine.submit(request, prepared, box.put)

    recorded_forwards(engine.generation.engine, monkeypatch, submit_due)
    submit_due()
    return boxes


def idle(batcher) -> bool:
    for _ in range(500):
        if batcher.in_flight() == 0:
            return True
        time.sleep(0.01)
    return False


def test_a_turns_prefill_stays_within_prefill_tokens_counting_the_padding_and_answers_are_unchanged(
    tiny_engine, monkeypatch
):
    prompts = ["one two three four five six seven eight nine ten eleven twelve", "hi", "a b", "yes", "no"]
    requests = [parse_request({"prompt": p, "max_new_tokens": 6, "temperature": 0}, 64) for p in prompts]
    alone = [tiny_engine.generate(r)["text"] for r in requests]
    lengths = [len(tiny_engine.prepare(r).ids) for r in requests]
    # Room for the long prompt and one short one side by side, unpadded; padded, the long one goes alone.
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", lengths[0] + max(lengths[1:]))
    prefills = recorded_prefills(tiny_engine.generation.engine, monkeypatch)
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
    prefills = recorded_prefills(tiny_engine.generation.engine, monkeypatch)
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
    prefills = recorded_prefills(tiny_engine.generation.engine, monkeypatch)
    assert answers_in_one_turn(tiny_engine, requests) == alone
    # the shared start once, in a row of its own; then each distinct prompt's own tokens, padded to the longest
    assert prefills == [(1, shared), (3, max(map(len, ids)) - shared)]


def test_prompts_that_share_less_than_the_minimum_are_prefilled_together_in_one_forward(tiny_engine, monkeypatch):
    prompts = ["What is the capital of France?", "What is the capital of Paris and France?"]
    requests = [parse_request({"prompt": p, "max_new_tokens": 4, "temperature": 0}, 64) for p in prompts]
    ids = [tiny_engine.prepare(r).ids for r in requests]
    prefills = recorded_prefills(tiny_engine.generation.engine, monkeypatch)
    answers_in_one_turn(tiny_engine, requests)
    assert prefills == [(2, max(map(len, ids)))]


@pytest.fixture(scope="module")
def context_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer and shape with larger random weights: each answer depends on its whole prompt
    (the tiny model's own small weights mostly repeat the prompt's last token), so a token the batch's layout
    loses changes it."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("context-model")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def engine_of(model_dir):
    return setup(Settings.from_env({"MODEL_NAME": str(model_dir), "MAX_NEW_TOKENS": "64"}))


@pytest.fixture(scope="module")
def engine(context_model_dir):
    engine = engine_of(context_model_dir)
    yield engine
    engine.close()


CHUNK = 16  # PREFILL_TOKENS in the tests of chunks
# Prompts longer than that: 52 tokens (four chunks, the last of 4) and 21 (two chunks).
LONG_PROMPT = "Stop here, then go on: one, two, three, four, five, six, seven, eight. " * 2 + "The capital of France"
MEDIUM_PROMPT = "A small model says hello to the world, and the world answers back. What is the capital?"


def greedy(prompt: str, max_new_tokens: int) -> GenerationRequest:
    return parse_request({"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}, 64)


def test_a_long_prompt_is_prefilled_in_chunks_with_a_step_of_the_running_stream_between_each_two(engine, monkeypatch):
    running, long = greedy("Hello world", 40), greedy(LONG_PROMPT, 8)
    alone = [engine.generate(r)["text"] for r in (running, long)]  # unchunked: PREFILL_TOKENS is 4096
    short, length = (len(engine.prepare(r).ids) for r in (running, long))
    assert length % CHUNK not in (0, 1)  # the last chunk is a short one, and no decode step's shape
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    forwards = recorded_forwards(engine.generation.engine, monkeypatch)
    assert answers_in_one_turn(engine, [running, long]) == alone
    chunks = [(1, CHUNK)] * (length // CHUNK) + [(1, length % CHUNK)]
    between = [shape for chunk in chunks[:-1] for shape in (chunk, (1, 1))]  # each chunk, then the stream's step
    assert forwards[: 2 * len(chunks) + 2] == [(1, short), (1, 1), *between, chunks[-1], (2, 1)]


def test_the_choices_of_a_long_prompt_share_its_chunks_and_answer_as_they_would_alone(engine, monkeypatch):
    jobs = [
        {"prompt": LONG_PROMPT, "max_new_tokens": 8, "temperature": 0},
        {"prompt": LONG_PROMPT, "max_new_tokens": 8, "temperature": 1.0, "seed": 3},
    ]
    requests = [parse_request(job, 64) for job in jobs]
    alone = [engine.generate(r)["text"] for r in requests]
    length = len(engine.prepare(requests[0]).ids)
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    prefills = recorded_prefills(engine.generation.engine, monkeypatch)
    assert answers_in_one_turn(engine, requests) == alone
    assert all(shape == (1, CHUNK) for shape in prefills[:-1]) and sum(n for _, n in prefills) == length


def test_a_long_prompt_cancelled_between_its_chunks_frees_its_row_and_the_running_stream_goes_on(engine, monkeypatch):
    running, long = greedy("Hello world", 40), greedy(LONG_PROMPT, 8)
    alone = [engine.generate(r)["text"] for r in (running, long)]
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    batcher = engine.generation.engine
    cancelled = []

    def cancel_after_the_second_chunk(shape):
        if shape == (1, CHUNK) and forwards.count(shape) == 2:
            cancelled.append((len(forwards), batcher.in_flight()))
            batcher.cancel(sequences[1])  # as the job's stream does when its caller goes away

    forwards = recorded_forwards(batcher, monkeypatch, cancel_after_the_second_chunk)
    sequences, boxes = submitted_in_one_turn(engine, [running, long])
    assert whole_text(boxes[0]) == alone[0]
    assert idle(batcher) and boxes[1].empty()  # the cancelled request is told nothing more
    [(number, in_flight)] = cancelled
    assert in_flight == 2 and (1, CHUNK) not in forwards[number:]  # it counted while chunked; no chunk after it
    assert batcher.chunks is None and bool((batcher.cache.positions == -1).all())  # its row holds nothing
    assert answers_in_one_turn(engine, [long]) == alone[1:]


def test_out_of_memory_in_a_chunk_fails_that_request_only_and_the_running_stream_goes_on(engine, monkeypatch):
    running, long = greedy("Hello world", 40), greedy(LONG_PROMPT, 8)
    alone = [engine.generate(r)["text"] for r in (running, long)]
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    batcher = engine.generation.engine

    def out_of_memory_at_the_second_chunk(shape):
        if shape == (1, CHUNK) and forwards.count(shape) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    forwards = recorded_forwards(batcher, monkeypatch, out_of_memory_at_the_second_chunk)
    _, boxes = submitted_in_one_turn(engine, [running, long])
    failed = boxes[1].get(timeout=60)
    assert isinstance(failed.error, torch.OutOfMemoryError) and failed.oom_event is not None
    assert whole_text(boxes[0]) == alone[0]  # the stream never noticed
    assert idle(batcher) and batcher.chunks is None
    assert answers_in_one_turn(engine, [long]) == alone[1:]


def test_a_fault_in_a_chunk_fails_every_request_in_flight_and_the_next_are_served(engine, monkeypatch):
    running, long = greedy("Hello world", 40), greedy(LONG_PROMPT, 8)
    alone = [engine.generate(r)["text"] for r in (running, long)]
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)

    def fault_at_the_second_chunk(shape):
        if shape == (1, CHUNK) and forwards.count(shape) == 2:
            raise RuntimeError("a kernel failed")

    forwards = recorded_forwards(engine.generation.engine, monkeypatch, fault_at_the_second_chunk)
    _, boxes = submitted_in_one_turn(engine, [running, long])
    assert [type(last_event(box).error) for box in boxes] == [RuntimeError, RuntimeError]
    assert idle(engine.generation.engine) and forwards.count((1, CHUNK)) == 2  # nothing more of the failed prompt
    assert answers_in_one_turn(engine, [running, long]) == alone


def test_long_and_short_prompts_arriving_at_every_point_of_a_batchs_life_answer_as_they_would_alone(
    engine, context_model_dir, monkeypatch
):
    longer = LONG_PROMPT + ", " + LONG_PROMPT  # seven chunks
    phases = [  # (forward number, prompt, max_new_tokens); each phase runs until the batch is idle
        [(0, "Hello world", 30), (20, "hi", 40), *[(40, MEDIUM_PROMPT, 5)] * 4],  # four choices of a long prompt
        [
            (0, "Hello world", 40),
            (3, LONG_PROMPT, 8),  # chunked while the first decodes
            (4, "hi", 6),  # waits behind it
            (5, MEDIUM_PROMPT, 20),
            (12, "one two three", 3),
            (13, longer, 10),  # rows of the batch leave while it is chunked: its row moves down to join
            (40, "What is the capital of France?", 30),
            (41, "The capital", 30),
            (42, "hi there", 30),
            (43, LONG_PROMPT, 12),
            (43, LONG_PROMPT, 12),
        ],
        [(0, "yes", 2), (0, longer, 4)],  # the batch's only row ends while the long one is chunked
    ]
    requests = [[(number, greedy(prompt, tokens)) for number, prompt, tokens in phase] for phase in phases]
    alone = [[engine.generate(request)["text"] for _, request in phase] for phase in requests]
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    fresh = engine_of(context_model_dir)
    try:  # its cache starts empty, to grow around the chunks
        for schedule, expected in zip(requests, alone):
            assert [whole_text(box) for box in submitted_during_forwards(fresh, monkeypatch, schedule)] == expected
            assert idle(fresh.generation.engine) and bool((fresh.generation.engine.cache.positions == -1).all())
    finally:
        fresh.close()


@pytest.mark.parametrize(
    ("prompt", "column", "where"),
    [
        (MEDIUM_PROMPT, 30, "it ends past the batch's next column"),  # 21 tokens, after 30 columns
        (LONG_PROMPT, 10, "it starts before the batch's first column"),  # 52 tokens, after 10
    ],
)
def test_a_long_prompts_chunks_are_kept_when_the_cache_reclaims_columns_and_grows_rows_as_its_choices_join(
    engine, monkeypatch, prompt, column, where
):
    """The batcher's steps driven one by one (as batch/check.py does), to reach the layout's rarest cases; the
    logits compared with the model's own forward over the same ids."""
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", CHUNK)
    model, layout = engine.generation.engine.model, engine.generation.engine.layout
    batcher = batcher_module.Batcher(model, 8, set(), layout, start=False)

    def sequence(text: str) -> Sequence:
        ids = engine.prepare(greedy(text, 1)).ids
        return Sequence(ids, 64, GREEDY, TextStream(engine.generation.detokenizer, ids), lambda event: None)

    def own(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids])).logits[0, -1]

    # float32 both ways, but summed in another order: the batch's matrices have other shapes (other kernels and
    # blockings) and its masked columns join the softmax. A few ulps per layer, up to 1.5e-5 seen with torch 2.8's
    # CPU kernels; a cache layout fault (a wrong column, a row's keys in another's) moves them by 1e-2 and more.
    def assert_same(batched: torch.Tensor, alone: torch.Tensor) -> None:
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)

    first, second = sequence("Hello world"), sequence("hi")
    batcher.prefill([first])
    for _ in range(3):
        batcher.decode()
    batcher.prefill([second])
    while batcher.column < column:
        batcher.decode()
    first.cancelled = True
    batcher.retire()  # the oldest row leaves: the columns before the other's first are free to reclaim
    choices = [sequence(prompt) for _ in range(4)]  # a request's four choices of one long prompt
    rows_before = batcher.cache.row_capacity
    chunks = batcher.start_chunks(choices, CHUNK)
    if where == "it ends past the batch's next column":
        assert chunks.start > batcher.starts[0] > 0 and chunks.end > batcher.column
    else:
        assert batcher.starts[0] > chunks.start == 0
    while batcher.chunks is not None:
        last_chunk = batcher.prefill_chunk()
        batcher.decode()
    assert batcher.cache.row_capacity > rows_before  # the rows grew as the choices joined
    assert_same(last_chunk[0], own(chunks.prompt))  # the last chunk's: the choices' first token
    for row, start in enumerate(batcher.starts):  # each row's tokens, in its columns from its first on
        held = batcher.cache.positions[row]
        assert bool((held[:start] == -1).all()) and held[start] == 0
    for row in range(1, 5):  # a chunked prompt's row has no gap: its first decode step went right after it
        assert batcher.cache.positions[row, batcher.starts[row] : batcher.column].tolist() == list(
            range(batcher.column - batcher.starts[row])
        )
    for _ in range(3):
        so_far = [s.prompt_ids + s.generated for s in batcher.active]
        assert_same(batcher.decode(), torch.stack([own(ids) for ids in so_far]))
