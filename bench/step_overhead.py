"""The host's time per decode step outside the model's forward, at batch 32, on a tiny model.

    python bench/step_overhead.py [--batch 32] [--steps 40]

On a GPU the forward of a decode step is a few milliseconds; whatever the host does around it (building inputs,
sampling, syncing, detokenizing) adds to every step unless it is small. A tiny model (2 layers, hidden 64, the
default model's 49,152-token vocabulary) makes the forward cost next to nothing on a CPU, so what is left is that
overhead. Measured for the batcher, greedy and sampled (temperature 0.8, top-p 0.95), and, side by side, for the
batcher this project had before (commit BASELINE, read with git), where git can show it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

BASELINE = "775294f"  # the last commit with the per-sequence sampler and the concatenating cache
BASELINE_FILES = ("batcher.py", "sampling.py", "textstream.py", "schema.py")


def tiny_model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().eval()


def tokenizer():
    from transformers import AutoTokenizer

    from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir
    from worker_transformers.model import hf_cache

    snapshot = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if snapshot is None:
        raise SystemExit(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    return AutoTokenizer.from_pretrained(snapshot)


class StepTimer:
    """Wraps a batcher's decode step and its model's forward: step and forward seconds, per step of a full batch
    (`rows()` counts the batch's rows)."""

    def __init__(self, batcher, step_name: str, batch: int, tokenizer, rows) -> None:
        self.batch, self.tokenizer = batch, tokenizer
        self.steps: list[float] = []
        self.forwards: list[float] = []
        self._in_step = False
        model, forward = batcher.model, batcher.model.forward
        step = getattr(batcher, step_name)

        def timed_forward(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                if self._in_step:
                    self.forwards.append(time.perf_counter() - start)

        def timed_step(*args, **kwargs):
            full = rows() == batch
            self._in_step = full
            start = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self._in_step = False
                if full:
                    self.steps.append(time.perf_counter() - start)

        model.forward = timed_forward
        setattr(batcher, step_name, timed_step)

    def result(self) -> dict:
        host = [s - f for s, f in zip(self.steps, self.forwards)]
        return {"host_ms": statistics.median(host) * 1e3, "forward_ms": statistics.median(self.forwards) * 1e3}


def run_batch(batcher, timer: StepTimer, sequence_for, queue_all) -> dict:
    """Queue `batch` requests at once with `queue_all(batcher, sequences)`, so they join in one prefill
    (`sequence_for(i, ids, emit)` makes each, in the batcher's own types), wait until all are done, and close the
    batcher."""
    from worker_transformers.generation.engine import release_openmp_team

    release_openmp_team()  # as a real submit does: this thread's idle team would slow the batcher's (engine.py)
    done = threading.Semaphore(0)

    def emit(event) -> None:
        if type(event).__name__ in ("Done", "Failed"):
            done.release()

    ids_list = prompts(timer.tokenizer, timer.batch)
    try:
        queue_all(batcher, [sequence_for(i, ids, emit) for i, ids in enumerate(ids_list)])
        for _ in ids_list:
            done.acquire()
        return timer.result()
    finally:
        batcher.close()


def prompts(tok, batch: int) -> list[list[int]]:
    words = "the capital of France is Paris and the sea is blue".split()
    return [tok(" ".join(words[: 3 + i % 8]))["input_ids"] for i in range(batch)]


def measure_current(model, tok, batch: int, steps: int, sampled: bool) -> dict:
    from worker_transformers.generation.batch.batcher import Batcher
    from worker_transformers.generation.batch.layout import probe
    from worker_transformers.generation.events import Sequence
    from worker_transformers.generation.sampling import Sampling
    from worker_transformers.generation.textstream import Detokenizer, TextStream

    batcher = Batcher(model, batch, set(), probe(model))
    timer = StepTimer(batcher, "decode", batch, tok, lambda: len(batcher.active))
    detokenizer = Detokenizer(tok)
    settings = dict(greedy=not sampled, temperature=0.8, top_k=0, top_p=0.95 if sampled else 1.0)

    def sequence_for(i: int, ids: list[int], emit) -> Sequence:
        sampling = Sampling(**settings, repetition_penalty=1.0, seed=i)
        draws = sampling.generator(batcher.device)
        return Sequence(ids, steps, sampling, TextStream(detokenizer, ids), emit, generator=draws)

    def queue_all(batcher, sequences) -> None:
        with batcher.one_turn():
            for sequence in sequences:
                batcher.submit(sequence)

    return run_batch(batcher, timer, sequence_for, queue_all)


def load_baseline():
    """The old batcher's modules, from git, as a package of their own; None where git cannot show them."""
    folder = Path(tempfile.mkdtemp()) / "baseline_worker"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in BASELINE_FILES:
        shown = subprocess.run(
            ["git", "show", f"{BASELINE}:src/worker_transformers/{name}"], cwd=ROOT, capture_output=True, text=True
        )
        if shown.returncode != 0:
            return None
        (folder / name).write_text(shown.stdout)
    sys.path.insert(0, str(folder.parent))
    return importlib.import_module("baseline_worker.batcher"), importlib.import_module("baseline_worker.schema")


def measure_baseline(modules, model, tok, batch: int, steps: int, sampled: bool) -> dict:
    batcher_module, schema = modules
    sampling_module = importlib.import_module("baseline_worker.sampling")
    textstream = importlib.import_module("baseline_worker.textstream")
    batcher = batcher_module.Batcher(model, batch, set())
    timer = StepTimer(batcher, "_decode_step", batch, tok, lambda: len(batcher._active))  # the old batcher's rows
    fields = {"temperature": 0.8, "top_p": 0.95} if sampled else {"temperature": 0}

    def sequence_for(i: int, ids: list[int], emit):
        request = schema.parse_request({"prompt": "x", "max_new_tokens": steps, "seed": i, **fields}, steps)
        sampler = sampling_module.Sampler(request, batcher.device)
        text = textstream.TextStream(lambda ids: tok.decode(ids, skip_special_tokens=True))
        return batcher_module.Sequence(ids, steps, sampler, text, emit)

    def queue_all(batcher, sequences) -> None:  # the old batcher (from git) takes them only this way
        with batcher._wake:
            batcher._waiting.extend(sequences)
            batcher._wake.notify()

    return run_batch(batcher, timer, sequence_for, queue_all)


def measure(batch: int = 32, steps: int = 40, rounds: int = 3) -> dict:
    """Each engine greedy and sampled, `rounds` times over, one after another within each round (so a slow spell
    of a shared machine falls on both); the medians of the rounds' medians, and of each round's ratio."""
    import torch

    tok = tokenizer()
    model = tiny_model(len(tok))
    samples: dict[str, list[dict]] = {}
    with torch.inference_mode():
        runs = {"batcher": lambda sampled: measure_current(model, tok, batch, steps, sampled)}
        baseline = load_baseline()
        if baseline is not None:
            runs[f"batcher before ({BASELINE})"] = lambda sampled: measure_baseline(
                baseline, model, tok, batch, steps, sampled
            )
        for _ in range(rounds):
            for name, run in runs.items():
                greedy, sampled = run(False), run(True)
                samples.setdefault(name, []).append(
                    {
                        "greedy_host_ms": greedy["host_ms"],
                        "sampled_host_ms": sampled["host_ms"],
                        "forward_ms": greedy["forward_ms"],
                    }
                )
    engines = {
        name: {key: statistics.median(s[key] for s in rows) for key in rows[0]} for name, rows in samples.items()
    }
    report = {
        "batch": batch,
        "steps": steps,
        "rounds": rounds,
        "model": f"tiny Llama (2 layers, hidden 64, vocab {len(tok)})",
        "engines": engines,
        "samples": samples,
    }
    if baseline is not None:
        now, before = samples["batcher"], samples[f"batcher before ({BASELINE})"]
        report["ratio_to_before"] = {
            key: statistics.median(a[key] / b[key] for a, b in zip(now, before))
            for key in ("greedy_host_ms", "sampled_host_ms")
        }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.batch, args.steps, args.rounds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
