"""The checks only a GPU can answer, in one run of a few minutes: `make bench-gpu`.

    python bench/gpu.py [--json bench/out/gpu.json] [--skip-placement]

On one CUDA device, with a synthetic 1B-parameter Llama (random weights, the default model's tokenizer, written
to a temporary folder and removed after):
1. the serving sweep: the worker's batcher at concurrency 1, 8, 16 and 32, beside transformers' generate_batch
   and serial generate (bench/serve.py's functions), in bfloat16;
2. greedy batched against serial on CUDA: how many of 16 greedy answers, run together, equal the same run alone;
3. the host syncs per decode step: CUDA's sync debug mode counts every operation that waits for the device while
   the batcher decodes 16 sequences (the goal is one: the copy of the chosen tokens);
4. recovery from an out-of-memory error: the process's share of GPU memory is capped just above what the worker
   holds, a burst of long requests runs out, and afterwards a short request must still succeed;
5. placement throughput of an 8 GB checkpoint from a warm page cache: bench/coldstart.py's synthetic case, whose
   verdict says whether the weights phase reached 20 GB/s;
6. the compiled decode step against the eager one on CUDA (bench/decode_step.py --device cuda): milliseconds a
   step at batch 1, 16 and 32 on the default model, and the compile's seconds with and without a saved step.
Writes one JSON file; prints each part as it finishes. Exits 2 without CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

LEVELS = [1, 8, 16, 32]


def default_model_folder() -> Path:
    from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir
    from worker_transformers.model import hf_cache

    snapshot = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if snapshot is None:
        raise SystemExit(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    return snapshot


def serving(folder: Path, requests: int) -> dict:
    import serve

    os.environ["MODEL_NAME"] = str(folder)
    jobs = serve.make_requests(requests, 64)
    worker, details = serve.worker_sweep("bfloat16", "batch", jobs, LEVELS)
    baselines = serve.transformers_baselines("bfloat16", jobs, serve.CB_CONFIGS[:2])
    return {"worker": worker, "details": details, "transformers": baselines}


def start(folder: Path, extra: dict | None = None):
    from worker_transformers.config import Settings
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    env = {**os.environ, "MODEL_NAME": str(folder), "DTYPE": "bfloat16", "MAX_CONCURRENCY": "32", **(extra or {})}
    settings = Settings.from_env(env)
    engine = setup(settings)
    return engine, make_handler(engine, settings)


def run_jobs(handler, inputs: list[dict]) -> list[list[dict]]:
    async def one(job_input):
        return [item async for item in handler({"id": "gpu", "input": job_input})]

    async def together():
        return await asyncio.gather(*(one(job_input) for job_input in inputs))

    return asyncio.run(together())


def greedy_equality(engine, handler) -> dict:
    inputs = [
        {"prompt": f"Question {i}: what comes after {i}?", "temperature": 0, "max_new_tokens": 48} for i in range(16)
    ]
    alone = [run_jobs(handler, [job_input])[0] for job_input in inputs]
    together = run_jobs(handler, inputs)
    equal = sum(a == b for a, b in zip(alone, together))
    return {"requests": len(inputs), "equal": equal, "peak_batch": engine.generation.engine.peak_batch}


def syncs_per_step(engine, handler) -> dict:
    import torch

    batcher = engine.generation.engine
    steps = {"n": 0}
    decode = batcher.decode

    def counted():
        steps["n"] += 1
        return decode()

    batcher.decode = counted
    inputs = [{"prompt": f"Count to {i}:", "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 64} for i in range(16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_jobs(handler, inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    batcher.decode = decode
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return {"decode_steps": steps["n"], "syncs": len(syncs), "syncs_per_step": len(syncs) / max(steps["n"], 1)}


def out_of_memory_recovery(engine, handler) -> dict:
    import torch

    device = engine.generation.engine.device
    total = torch.cuda.get_device_properties(device).total_memory
    held = torch.cuda.memory_reserved(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (held + 512 * 2**20) / total), device)
    try:
        long_prompt = "lorem ipsum " * 1500
        burst = [{"prompt": long_prompt, "max_new_tokens": 256, "temperature": 0} for _ in range(32)]
        results = run_jobs(handler, burst)
        failed = sum(1 for items in results if "error" in items[-1])
        messages = sorted({items[-1]["error"][:80] for items in results if "error" in items[-1]})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    [after] = run_jobs(handler, [{"prompt": "Hello", "max_new_tokens": 8, "temperature": 0}])
    return {
        "burst": len(burst),
        "failed": failed,
        "messages": messages,
        "short_request_after": "ok" if "error" not in after[-1] else after[-1]["error"],
    }


def placement(out: Path) -> dict:
    command = [
        sys.executable, "bench/coldstart.py", "--models", "synthetic", "--synthetic-gb", "8", "--runs", "1",
        "--cold-runs", "0", "--json", str(out), "--png", str(out.with_suffix(".png")),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=420)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return {"returncode": done.returncode, "goals": report.get("goals"), "weights_s": report.get("weights_s"),
            "tail": done.stdout[-2000:] + done.stderr[-1000:]}  # fmt: skip


def compiled_step(out: Path) -> dict:
    command = [sys.executable, "bench/decode_step.py", "--device", "cuda", "--rounds", "2", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text()) if out.is_file() else {}
    return {"returncode": done.returncode, "steps": report.get("steps"), "compile_cold": report.get("compile_cold"),
            "compile_warm": report.get("compile_warm"), "tail": done.stdout[-2000:] + done.stderr[-1000:]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "gpu.json")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--skip-placement", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    from synthetic import write_synthetic_model

    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="wt-gpu-")) / "synthetic-1b"
    started = time.perf_counter()
    try:
        write_synthetic_model(folder, default_model_folder(), min_bytes=4 * 10**9)  # 1B float32 parameters
        report["serving"] = serving(folder, args.requests)
        print(json.dumps({k: v for k, v in report["serving"].items() if k != "details"}, indent=1)[:4000], flush=True)
        engine, handler = start(folder)
        try:
            for name, check in (
                ("greedy", greedy_equality),
                ("syncs", syncs_per_step),
                ("oom", out_of_memory_recovery),
            ):
                report[name] = check(engine, handler)
                print(name, json.dumps(report[name]), flush=True)
        finally:
            engine.close()
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
        args.json.write_text(json.dumps(report, indent=1))
    if not args.skip_placement:
        report["placement"] = placement(args.json.with_name("gpu-coldstart.json"))
        print("placement", json.dumps(report["placement"]["goals"]), flush=True)
    report["compiled_step"] = compiled_step(args.json.with_name("gpu-decode-step.json"))
    print("compiled step", json.dumps(report["compiled_step"]["steps"]), flush=True)
    report["seconds"] = time.perf_counter() - started
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
