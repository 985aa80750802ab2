"""The compiled decode step (batch/compiled.py): for every family the batcher serves, either the compiled step
serves, answering exactly as `generate` and as the eager step do, alone and in batches of every size, without
compiling again once it is ready; or the family stays on the eager step and the log says why.

Each family is started by the real startup with COMPILE=before_ready, on tiny random models (fp32) of the
architectures tests/generation/test_architectures.py serves."""

import logging
import time

import pytest
import torch
from generation.test_architectures import (
    ARCHITECTURES,
    PROMPTS,
    assert_greedy_answers_equal_generate,
    greedy,
    jobs,
    saved_model,
)
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker_transformers.config import Settings
from worker_transformers.generation.batch.compiled import DecodeGraph
from worker_transformers.serving.handlers import make_handler
from worker_transformers.worker import setup, start_worker

# Families whose step stays eager, and the reason the log must give.
EAGER = {
    "qwen3_5_text": "recurrent layers",
    "qwen3_next": "recurrent layers",
    "lfm2": "recurrent layers",
    "nemotron_h": "recurrent layers",
    "zamba2": "recurrent layers",
    "mamba2": "recurrent layers",
    "falcon_mamba": "recurrent layers",
    "jamba": "recurrent layers",
    "mamba": "recurrent layers",
    "bloom": "2D mask",
}
# Families whose step torch's compiler takes as one graph only from a release on: before it, they keep the eager
# step, and the log says why (torch 2.8's compiler refuses to inline a function Gemma 4's code calls).
COMPILES_FROM = {"gemma4_text-shared-kv": (2, 13)}
TIME_STEPS = DecodeGraph._time_steps  # the real timing, which the fixture below replaces for the other tests
BATCHED = [name for name, (*_, engine) in ARCHITECTURES.items() if engine == "batch"]


def compiles_here(name: str) -> bool:
    return tuple(int(part) for part in torch.__version__.split(".")[:2]) >= COMPILES_FROM.get(name, (0, 0))


@pytest.fixture(autouse=True, scope="module")
def compiled_step_timed_faster():
    """On a CPU the compiled step is timed against the eager one once compiled (compiled.py), to serve only the
    batches it is faster at; these tests check behaviour, not timings: here it is faster at every batch size,
    except where a test says otherwise."""
    patch = pytest.MonkeyPatch()
    patch.setattr(DecodeGraph, "_time_steps", lambda graph, rows: (1.0, 2.0))
    yield
    patch.undo()


@pytest.fixture(scope="module", params=BATCHED)
def compiled(request, tmp_path_factory):
    """(name, engine, settings, tokenizer, reference model, log records) for one family, started with its decode
    step compiled before ready."""
    name = request.param
    folder = saved_model(name, tmp_path_factory)
    env = {
        "MODEL_NAME": str(folder),
        "MAX_CONCURRENCY": "4",
        "MAX_NEW_TOKENS": "64",
        "COMPILE": "before_ready",
        "COMPILE_CACHE_DIR": str(tmp_path_factory.mktemp("compiled")),
    }
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("worker_transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine = setup(Settings.from_env(env))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    yield name, engine, Settings.from_env(env), AutoTokenizer.from_pretrained(folder), reference, records
    engine.close()
    forget_compiled()


def forget_compiled() -> None:
    """A worker compiles one model's step; these tests compile many in one process, more graphs of the one
    function than the compiler keeps (its recompile limit) unless each family's are dropped after it."""
    torch._dynamo.reset()


def test_the_step_is_compiled_or_the_log_says_why_not(compiled):
    name, engine, *_, records = compiled
    graph = engine.generation.decode_graph
    messages = [record.getMessage() for record in records]
    if name in EAGER:
        assert graph is None
        assert any("decode step: eager" in m and EAGER[name] in m for m in messages), messages
    elif not compiles_here(name):
        assert graph is not None and not graph.ready and graph.failed
        assert any("compiled decode step unavailable, the eager step serves on" in m for m in messages)
    else:
        assert graph is not None and graph.ready, graph and graph.failed
        assert any("compiled decode step in service" in m for m in messages)
        assert graph.artifacts.is_file()  # kept for the next worker


def test_compiled_answers_equal_generate_alone_and_together_with_no_compile_once_ready(compiled, monkeypatch):
    name, engine, settings, tokenizer, reference, _ = compiled
    graph = engine.generation.decode_graph
    if graph is None or not compiles_here(name):
        pytest.skip(f"{name} keeps the eager step")
    steps = []
    run = graph.run
    monkeypatch.setattr(graph, "run", lambda *a, **k: steps.append(a[4]) or run(*a, **k))
    graphs_before = counters["stats"]["unique_graphs"]
    handler = make_handler(engine, settings)
    assert_greedy_answers_equal_generate(handler, tokenizer, reference)
    inputs = [greedy(p) for p in PROMPTS] + [{**greedy(p), "stream": True, "max_new_tokens": 24} for p in PROMPTS[:1]]
    one_by_one = [jobs(handler, [job_input])[0] for job_input in inputs]
    assert jobs(handler, inputs) == one_by_one
    assert graph.ready  # no step fell back to eager
    assert {1, 4} <= set(steps)  # the compiled step ran alone and for a batch of four
    assert counters["stats"]["unique_graphs"] == graphs_before  # and never compiled again


def test_a_step_that_would_compile_again_goes_back_to_eager_and_keeps_answering(compiled, monkeypatch, caplog):
    name, engine, settings, tokenizer, reference, _ = compiled
    graph = engine.generation.decode_graph
    if graph is None or not compiles_here(name):
        pytest.skip(f"{name} keeps the eager step")
    handler = make_handler(engine, settings)
    [[expected]] = jobs(handler, [greedy(PROMPTS[0])])
    # A step with inputs of another dtype than the warm-up's would need a graph of its own.
    run = graph.run
    monkeypatch.setattr(graph, "run", lambda ids, *a, **k: run(ids.to(torch.int32), *a, **k))
    with caplog.at_level(logging.ERROR):
        [[answer]] = jobs(handler, [greedy(PROMPTS[0])])
    assert answer == expected
    assert not graph.ready
    assert "the eager step serves from now on" in caplog.text
    graph.ready = True  # for the tests after this one


def test_a_damaged_compile_cache_file_is_compiled_afresh(tmp_path, caplog):
    """A file that is not saved compiled code (damaged, or from another torch) costs a compile, nothing more."""
    from worker_transformers.generation.batch.layout import probe

    model = AutoModelForCausalLM.from_config(
        ARCHITECTURES["llama"][0](vocab_size=64, **ARCHITECTURES["llama"][1])
    ).eval()
    damaged = tmp_path / "decode.bin"
    damaged.write_bytes(b"not compiled code")
    graph = DecodeGraph(model, probe(model), damaged, max_rows=4)
    with caplog.at_level(logging.WARNING):
        assert graph.compile(), graph.failed
    forget_compiled()
    assert "COMPILE_CACHE_DIR" in caplog.text and "compiling afresh" in caplog.text
    assert damaged.read_bytes() != b"not compiled code"  # replaced by what was compiled


# How startup runs the compile (COMPILE): the real start_worker on the conftest's tiny Llama.


def answer(started, job_input: dict) -> dict:
    [[output]] = jobs(started.handler, [job_input])
    return output


def wait_for(caplog, text: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in caplog.text:
        assert time.monotonic() < deadline, f"no {text!r} in the log after {timeout_s} s"
        time.sleep(0.2)


def timeline_phases(log_text: str) -> dict[str, str]:
    timeline = log_text[log_text.index("startup timeline") :].splitlines()[2:]
    return {line.split()[0]: line for line in timeline if line.startswith("  ")}


def test_background_compile_serves_at_once_then_takes_over_and_a_second_worker_starts_from_what_it_saved(
    tiny_model_dir, tmp_path, caplog
):
    env = {"MODEL_NAME": str(tiny_model_dir), "COMPILE": "background", "COMPILE_CACHE_DIR": str(tmp_path)}
    job = greedy("The capital of", max_new_tokens=12)
    with caplog.at_level(logging.INFO):
        started = start_worker(env)
        try:
            assert "(still running)" in timeline_phases(caplog.text)["compile"]  # ready before the compile ends
            eager = answer(started, job)  # served at once, whatever the compile's progress
            wait_for(caplog, "compiled decode step in service")
            assert "nothing saved to start from" in caplog.text
            assert answer(started, job) == eager
        finally:
            started.close()
        assert [path.suffix for path in tmp_path.iterdir()] == [".bin"]
        caplog.clear()
        second = start_worker(env)
        try:
            wait_for(caplog, "compiled decode step in service")
            assert "with the compiled code an earlier worker saved" in caplog.text
            assert answer(second, job) == eager
        finally:
            second.close()
    forget_compiled()


def test_compile_off_serves_the_eager_step_and_compiles_nothing(tiny_model_dir, tmp_path, caplog):
    env = {"MODEL_NAME": str(tiny_model_dir), "COMPILE": "off", "COMPILE_CACHE_DIR": str(tmp_path)}
    with caplog.at_level(logging.INFO):
        started = start_worker(env)
    try:
        assert "compile" not in timeline_phases(caplog.text)
        assert answer(started, greedy("The capital of"))["usage"]["completion_tokens"] > 0
    finally:
        started.close()
    assert "compiled decode step" not in caplog.text and not list(tmp_path.iterdir())


def test_before_ready_goes_ready_on_the_eager_step_when_the_compile_would_overrun_the_init_timeout(
    tiny_model_dir, tmp_path, caplog
):
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "COMPILE": "before_ready",
        "COMPILE_CACHE_DIR": str(tmp_path),
        "RUNPOD_INIT_TIMEOUT": "5",  # less than the compile's share of it leaves: ready at once, on the eager step
    }
    with caplog.at_level(logging.INFO):
        started = start_worker(env)
        try:
            assert "compile" in timeline_phases(caplog.text)
            assert "the decode step is still compiling" in caplog.text
            assert answer(started, greedy("The capital of"))["usage"]["completion_tokens"] > 0
            wait_for(caplog, "compiled decode step in service")  # and it takes over once built
        finally:
            started.close()
    forget_compiled()


def test_batches_wider_than_the_compiled_step_is_faster_at_run_the_eager_step(tiny_model_dir, tmp_path, monkeypatch):
    """Timings that say the compiled step is faster at 1 and 2 rows and slower at 4: it serves batches of up to 2,
    and the eager step the batches of 3 and 4, with the same answers."""
    timed = {1: (1.0, 2.0), 2: (1.0, 2.0), 4: (3.0, 2.0)}
    monkeypatch.setattr(DecodeGraph, "_time_steps", lambda graph, rows: timed[rows])
    env = {"MODEL_NAME": str(tiny_model_dir), "MAX_CONCURRENCY": "4", "COMPILE": "before_ready"}
    env["COMPILE_CACHE_DIR"] = str(tmp_path)
    engine = setup(Settings.from_env(env))
    try:
        graph = engine.generation.decode_graph
        assert graph.ready and graph.most_rows == 2
        widths = []
        run = graph.run
        monkeypatch.setattr(graph, "run", lambda *a, **k: widths.append(a[4]) or run(*a, **k))
        handler = make_handler(engine, Settings.from_env(env))
        inputs = [greedy(p) for p in (*PROMPTS, "A fourth prompt")]
        one_by_one = [jobs(handler, [job_input])[0] for job_input in inputs]
        assert jobs(handler, inputs) == one_by_one
        assert engine.generation.engine.peak_batch == 4 and set(widths) <= {1, 2} and 1 in widths
    finally:
        engine.close()
        forget_compiled()


def test_the_steps_are_timed_on_a_scratch_cache_without_touching_the_batch(tiny_model_dir):
    """The real timing (compiled.py's `_time_steps`): two durations, from a scratch cache of its own."""
    from worker_transformers.generation.batch.layout import probe

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    graph = DecodeGraph(model, probe(model), None, max_rows=4)
    with torch.inference_mode():
        assert graph.compile(), graph.failed
        compiled, eager = TIME_STEPS(graph, 4)
    forget_compiled()
    assert compiled > 0 and eager > 0
