"""Serving benchmark: a concurrency sweep over one set of requests, against the same requests one at a time.

    python bench/serve.py [--json PATH] [--png PATH] [--requests N] [--levels 1,2,4,8,16]

Requests go through the worker's real handler in this process (the async generator the runpod SDK calls),
streaming, so that the time to the first token and between tokens can be seen; the SDK's local API server
cannot show either, as its /stream route answers only once a job is done. Concurrency 1 is the serial
baseline: the same requests, one at a time, in the same run. Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from worker_transformers.config import Settings  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain why the sky is blue.",
    "Name three colors and a fruit of each.",
    "What is 17 times 3?",
    "Describe a cat to someone who has never seen one.",
    "Give me a tip for learning to cook.",
    "What does a compiler do?",
]
LENGTHS = [32, 64, 96, 128]


def make_requests(count: int) -> list[dict]:
    """A fixed mix: questions of different lengths, short and long answers, greedy and sampled."""
    jobs = []
    for i in range(count):
        job = {
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_new_tokens": LENGTHS[(i // len(QUESTIONS) + i) % len(LENGTHS)],
            "stream": True,
        }
        job.update({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": i})
        jobs.append(job)
    return jobs


async def one(handler, job: dict) -> dict:
    start = time.perf_counter()
    arrivals = []
    final = None
    async for chunk in handler({"id": "bench", "input": job}):
        arrivals.append(time.perf_counter())
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        final = chunk
    return {
        "ttft": arrivals[0] - start,
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "latency": arrivals[-1] - start,
        "tokens": final["usage"]["completion_tokens"],
    }


async def level(handler, jobs: list[dict], concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def gated(job):
        async with gate:
            return await one(handler, job)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(job) for job in jobs))
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(jobs),
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_p50_s": percentile([r["ttft"] for r in results], 50),
        "ttft_p99_s": percentile([r["ttft"] for r in results], 99),
        "itl_p50_s": percentile(gaps, 50),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def handler_overhead(engine, settings, jobs: list[dict], rounds: int = 200) -> float:
    """Seconds per request the handler spends outside the model: validation, tokenization, response shape."""
    from worker_transformers.serving.events import Done
    from worker_transformers.serving.schema import parse_request

    done = Done("", "stop", 10, 10)
    start = time.perf_counter()
    for i in range(rounds):
        request = parse_request({**jobs[i % len(jobs)], "stream": False}, settings.max_new_tokens)
        engine.prompt_ids(request)
        json.dumps(engine.response("x" * 200, done))
    return (time.perf_counter() - start) / rounds


# Peak memory bandwidth (GB/s) of GPUs the worker commonly runs on, from their vendors' data sheets.
PEAK_BANDWIDTH_GB_S = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "A100-SXM4-80GB": 2039,
    "L40S": 864,
    "A10": 600,
}


def decode_bandwidth(model, itl_s: float) -> dict:
    """Batch-1 decode reads every weight once per token: weight bytes / inter-token latency is the bandwidth
    it reached; against the device's peak, the model bandwidth utilisation (MBU)."""
    import torch

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    reached = weight_bytes / itl_s / 1e9
    peak = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in PEAK_BANDWIDTH_GB_S.items() if key in name), None)
    return {
        "weight_bytes": weight_bytes,
        "decode_gb_s": reached,
        "peak_gb_s": peak,
        "mbu": reached / peak if peak else None,
    }


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [lv["throughput_tok_s"] for lv in levels], "o-", label="batched")
    left.axhline(report["serial_throughput_tok_s"], color="grey", linestyle="--", label="serial")
    left.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    left.set_xticks(xs, [str(x) for x in xs])
    left.legend()
    for key, style in (("latency_p50_s", "o-"), ("latency_p99_s", "s--"), ("ttft_p50_s", "^:")):
        right.plot(xs, [lv[key] for lv in levels], style, label=key.removesuffix("_s"))
    right.set(xscale="log", xlabel="concurrency", ylabel="seconds", title="Latency")
    right.set_xticks(xs, [str(x) for x in xs])
    right.legend()
    fig.suptitle(f"{report['model']} ({report['dtype']}), {report['machine']['device']}, {report['mode']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    parser.add_argument("--png", type=Path, default=None, help="default: the JSON path with .png")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--levels", default="1,2,4,8,16")
    args = parser.parse_args()
    levels = sorted({int(x) for x in args.levels.split(",")} | {1})

    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    settings = Settings.from_env({**os.environ, "MAX_CONCURRENCY": str(max(levels))})
    engine = setup(settings)
    handler = make_handler(engine, settings)
    jobs = make_requests(args.requests)

    async def sweep():
        await one(handler, {**jobs[0], "max_new_tokens": 4})  # warm-up
        return [await level(handler, jobs, c) for c in levels]

    results = asyncio.run(sweep())
    serial = results[0]
    report = {
        "mode": "in-process handler (streaming)",
        "model": settings.model_name,
        "dtype": str(engine.generator.model.dtype).removeprefix("torch."),
        "machine": machine(),
        "levels": results,
        "serial_throughput_tok_s": serial["throughput_tok_s"],
        "single_request_latency_p99_s": serial["latency_p99_s"],
        "handler_overhead_s": handler_overhead(engine, settings, jobs),
        "itl_at_batch_1_s": serial["itl_p50_s"],
        "batch_1_decode": decode_bandwidth(engine.generator.model, serial["itl_p50_s"]),
    }
    engine.close()

    print(
        f"{report['model']} ({report['dtype']}) on {report['machine']['device']}, {report['machine']['cores']} cores; "
        f"{args.requests} requests, {report['mode']}; concurrency 1 is the serial baseline"
    )
    print(
        f"{'conc':>4} {'tok/s':>8} {'x serial':>8} {'ttft p50':>9} {'itl p50':>8} {'lat p50':>8} {'lat p99':>8} "
        f"{'p99/serial p99':>14}"
    )
    for lv in results:
        print(
            f"{lv['concurrency']:>4} {lv['throughput_tok_s']:>8.1f} {lv['throughput_tok_s'] / serial['throughput_tok_s']:>8.2f} "
            f"{lv['ttft_p50_s']:>9.3f} {lv['itl_p50_s']:>8.4f} {lv['latency_p50_s']:>8.2f} {lv['latency_p99_s']:>8.2f} "
            f"{lv['latency_p99_s'] / serial['latency_p99_s']:>14.2f}"
        )
    print(
        f"handler overhead per request (validation, tokenization, response): {report['handler_overhead_s'] * 1e3:.2f} ms; "
        f"one decode step at batch 1: {report['itl_at_batch_1_s'] * 1e3:.1f} ms"
    )
    bw = report["batch_1_decode"]
    mbu = (
        f", MBU {bw['mbu']:.0%} of {bw['peak_gb_s']} GB/s"
        if bw["mbu"]
        else " (peak bandwidth of this device unknown: no MBU)"
    )
    print(f"batch-1 decode read the weights at {bw['decode_gb_s']:.1f} GB/s{mbu}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.png or args.json.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
