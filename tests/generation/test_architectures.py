"""Every kind of generative model starts and answers exactly as transformers' own `generate` would.

Tiny random models of several architectures, saved as real model folders and started through the worker's real
startup: plain attention (Llama), sliding-window attention with a SentencePiece-style tokenizer (Mistral), sliding
and full layers together (Gemma 3), a mixture of experts (Qwen3-MoE), a hybrid of attention and state-space layers
(Jamba) and a recurrent model (Mamba). For each: greedy answers equal `generate`, concurrent jobs equal serial
ones, and streamed text equals the whole text and the tokenizer's decoding of the prompt's and answer's ids.
Llama also runs with each other engine forced (ENGINE=serial, ENGINE=continuous), and the sliding-window Mistral
with ENGINE=continuous, so the behaviour is checked for every engine: the same suite, with stop strings and
cancellation too.
"""

import asyncio
from pathlib import Path

import pytest
import torch
import transformers
from tiny_tokenizers import byte_level_tokenizer, metaspace_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker_transformers.config import Settings
from worker_transformers.generation.batch import batcher as batcher_module
from worker_transformers.serving.handlers import make_handler
from worker_transformers.worker import setup

PROMPTS = ["The capital of", "He lived in a small house", "Stop here, then go on: one, two, three, four"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
LINEAR_ATTENTION = dict(
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
)
EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
ARCHITECTURES = {
    # name: (config class, its arguments, tokenizer, the engine that must serve it)
    "llama": (transformers.LlamaConfig, SMALL, byte_level_tokenizer, "batch"),
    # the same model forced onto the other engine: the behaviour must not depend on which serves it
    "llama-serial": (transformers.LlamaConfig, SMALL, byte_level_tokenizer, "serial"),
    "llama-continuous": (transformers.LlamaConfig, SMALL, byte_level_tokenizer, "continuous"),
    "mistral-sliding": (transformers.MistralConfig, {**SMALL, "sliding_window": 4}, metaspace_tokenizer, "batch"),
    "mistral-sliding-continuous": (
        transformers.MistralConfig,
        {**SMALL, "sliding_window": 4},
        metaspace_tokenizer,
        "continuous",
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        {**SMALL, "head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention"] * 2 + ["full_attention"]},
        metaspace_tokenizer,
        "batch",
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        byte_level_tokenizer,
        "batch",
    ),
    "qwen3_5_text": (
        transformers.Qwen3_5TextConfig,
        {**SMALL, "num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"], **LINEAR_ATTENTION},
        byte_level_tokenizer,
        "batch",
    ),
    "qwen3_next": (
        transformers.Qwen3NextConfig,
        {
            **SMALL,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            **LINEAR_ATTENTION,
            **EXPERTS,
            "shared_expert_intermediate_size": 16,
        },
        byte_level_tokenizer,
        "batch",
    ),
    "lfm2": (  # convolution layers
        transformers.Lfm2Config,
        {**SMALL, "layer_types": ["conv", "full_attention", "conv"]},
        metaspace_tokenizer,
        "batch",
    ),
    "nemotron_h": (  # Mamba 2, experts, attention and MLP layers; the last two keep nothing in the cache
        transformers.NemotronHConfig,
        {
            **SMALL,
            "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp"],
            "head_dim": 16,
            "ssm_state_size": 8,
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "n_groups": 1,
            "chunk_size": 16,
            "n_routed_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 16,
            "moe_shared_expert_intermediate_size": 16,
        },
        byte_level_tokenizer,
        "batch",
    ),
    "zamba2": (  # layers that keep attention and Mamba 2 state both
        transformers.Zamba2Config,
        {
            **SMALL,
            "num_hidden_layers": 2,
            "layers_block_type": ["linear_attention", "hybrid"],
            "num_key_value_heads": 2,
            "attention_head_dim": 16,
            "mamba_d_state": 8,
            "n_mamba_heads": 2,
            "mamba_headdim": 32,
            "chunk_size": 16,
        },
        byte_level_tokenizer,
        "batch",
    ),
    "mamba2": (
        transformers.Mamba2Config,
        {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "num_heads": 4, "head_dim": 16, "n_groups": 1},
        byte_level_tokenizer,
        "batch",
    ),
    "gemma4_text-shared-kv": (  # its last two layers reuse the keys and values of the layers before them
        transformers.Gemma4TextConfig,
        {
            **SMALL,
            "num_hidden_layers": 4,
            "head_dim": 16,
            "global_head_dim": 16,
            "sliding_window": 4,
            "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        },
        metaspace_tokenizer,
        "batch",
    ),
    "llama4_text-chunked": (  # attention within chunks of 8 positions: the test prompts cross several
        transformers.Llama4TextConfig,
        {
            **SMALL,
            "num_hidden_layers": 2,
            "head_dim": 16,
            "attention_chunk_size": 8,
            "num_local_experts": 2,
            "intermediate_size_mlp": 64,
        },
        byte_level_tokenizer,
        "batch",
    ),
    "bloom": (  # ALiBi, from a 2D mask
        transformers.BloomConfig,
        {"hidden_size": 32, "n_layer": 2, "n_head": 2},
        byte_level_tokenizer,
        "batch",
    ),
    "rwkv": (  # its one-token step mixes a batch's rows in transformers' own code: served one at a time
        transformers.RwkvConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "attention_hidden_size": 32, "intermediate_size": 64},
        metaspace_tokenizer,
        "serial",
    ),
    "falcon_mamba": (  # its scan cannot go on from a state over several tokens: long prompts prefilled whole
        transformers.FalconMambaConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4, "expand": 2, "conv_kernel": 4},
        byte_level_tokenizer,
        "batch",
    ),
    "jamba": (
        transformers.JambaConfig,
        {
            **SMALL,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "num_experts": 2,
            "mamba_d_state": 4,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
        },
        byte_level_tokenizer,
        "batch",
    ),
    "mamba": (
        transformers.MambaConfig,
        {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 4, "expand": 2, "conv_kernel": 4},
        metaspace_tokenizer,
        "batch",
    ),
}


# Families that run the suite's core (the engine, greedy answers, long prompts in chunks, concurrency, joining,
# cancellation) but not the request features every engine serves the same way whatever the model (grammars,
# log-probabilities, penalties, sampling, stop strings, shared prefixes): the full suite runs on a family of each
# layer kind, and the CPU's reference recurrent kernels make every test of these cost seconds.
CORE_ONLY = {"qwen3_next", "lfm2", "nemotron_h", "zamba2", "falcon_mamba", "rwkv", "jamba", "mamba"}


def saved_model(name: str, tmp_path_factory) -> Path:
    """A folder holding a tiny random model (float32, seeded) of the architecture ARCHITECTURES names, and its
    tokenizer with a ChatML template, as save_pretrained writes them."""
    config_class, arguments, make_tokenizer, _ = ARCHITECTURES[name]
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHATML
    special = {k: tokenizer.convert_tokens_to_ids(v) for k, v in (("bos", "<s>"), ("eos", tokenizer.eos_token))}
    config = config_class(
        vocab_size=len(tokenizer),
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=tokenizer.pad_token_id,
        **arguments,
    )
    if hasattr(config, "vocab_size_per_layer_input"):  # Gemma 4's per-layer embeddings share the vocabulary
        config.vocab_size_per_layer_input = config.vocab_size
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def served(request, tmp_path_factory):
    """(name, engine, settings, tokenizer, reference model) for one architecture, started by the real startup."""
    name = request.param
    folder = saved_model(name, tmp_path_factory)
    env = {"MODEL_NAME": str(folder), "MAX_CONCURRENCY": "4", "MAX_NEW_TOKENS": "64"}
    forced = name.rpartition("-")[2]
    if forced in ("serial", "continuous"):
        env["ENGINE"] = forced
    settings = Settings.from_env(env)
    engine = setup(settings)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    yield name, engine, settings, AutoTokenizer.from_pretrained(folder), reference
    engine.close()


@pytest.fixture
def served_fully(served):
    """`served`, for the families that run the whole suite (CORE_ONLY's run its core)."""
    if served[0] in CORE_ONLY:
        pytest.skip("the suite's core only for this family")
    return served


def jobs(handler, inputs):
    async def one(job_input):
        return [item async for item in handler({"id": "t", "input": job_input})]

    async def together():
        return await asyncio.gather(*(one(job_input) for job_input in inputs))

    return asyncio.run(together())


def greedy(prompt: str, **extra) -> dict:
    return {"prompt": prompt, "temperature": 0, "max_new_tokens": 16, **extra}


# The ways around a model's code that the batcher's startup check must find (batch/check.py), and none elsewhere.
WORKAROUNDS = {
    "bloom": {"held_mask": True},  # its ALiBi bias is built from a 2D mask
    "zamba2": {"held_mask": True},  # its hybrid layers read the masks of kinds its config does not name
    "falcon_mamba": {"chunked_prefill": False},  # its scan takes no initial state
}
LAYOUT_CHOICES = ("held_mask", "padded_prefill", "chunked_prefill")


def test_the_expected_engine_serves_it(served):
    name, engine, *_ = served
    assert engine.generation.engine_kind == ARCHITECTURES[name][3]
    assert engine.generation.concurrency == (1 if engine.generation.engine_kind == "serial" else 4)
    if engine.generation.engine_kind == "batch":
        layout = engine.generation.engine.layout
        expected = {"held_mask": False, "padded_prefill": True, "chunked_prefill": True, **WORKAROUNDS.get(name, {})}
        assert {choice: getattr(layout, choice) for choice in LAYOUT_CHOICES} == expected


def generated_by_generate(reference, tokenizer, ids: list[int], max_new_tokens: int = 16) -> list[int]:
    """The reference model's own greedy answer to `ids`, end-of-sequence included when it ends so."""
    out = reference.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=reference.config.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )[0].tolist()
    return out[len(ids) :]


def test_greedy_answers_equal_generate_and_the_decoding_of_all_ids(served):
    _, engine, settings, tokenizer, reference = served
    assert_greedy_answers_equal_generate(make_handler(engine, settings), tokenizer, reference)


def assert_greedy_answers_equal_generate(handler, tokenizer, reference) -> None:
    """Each of PROMPTS answered greedily, alone, as the reference model's `generate` answers it, and as the
    tokenizer's own decoding of the prompt's and answer's ids."""
    for prompt in PROMPTS:
        [[answer]] = jobs(handler, [greedy(prompt)])
        ids = tokenizer(prompt)["input_ids"]
        out = generated_by_generate(reference, tokenizer, ids)
        generated = [t for t in out if t != reference.config.eos_token_id]
        assert answer["usage"]["completion_tokens"] == len(out)
        # prompt + answer is the tokenizer's own decoding of every id: no space lost at the seam
        assert prompt + answer["text"] == tokenizer.decode(ids + generated, skip_special_tokens=True)


# Longer than PREFILL_TOKENS (set to 16 below): 41 to 52 tokens here, three or four chunks, and many times the
# sliding windows (4 tokens), which reach across each chunk's first tokens into the chunk before.
LONG_PROMPT = " ".join(PROMPTS) + ". " + " ".join(PROMPTS)


def test_a_prompt_longer_than_prefill_tokens_answers_as_generate_prefilled_in_chunks_beside_a_running_stream(
    served, monkeypatch
):
    _, engine, settings, tokenizer, reference = served
    handler = make_handler(engine, settings)
    beside = {**greedy(PROMPTS[1]), "max_new_tokens": 32, "stream": True}
    [running_alone] = jobs(handler, [beside])
    monkeypatch.setattr(batcher_module, "PREFILL_TOKENS", 16)
    widths = []
    if engine.generation.engine_kind == "batch":
        model = engine.generation.engine.model
        forward = model.forward

        def recording(*args, input_ids, **kwargs):
            widths.append(input_ids.shape[1])
            return forward(*args, input_ids=input_ids, **kwargs)

        monkeypatch.setattr(model, "forward", recording)
    running, streamed = jobs(handler, [beside, {**greedy(LONG_PROMPT), "stream": True}])
    ids = tokenizer(LONG_PROMPT)["input_ids"]
    assert len(ids) > 2 * 16
    generated = [t for t in generated_by_generate(reference, tokenizer, ids) if t != reference.config.eos_token_id]
    text = "".join(chunk["text"] for chunk in streamed)
    assert LONG_PROMPT + text == tokenizer.decode(ids + generated, skip_special_tokens=True)
    assert running == running_alone  # the stream beside it answers as it does alone
    if engine.generation.engine_kind == "batch" and engine.generation.engine.layout.chunked_prefill:
        assert max(widths) <= 16 and sum(w for w in widths if w > 1) >= len(ids)  # it really went in chunks


def test_concurrent_jobs_equal_serial_ones_and_streams_equal_whole_answers(served):
    _, engine, settings, *_ = served
    handler = make_handler(engine, settings)
    inputs = [greedy(p) for p in PROMPTS] + [{**greedy(p), "stream": True} for p in PROMPTS]
    inputs.append({"messages": [{"role": "user", "content": "The capital of France?"}], "temperature": 0})
    one_by_one = [jobs(handler, [job_input])[0] for job_input in inputs]
    together = jobs(handler, inputs)
    assert together == one_by_one
    generation = engine.generation
    assert generation.engine.peak_batch == (1 if generation.engine_kind == "serial" else 4)  # they really ran together
    whole, streamed = together[: len(PROMPTS)], together[len(PROMPTS) : 2 * len(PROMPTS)]
    for [answer], chunks in zip(whole, streamed):
        assert "".join(chunk["text"] for chunk in chunks) == answer["text"]
        assert chunks[-1]["finish_reason"] == answer["finish_reason"]


def test_chats_with_one_system_prompt_joining_together_answer_as_generate_would(served_fully):
    """Their shared start is computed once and copied (batcher.py); past a sliding window too."""
    import queue

    from worker_transformers.generation.events import Done
    from worker_transformers.serving.schema import parse_request

    _, engine, _, tokenizer, reference = served_fully
    system = {"role": "system", "content": "You are a careful assistant: answer in a few plain words."}
    requests = [
        parse_request(
            {"messages": [system, {"role": "user", "content": p}], "temperature": 0, "max_new_tokens": 12}, 64
        )
        for p in PROMPTS
    ]
    alone = [engine.generate(request)["text"] for request in requests]
    boxes = [queue.Queue() for _ in requests]
    prepared = [engine.prepare(r) for r in requests]
    with engine.generation.engine.one_turn():  # all of them queued before the engine takes any: one turn's prefill
        sequences = [engine.submit(r, ready, box.put) for r, ready, box in zip(requests, prepared, boxes)]
    for ready, box, sequence, text in zip(prepared, boxes, sequences, alone):
        events = [box.get()]
        while not isinstance(events[-1], Done):
            events.append(box.get())
        assert "".join(event.text for event in events) == text
        eos = reference.config.eos_token_id
        own = generated_by_generate(reference, tokenizer, ready.ids, 12)
        assert [t for t in sequence.generated if t != eos] == [t for t in own if t != eos]


def test_a_seeded_sampled_job_gives_the_same_text_alone_and_in_a_batch(served_fully):
    _, engine, settings, *_ = served_fully
    handler = make_handler(engine, settings)
    seeded = {"prompt": PROMPTS[0], "temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_new_tokens": 16}
    [alone] = jobs(handler, [seeded])
    crowd = jobs(handler, [greedy(PROMPTS[1]), {**seeded, "seed": 99}, seeded, greedy(PROMPTS[2])])
    assert crowd[2] == alone


def test_a_stop_string_ends_the_text_before_it(served_fully):
    _, engine, settings, *_ = served_fully
    handler = make_handler(engine, settings)
    # A random model also emits bytes that are no character: take the stop string from an answer's clean start.
    answers = {prompt: jobs(handler, [greedy(prompt)])[0][0]["text"] for prompt in PROMPTS}
    prompt, text, clean = max(
        ((prompt, text, run) for prompt, text in answers.items() for run in text.split("\ufffd")),
        key=lambda answer: len(answer[2]),
    )
    stop = clean[len(clean) // 2 :][:2]
    assert len(stop) == 2, answers
    [[cut], streamed] = jobs(handler, [greedy(prompt, stop=[stop]), greedy(prompt, stop=[stop], stream=True)])
    assert (cut["text"], cut["finish_reason"]) == (text[: text.find(stop)], "stop")
    assert "".join(chunk["text"] for chunk in streamed) == cut["text"]


def test_a_prompt_joining_a_running_batch_answers_as_it_does_alone(served):
    import queue

    from worker_transformers.generation.events import Done
    from worker_transformers.serving.schema import parse_request

    _, engine, *_ = served
    running, joining = (
        parse_request({"prompt": prompt, "temperature": 0, "max_new_tokens": 48}, 64) for prompt in PROMPTS[1:]
    )
    alone = [engine.generate(request)["text"] for request in (running, joining)]
    kind = engine.generation.engine_kind
    if kind == "batch":
        engine.generation.engine.peak_batch = 0
    boxes = queue.Queue(), queue.Queue()
    joined = []
    ready = engine.prepare(joining)

    def on_running(event) -> None:
        boxes[0].put(event)
        if not joined:  # its first event, on the engine's thread: the running request has started decoding
            joined.append(isinstance(event, Done))
            engine.submit(joining, ready, boxes[1].put)

    engine.submit(running, engine.prepare(running), on_running)
    texts = []
    for box in boxes:
        events = [box.get()]
        while not isinstance(events[-1], Done):
            events.append(box.get())
        texts.append("".join(event.text for event in events))
    assert joined == [False]  # it joined while the other ran
    assert texts == alone
    if kind != "continuous":  # transformers' manager says nothing of how many it ran together
        assert engine.generation.engine.peak_batch == (1 if kind == "serial" else 2)


def test_a_job_abandoned_mid_stream_leaves_the_engine_and_its_row_serves_the_next_as_if_new(served):
    _, engine, settings, *_ = served
    handler = make_handler(engine, settings)
    [[alone]] = jobs(handler, [greedy(PROMPTS[2])])

    async def abandon():
        stream = handler({"id": "long", "input": {**greedy(PROMPTS[0]), "max_new_tokens": 64, "stream": True}})
        await stream.__anext__()
        await stream.aclose()  # what happens to a generator abandoned mid-stream
        for _ in range(500):
            if engine.generation.engine.in_flight() == 0:
                break
            await asyncio.sleep(0.01)
        return engine.generation.engine.in_flight()

    assert asyncio.run(abandon()) == 0
    if engine.generation.engine_kind == "batch":  # its row is free: nothing of it is left in the cache
        batcher = engine.generation.engine
        assert not batcher.active and bool((batcher.cache.positions == -1).all())
    [[after]] = jobs(handler, [greedy(PROMPTS[2])])
    assert after == alone  # the row's keys, values and recurrent states are the new job's own


# Bounded schemas: a random model's JSON under them ends within a few tokens, so the answers are whole.
FLAG = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green"]}},
    "required": ["color"],
    "additionalProperties": False,
}


def as_json(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def test_requests_with_different_schemas_in_one_batch_each_get_json_valid_for_their_own(served_fully):
    import json

    import jsonschema

    _, engine, settings, *_ = served_fully
    handler = make_handler(engine, settings)
    inputs = [
        {**greedy(PROMPTS[0]), "max_new_tokens": 32, "response_format": as_json(FLAG)},
        {**greedy(PROMPTS[1]), "max_new_tokens": 32, "response_format": as_json(COLOR), "stream": True},
        {"prompt": PROMPTS[2], "max_new_tokens": 32, "temperature": 1.0, "seed": 7, "response_format": as_json(FLAG)},
        greedy(PROMPTS[2]),  # free text beside them
    ]
    together = jobs(handler, inputs)
    assert together == [jobs(handler, [job_input])[0] for job_input in inputs]
    for job_input, chunks in zip(inputs[:3], together):
        text = "".join(chunk["text"] for chunk in chunks)
        assert chunks[-1]["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), job_input["response_format"]["json_schema"]["schema"])


def reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """The model's own log-probabilities of each next token, from one forward pass over all of `ids`."""
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_logprobs_are_the_models_own_for_the_tokens_returned(served_fully):
    _, engine, settings, tokenizer, reference = served_fully
    handler = make_handler(engine, settings)
    ids = tokenizer(PROMPTS[1])["input_ids"]
    sampled = {"prompt": PROMPTS[1], "temperature": 1.0, "seed": 3, "max_new_tokens": 8, "logprobs": True}
    [[answer]] = jobs(handler, [{**sampled, "top_logprobs": 3}])
    [[alone]] = jobs(handler, [{**sampled, "top_logprobs": 3}])
    assert answer == alone  # seeded: the same draw every time
    entries = answer["logprobs"]
    assert len(entries) == answer["usage"]["completion_tokens"] - (answer["finish_reason"] == "stop")
    generated = [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(e["token"])) for e in entries]
    generated = [tokens[0] if len(tokens) == 1 else None for tokens in generated]
    logprobs = reference_logprobs(reference, ids + [t for t in generated if t is not None])
    for position, (entry, token) in enumerate(zip(entries, generated)):
        if token is None:  # a token whose text does not tokenize back to itself alone: not comparable this way
            break
        expected = logprobs[len(ids) - 1 + position]
        assert entry["logprob"] == pytest.approx(expected[token].item(), abs=1e-3)
        top = [item["logprob"] for item in entry["top_logprobs"]]
        assert top == pytest.approx(expected.topk(3).values.tolist(), abs=1e-3)
        assert top == sorted(top, reverse=True) and entry["logprob"] <= top[0] + 1e-6


def test_penalties_and_logit_bias_choose_what_a_reference_loop_chooses(served_fully):
    _, engine, settings, tokenizer, reference = served_fully
    handler = make_handler(engine, settings)
    prompt_ids = tokenizer(PROMPTS[2])["input_ids"]
    favoured = tokenizer("two", add_special_tokens=False)["input_ids"][0]
    penalties = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "logit_bias": {str(favoured): 3.0}}
    [[answer]] = jobs(handler, [greedy(PROMPTS[2], **penalties)])
    ids, counts = list(prompt_ids), torch.zeros(reference.config.get_text_config().vocab_size)
    eos = reference.config.eos_token_id
    for _ in range(16):
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1].float()
        logits[favoured] += 3.0
        token = int((logits - 1.5 * counts - 0.5 * (counts > 0)).argmax())
        ids.append(token)
        if token == eos:
            break
        counts[token] += 1
    generated = [t for t in ids[len(prompt_ids) :] if t != eos]
    assert PROMPTS[2] + answer["text"] == tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
