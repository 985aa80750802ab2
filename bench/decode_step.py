"""The batch engine's decode step, eager against compiled (batch/compiled.py), on the default model, side by side.

    python bench/decode_step.py [--batches 1,16,32] [--steps 24] [--rounds 3] [--dtype bfloat16] [--device cpu]
        [--json PATH]

For each batch size, one batcher (the engine's own, driven step by step as batch/check.py drives it) prefills that
many prompts and then decodes, and each decode step is timed, the model's forward and everything around it (the
masks, the sampler, the host's copy of the tokens). The rounds alternate eager and compiled steps on the same
batch, so a slow spell of a shared machine falls on both: medians of each round, then the median of the rounds'
ratios. The compile itself is timed twice in fresh processes: with nothing saved (a cold COMPILE_CACHE_DIR) and
with what the first saved (a warm one), as a second worker would start. Prints a table naming the machine and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from serve import machine  # noqa: E402
from step_overhead import prompts  # noqa: E402


def load(dtype: str, device: str = "cpu"):
    import torch
    from step_overhead import tokenizer
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tok.name_or_path, dtype=getattr(torch, dtype)).eval().to(device)
    return model, tok


def batch_of(model, tok, batch: int, max_batch: int):
    """A batcher of up to `max_batch` rows holding `batch` sequences prefilled, ready to decode."""
    from worker_transformers.generation.batch.batcher import Batcher
    from worker_transformers.generation.batch.layout import probe
    from worker_transformers.generation.events import Sequence
    from worker_transformers.generation.sampling import GREEDY
    from worker_transformers.generation.textstream import Detokenizer, TextStream

    batcher = Batcher(model, max_batch, set(), probe(model), start=False)
    detokenizer = Detokenizer(tok)
    sequences = [
        Sequence(ids, 100_000, GREEDY, TextStream(detokenizer, ids), lambda event: None) for ids in prompts(tok, batch)
    ]
    batcher.prefill(sequences)
    return batcher


def step_ms(batcher, graph, steps: int) -> float:
    """Median milliseconds of a decode step, with `graph` serving it (None: the eager step)."""
    batcher.graph = graph
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batcher.decode()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def compile_s(cache_dir: str, dtype: str, device: str) -> dict:
    """Compile the step in a fresh process with COMPILE_CACHE_DIR `cache_dir`: seconds, and whether it loaded."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / "src")!r}); sys.path.insert(0, {str(ROOT / "bench")!r})
from pathlib import Path
from decode_step import load
from worker_transformers.generation.batch.compiled import DecodeGraph, artifacts_file
from worker_transformers.generation.batch.layout import probe
model, tok = load({dtype!r}, {device!r})
graph = DecodeGraph(model, probe(model), artifacts_file(Path({cache_dir!r}), model, "bench"), max_rows=32)
loaded = graph.artifacts.is_file()
ready = graph.compile()
print(json.dumps({{"seconds": graph.compile_s, "ready": ready, "loaded": loaded}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--steps", type=int, default=24, help="decode steps a side each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "decode_step.json")
    args = parser.parse_args()

    from worker_transformers.generation.batch.compiled import DecodeGraph
    from worker_transformers.generation.batch.layout import probe

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = compile_s(cache_dir, args.dtype, args.device)
        warm = compile_s(cache_dir, args.dtype, args.device)
    print(f"compile: {cold['seconds']:.1f} s with nothing saved, {warm['seconds']:.1f} s with the saved step")

    model, tok = load(args.dtype, args.device)
    batches = [int(b) for b in args.batches.split(",")]
    graph = DecodeGraph(model, probe(model), None, max_rows=max(batches))
    with torch.inference_mode():
        if not graph.compile():
            raise SystemExit(f"the default model's step did not compile: {graph.failed}")
        results = []
        for batch in batches:
            batcher = batch_of(model, tok, batch, max(batches))
            rounds = []
            for _ in range(args.rounds):
                eager = step_ms(batcher, None, args.steps)
                compiled = step_ms(batcher, graph, args.steps)
                rounds.append({"eager_ms": eager, "compiled_ms": compiled, "speedup": eager / compiled})
            results.append(
                {
                    "batch": batch,
                    "eager_ms": statistics.median(r["eager_ms"] for r in rounds),
                    "compiled_ms": statistics.median(r["compiled_ms"] for r in rounds),
                    "speedup": statistics.median(r["speedup"] for r in rounds),
                    "rounds": rounds,
                }
            )
    about = machine()
    print(f"\nDecode step of {tok.name_or_path.split('/')[-1]} ({args.dtype}), {args.rounds} rounds; {about}")
    print(f"{'batch':>6}{'eager ms':>11}{'compiled ms':>13}{'speedup':>9}{'eager tok/s':>13}{'compiled tok/s':>16}")
    for r in results:
        b = r["batch"]
        print(
            f"{b:>6}{r['eager_ms']:>11.1f}{r['compiled_ms']:>13.1f}{r['speedup']:>8.2f}x"
            f"{b * 1e3 / r['eager_ms']:>13.1f}{b * 1e3 / r['compiled_ms']:>16.1f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": about, "dtype": args.dtype, "compile_cold": cold, "compile_warm": warm, "steps": results}
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
