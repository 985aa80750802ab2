"""Serving benchmark: the worker's engines and transformers' own ways to generate, on the same requests, in one run.

    python bench/serve.py [--json PATH] [--png PATH] [--requests N] [--levels 1,8,16,32] [--dtypes bfloat16,float32]

For each dtype, side by side:
- the worker with each engine (ENGINE=batch, ENGINE=continuous over transformers' ContinuousBatchingManager,
  ENGINE=serial), through its real handler in this process (the async generator the runpod SDK calls), streaming,
  so that the time to the first token and between tokens can be seen, at each concurrency level; the SDK's local
  API server cannot show either, as its /stream route answers only once a job is done;
- transformers' continuous batching, `generate_batch`, all requests at once, with a few ContinuousBatchingConfig
  settings (the best is the one to beat);
- serial `generate`, one request at a time.
Then, for the issue's goals, a head-to-head of a few rounds (--rounds), each running the worker's default engine at
concurrency 16 and at 1, the best generate_batch setting and serial generate one after another, so that a slow
spell of a shared machine falls on every side: medians, and the medians of each round's ratios. Then the host's
time per decode step outside the model's forward at batch 32, on a tiny model, for the batcher and, where git can
show it, the batcher this project had before (bench/step_overhead.py), in rounds too. Prints tables, writes JSON
and a PNG.
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
sys.path.insert(0, str(ROOT / "bench"))

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


def make_requests(count: int, new_tokens: int) -> list[dict]:
    """Greedy chat requests of up to `new_tokens` tokens each. Greedy, because transformers' generate_batch takes
    one generation config for all its requests: so every way of generating does the same work (the same tokens,
    up to rounding), and tokens/s compare. Sampling's own cost is what bench/step_overhead.py measures."""
    return [
        {
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_new_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
        }
        for i in range(count)
    ]


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


async def gathered(run, jobs: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """`run(job)` for every job, at most `concurrency` at once: the results in the jobs' order, and the seconds
    all took."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(job):
        async with gate:
            return await run(job)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(job) for job in jobs))
    return results, time.perf_counter() - start


def totals(results: list[dict], wall: float, concurrency: int) -> dict:
    """A level's requests, output tokens, seconds and output tokens/s (each result counts its `tokens`)."""
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
    }


async def level(handler, jobs: list[dict], concurrency: int) -> dict:
    results, wall = await gathered(lambda job: one(handler, job), jobs, concurrency)
    latencies = [r["latency"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        **totals(results, wall, concurrency),
        **percentiles("ttft", [r["ttft"] for r in results]),
        **percentiles("itl", gaps),
        **percentiles("latency", latencies),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def handler_overhead(engine, settings, jobs: list[dict], rounds: int = 200) -> float:
    """Seconds per request the handler spends outside the model: validation, tokenization, response shape."""
    from worker_transformers.generation.events import Done
    from worker_transformers.serving.answer import Answer
    from worker_transformers.serving.plain import response
    from worker_transformers.serving.schema import parse_request

    answer = Answer(text=["x" * 200], done=Done("", "stop", 10, 10))
    start = time.perf_counter()
    for i in range(rounds):
        request = parse_request({**jobs[i % len(jobs)], "stream": False}, settings.max_new_tokens)
        engine.prepare(request)
        json.dumps(response(answer, request, engine.model_name, engine.tokenizer))
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


def percentiles(prefix: str, values: list[float]) -> dict:
    """p50 and p99 of `values`; NaN when there are none (answers of one chunk have no gaps between chunks)."""
    if not values:
        return {f"{prefix}_p50_s": float("nan"), f"{prefix}_p99_s": float("nan")}
    return {f"{prefix}_p50_s": percentile(values, 50), f"{prefix}_p99_s": percentile(values, 99)}


def worker_sweep(dtype: str, engine_kind: str, jobs: list[dict], levels: list[int]) -> tuple[list[dict], dict]:
    """The worker started with ENGINE=`engine_kind`, every level of concurrency through its handler."""
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    env = {**os.environ, "MAX_CONCURRENCY": str(max(levels)), "DTYPE": dtype, "ENGINE": engine_kind}
    settings = Settings.from_env(env)
    engine = setup(settings)
    handler = make_handler(engine, settings)

    async def sweep():
        await one(handler, {**jobs[0], "max_new_tokens": 4})  # warm-up
        return [await level(handler, jobs, c) for c in levels]

    try:
        results = asyncio.run(sweep())
        extra = {
            "engine": engine.generation.engine_kind,
            "model": settings.model_name,
            "dtype": str(engine.generation.engine.model.dtype).removeprefix("torch."),
            "handler_overhead_s": handler_overhead(engine, settings, jobs),
            "batch_1_decode": decode_bandwidth(engine.generation.engine.model, results[0]["itl_p50_s"]),
        }
    finally:
        engine.close()
    return results, extra


class Transformers:
    """The same prompts through transformers alone: `generate_batch` (all at once) with a ContinuousBatchingConfig,
    and `generate` one request at a time."""

    def __init__(self, dtype: str, jobs: list[dict]) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        from worker_transformers.model.sources import resolve

        location = resolve(Settings.from_env(os.environ))
        tokenizer = AutoTokenizer.from_pretrained(location.path)
        self.model = AutoModelForCausalLM.from_pretrained(location.path, dtype=getattr(torch, dtype)).eval()
        self.prompts = [
            tokenizer.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            for job in jobs
        ]
        self.config = GenerationConfig(
            max_new_tokens=jobs[0]["max_new_tokens"],
            do_sample=False,
            eos_token_id=self.model.generation_config.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        self._warm: set[str] = set()

    def generate_batch(self, settings: dict) -> dict:
        from transformers import ContinuousBatchingConfig

        cb = ContinuousBatchingConfig(**settings)
        if json.dumps(settings) not in self._warm:  # the first call of a config pays its one-off setup
            self.model.generate_batch(self.prompts[:2], generation_config=self.config, continuous_batching_config=cb)
            self._warm.add(json.dumps(settings))
        start = time.perf_counter()
        results = self.model.generate_batch(
            self.prompts, generation_config=self.config, continuous_batching_config=cb, record_timestamps=True
        )
        wall = time.perf_counter() - start
        tokens = sum(len(r.generated_tokens) for r in results.values())
        stamps = [r.timestamps for r in results.values() if r.timestamps]
        return {
            "config": settings,
            "requests": len(self.prompts),
            "output_tokens": tokens,
            "wall_s": wall,
            "throughput_tok_s": tokens / wall,
            **percentiles("ttft", [s[0] - start for s in stamps]),
            **percentiles("itl", [b - a for s in stamps for a, b in zip(s, s[1:])]),
        }

    def generate_serial(self, count: int | None = None) -> dict:
        """`generate` on the first `count` prompts (all by default), one after another."""
        import torch

        tokens, start = 0, time.perf_counter()
        with torch.inference_mode():
            for ids in self.prompts[:count]:
                mask = torch.ones(1, len(ids), dtype=torch.long)
                result = self.model.generate(torch.tensor([ids]), attention_mask=mask, generation_config=self.config)
                tokens += result.shape[1] - len(ids)
        wall = time.perf_counter() - start
        return {"requests": len(self.prompts[:count]), "output_tokens": tokens, "wall_s": wall,
                "throughput_tok_s": tokens / wall}  # fmt: skip


def transformers_baselines(dtype: str, jobs: list[dict], configs: list[dict]) -> dict:
    baselines = Transformers(dtype, jobs)
    return {
        "generate_batch": [baselines.generate_batch(settings) for settings in configs],
        "generate_serial": baselines.generate_serial(),
    }


def head_to_head(dtype: str, jobs: list[dict], best: dict, rounds: int, concurrency: int = 16) -> dict:
    """The issue's goals, measured `rounds` times over with each side in every round, one after another, so that a
    slow spell of this shared machine falls on both: the worker's default engine at `concurrency` and at 1, the
    best generate_batch setting of the sweep, and serial generate. Medians of each, and of each round's ratios.
    Concurrency 1 and serial generate run on the first distinct requests only (the requests repeat the same
    questions), which keeps a round short; they give tokens/s and latencies, which do not depend on the count."""
    import statistics

    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    distinct = jobs[: len(QUESTIONS)]
    settings = Settings.from_env({**os.environ, "MAX_CONCURRENCY": str(concurrency), "DTYPE": dtype})
    baselines = Transformers(dtype, jobs)
    samples: list[dict] = []
    kind = None
    for _ in range(rounds):
        # A worker started afresh each round and closed before transformers runs: an engine thread's idle OpenMP
        # team would slow every thread that computes after it (events.py), and so the baselines.
        engine = setup(settings)
        handler = make_handler(engine, settings)
        try:
            asyncio.run(one(handler, {**jobs[0], "max_new_tokens": 4}))  # warm-up
            batched = asyncio.run(level(handler, jobs, concurrency))
            alone = asyncio.run(level(handler, distinct[:4], 1))
            kind = engine.generation.engine_kind
        finally:
            engine.close()
        generate_batch = baselines.generate_batch(best)
        serial = baselines.generate_serial(len(distinct))
        samples.append(
            {
                "worker_tok_s": batched["throughput_tok_s"],
                "worker_itl_p99_s": batched["itl_p99_s"],
                "worker_c1_itl_p50_s": alone["itl_p50_s"],
                "generate_batch_tok_s": generate_batch["throughput_tok_s"],
                "generate_tok_s": serial["throughput_tok_s"],
            }
        )
    ratios = {
        "x_generate_batch": [s["worker_tok_s"] / s["generate_batch_tok_s"] for s in samples],
        "x_generate": [s["worker_tok_s"] / s["generate_tok_s"] for s in samples],
        "itl_p99_over_c1_p50": [s["worker_itl_p99_s"] / s["worker_c1_itl_p50_s"] for s in samples],
    }
    return {
        "engine": kind,
        "concurrency": concurrency,
        "rounds": rounds,
        "generate_batch_config": best,
        "samples": samples,
        "median": {key: statistics.median(s[key] for s in samples) for key in samples[0]},
        "median_ratio": {key: statistics.median(values) for key, values in ratios.items()},
    }


def cpu_flags() -> list[str]:
    """The SIMD flags that decide whether a CPU computes bf16 natively (avx512_bf16, amx_bf16) or emulates it."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni")
    return [flag for flag in flags.split(":", 1)[1].split() if flag in wanted]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for axis, run in zip(axes[0], runs):
        for name, levels in run["worker"].items():
            xs = [lv["concurrency"] for lv in levels]
            axis.plot(xs, [lv["throughput_tok_s"] for lv in levels], "o-", label=f"worker, ENGINE={name}")
        best = max(run["transformers"]["generate_batch"], key=lambda r: r["throughput_tok_s"])
        axis.axhline(best["throughput_tok_s"], color="tab:red", linestyle="--", label="generate_batch (best)")
        axis.axhline(run["transformers"]["generate_serial"]["throughput_tok_s"], color="grey", linestyle=":",
                     label="generate, serial")  # fmt: skip
        axis.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title=run["dtype"])
        axis.legend(fontsize=8)
    fig.suptitle(f"{report['model']}, {report['machine']['device']}, {report['requests']} requests")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_run(run: dict) -> None:
    best = max(run["transformers"]["generate_batch"], key=lambda r: r["throughput_tok_s"])
    serial = run["transformers"]["generate_serial"]["throughput_tok_s"]
    print(f"\n{run['dtype']}:")
    print(
        f"{'':24} {'conc':>4} {'tok/s':>8} {'x gen_b':>8} {'x serial':>8} {'ttft p50':>9} {'itl p50':>8} {'itl p99':>8}"
    )
    for name, levels in run["worker"].items():
        for lv in levels:
            print(
                f"{'worker ENGINE=' + name:24} {lv['concurrency']:>4} {lv['throughput_tok_s']:>8.1f} "
                f"{lv['throughput_tok_s'] / best['throughput_tok_s']:>8.2f} {lv['throughput_tok_s'] / serial:>8.2f} "
                f"{lv['ttft_p50_s']:>9.3f} {lv['itl_p50_s']:>8.4f} {lv['itl_p99_s']:>8.4f}"
            )
    for result in run["transformers"]["generate_batch"]:
        c = result["config"]
        label = f"gen_batch {c['num_blocks']}x{c['block_size']} t{c['max_batch_tokens']}"
        print(
            f"{label:24} {'all':>4} {result['throughput_tok_s']:>8.1f} "
            f"{result['throughput_tok_s'] / best['throughput_tok_s']:>8.2f} {result['throughput_tok_s'] / serial:>8.2f} "
            f"{result.get('ttft_p50_s', float('nan')):>9.3f} {result.get('itl_p50_s', float('nan')):>8.4f} "
            f"{result.get('itl_p99_s', float('nan')):>8.4f}"
        )
    print(f"{'generate, serial':24} {1:>4} {serial:>8.1f} {serial / best['throughput_tok_s']:>8.2f} {1:>8.2f}")


def print_goals(dtype: str, h2h: dict) -> None:
    m, r = h2h["median"], h2h["median_ratio"]
    c = h2h["concurrency"]
    print(
        f"\n{dtype}, head to head, {h2h['rounds']} rounds (medians; ratios are the medians of each round's): worker "
        f"ENGINE={h2h['engine']} at concurrency {c} {m['worker_tok_s']:.1f} tok/s, best generate_batch "
        f"{m['generate_batch_tok_s']:.1f}, serial generate {m['generate_tok_s']:.1f}"
    )
    print(
        f"  x best generate_batch {r['x_generate_batch']:.2f} (goal >= 1.3)   x serial generate {r['x_generate']:.2f} "
        f"(goal >= 5)   ITL p99 at {c} / median ITL at 1 {r['itl_p99_over_c1_p50']:.2f} (goal <= 3)"
    )


# transformers' continuous batching settings to try (num_blocks x block_size tokens, max_batch_tokens): the
# first two are what this machine's notes saw best and worst, the third a larger cache.
CB_CONFIGS = [
    {"num_blocks": 128, "block_size": 32, "max_batch_tokens": 1024},
    {"num_blocks": 64, "block_size": 64, "max_batch_tokens": 256},
    {"num_blocks": 256, "block_size": 32, "max_batch_tokens": 2048},
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    parser.add_argument("--png", type=Path, default=None, help="default: the JSON path with .png")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,8,16,32")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--engines", default="batch,continuous,serial")
    parser.add_argument("--cb-configs", type=int, default=len(CB_CONFIGS), help="how many of CB_CONFIGS to run")
    parser.add_argument("--no-step-overhead", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the goals' head-to-head (0: none)")
    parser.add_argument("--goal-concurrency", type=int, default=16)
    args = parser.parse_args()
    levels = sorted({int(x) for x in args.levels.split(",")} | {1})
    jobs = make_requests(args.requests, args.new_tokens)

    runs = []
    for dtype in args.dtypes.split(","):
        worker, extra = {}, {}
        for kind in args.engines.split(","):
            # The serial engine runs one request at a time whatever the concurrency: one level says it all.
            worker[kind], extra[kind] = worker_sweep(dtype, kind, jobs, [1] if kind == "serial" else levels)
        baselines = transformers_baselines(dtype, jobs, CB_CONFIGS[: args.cb_configs])
        run = {"dtype": dtype, "worker": worker, "worker_details": extra, "transformers": baselines}
        if args.rounds:
            best = max(baselines["generate_batch"], key=lambda r: r["throughput_tok_s"])["config"]
            run["head_to_head"] = head_to_head(dtype, jobs, best, args.rounds, args.goal_concurrency)
        runs.append(run)

    first = next(iter(runs[0]["worker_details"].values()))
    report = {
        "mode": "in-process handler (streaming); transformers in the same process",
        "model": first["model"],
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "runs": runs,
    }
    batch = runs[0]["worker"].get("batch") or next(iter(runs[0]["worker"].values()))
    report["levels"] = batch  # the first dtype's default engine, for a quick look
    report["serial_throughput_tok_s"] = batch[0]["throughput_tok_s"]
    if not args.no_step_overhead:
        from step_overhead import measure

        report["step_overhead"] = measure(rounds=max(args.rounds, 1))

    print(
        f"{report['model']} on {report['machine']['device']}, {report['machine']['cores']} cores "
        f"(flags: {' '.join(report['machine']['cpu_flags']) or 'none of note'}); {args.requests} chat requests of up "
        f"to {args.new_tokens} tokens; x gen_b: against the best generate_batch; concurrency 1 is the serial baseline"
    )
    for run in runs:
        print_run(run)
    for run in runs:
        details = run["worker_details"].get("batch")
        if details:
            print(
                f"\n{run['dtype']}: handler overhead per request {details['handler_overhead_s'] * 1e3:.2f} ms; "
                f"batch-1 decode read the weights at {details['batch_1_decode']['decode_gb_s']:.1f} GB/s"
            )
    for run in runs:
        if "head_to_head" in run:
            print_goals(run["dtype"], run["head_to_head"])
    if "step_overhead" in report:
        so = report["step_overhead"]
        print(f"\nhost time per decode step outside the forward, batch {so['batch']}, {so['model']}:")
        for name, row in so["engines"].items():
            print(
                f"  {name:28} greedy {row['greedy_host_ms']:7.2f} ms   sampled {row['sampled_host_ms']:7.2f} ms   "
                f"(forward {row['forward_ms']:.2f} ms)"
            )
        if "ratio_to_before" in so:
            ratio = so["ratio_to_before"]
            print(
                f"  against before, median of {so['rounds']} rounds' ratios: greedy {ratio['greedy_host_ms']:.2f}x, "
                f"sampled {ratio['sampled_host_ms']:.2f}x (goal <= 0.33)"
            )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    png = args.png or args.json.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
