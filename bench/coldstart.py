"""Cold-start benchmark: this worker's path to ready, side by side with its baselines, in one run.

    python bench/coldstart.py [--runs 3] [--cold-runs 3] [--models default,synthetic] [--json PATH] [--png PATH]

For each model (the default one, and a synthetic checkpoint of random weights >= 1 GB written to a temporary
folder and removed after), with a warm page cache and a cold one, every run starts fresh processes for:
- worker: `python handler.py --test_input JOB`; ready is when its startup timeline is logged;
- naive: bench/naive_start.py (import torch, transformers, runpod; from_pretrained, .to(device); one generate);
- import floor: `python -c "import torch, transformers, runpod"`;
- raw read: `cat` of the weight files.
First it records the worker's readahead manifest (record_readahead.py), as the image build does; the naive
baseline has none, as a plain worker would not.
The cache is made cold with `echo 3 > /proc/sys/vm/drop_caches` where that is allowed (everything cold,
libraries too), else by evicting the weight files alone (posix_fadvise DONTNEED). Figures are medians; the
machines are shared and noisy, so the goals are ratios to baselines measured in the same run. It prints a
table, writes JSON and draws the timeline (bench/plot.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402
from worker_transformers.model.weights import weight_paths  # noqa: E402
from worker_transformers.startup.readahead import MANIFEST  # noqa: E402
from worker_transformers.startup.record_readahead import evict, record  # noqa: E402
from worker_transformers.startup.sdk import processor_name  # noqa: E402

PY = sys.executable
JOB = json.dumps({"input": {"prompt": "Hi", "max_new_tokens": 1}})
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
ROW = re.compile(r"^\s+(?P<name>[\w-]+)\s+(?P<start>[\d.]+)\s+(?P<seconds>[\d.]+)\s+[\d.]+%")
GOALS = (
    ("ready <= 0.6 x naive", "warm", "ready_s", lambda m: m["naive_ready_s"], 0.6),
    ("ready <= 0.6 x naive", "cold", "ready_s", lambda m: m["naive_ready_s"], 0.6),
    ("weights <= 1.5 x raw read (warm)", "warm", "weights_s", lambda m: m["raw_read_s"], 1.5),
    ("ready <= 1.2 x max(import floor, raw read) (cold)", "cold", "ready_s",
     lambda m: max(m["import_floor_s"], m["raw_read_s"]), 1.2),
)  # fmt: skip


def parse_timeline(lines: list[str]) -> list[dict]:
    """The phases of the worker's startup table (budget.InitBudget.table), from its log lines."""
    phases = []
    for line in lines:
        match = ROW.match(line)
        if match:
            phases.append({"name": match["name"], "start_s": float(match["start"]), "seconds": float(match["seconds"])})
    return phases


def machine() -> dict:
    import torch
    import transformers

    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "cpu": processor_name(),
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def can_drop_caches() -> bool:
    try:
        DROP_CACHES.write_text("1")
        return True
    except OSError:
        return False


def make_cold(method: str, files: list[Path]) -> None:
    os.sync()
    if method == "drop_caches":
        DROP_CACHES.write_text("3")
        return
    for path in files:
        evict(path)


def timed(command: list[str], env: dict | None = None, until: str | None = None) -> tuple[float, list[str]]:
    """Seconds from spawning `command` to the first output line containing `until` (or to its exit),
    and all its output lines. The process must succeed."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    lines, seen = [], None
    for line in proc.stdout:
        if seen is None and until is not None and until in line:
            seen = time.perf_counter() - started
        lines.append(line.rstrip("\n"))
    code = proc.wait()
    total = time.perf_counter() - started
    if code != 0 or (until is not None and seen is None):
        raise RuntimeError(f"{' '.join(command[:3])} failed ({code}):\n" + "\n".join(lines[-20:]))
    return (seen if until is not None else total), lines


def run_worker(folder: Path) -> dict:
    ready, lines = timed([PY, "handler.py", "--test_input", JOB], {"MODEL_NAME": str(folder)}, "startup timeline")
    phases = parse_timeline(lines)
    seconds = {p["name"]: p["seconds"] for p in phases}
    # "model" builds the empty module tree (Python's work, whatever the size); "weights" puts the bytes in it.
    return {"ready_s": ready, "weights_s": seconds["weights"], "model_s": seconds["model"], "phases": phases}


# handler.py without its first step: the worker as it would start without the readahead manifest.
NO_READAHEAD = "import sys; sys.path.insert(0, 'src'); from worker_transformers.worker import main; main()"


def run_worker_no_readahead(folder: Path) -> dict:
    ready, _ = timed([PY, "-c", NO_READAHEAD, "--test_input", JOB], {"MODEL_NAME": str(folder)}, "startup timeline")
    return {"no_readahead_ready_s": ready}


def run_naive(folder: Path) -> dict:
    ready, lines = timed([PY, "bench/naive_start.py", str(folder)], until="ready")
    phases = json.loads(next(line for line in lines if line.startswith("{")))
    return {"naive_ready_s": ready, "naive_weights_s": phases["load"], "naive_phases": phases}


def run_floor(_folder: Path) -> dict:
    return {"import_floor_s": timed([PY, "-c", "import torch, transformers, runpod"])[0]}


def run_raw(folder: Path) -> dict:
    files = [str(p) for p in weight_paths(folder)]
    return {"raw_read_s": timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])[0]}


VARIANTS = (run_worker, run_worker_no_readahead, run_naive, run_floor, run_raw)


def run_case(folder: Path, cache: str, runs: int, cold_method: str) -> list[dict]:
    files = weight_paths(folder)
    if cache == "warm":  # untimed: libraries and weights into the page cache
        run_floor(folder)
        run_raw(folder)
    samples = []
    for run in range(runs):
        sample: dict = {}
        # Rotate the order each run, so slow drift on a shared machine spreads over every variant.
        for variant in VARIANTS[run % len(VARIANTS) :] + VARIANTS[: run % len(VARIANTS)]:
            if cache == "cold":
                make_cold(cold_method, files)
            sample.update(variant(folder))
        samples.append(sample)
        print(
            f"  run {run + 1}/{runs}: ready {sample['ready_s']:.2f} s, naive {sample['naive_ready_s']:.2f} s",
            flush=True,
        )
    return samples


def summarize(samples: list[dict]) -> tuple[dict, list[dict], dict]:
    """Medians of every figure, and the phases of the median run (medians of each phase taken apart
    would not add up to one timeline)."""
    keys = (
        "ready_s", "no_readahead_ready_s", "naive_ready_s", "import_floor_s", "raw_read_s", "weights_s", "model_s",
        "naive_weights_s",
    )  # fmt: skip
    median = {k: statistics.median(s[k] for s in samples) for k in keys}
    by_ready = sorted(samples, key=lambda s: s["ready_s"])[(len(samples) - 1) // 2]
    by_naive = sorted(samples, key=lambda s: s["naive_ready_s"])[(len(samples) - 1) // 2]
    return median, by_ready["phases"], by_naive["naive_phases"]


def import_costs(runs: int) -> dict:
    """Seconds from process start to the end of the worker's startup imports (worker.import_libraries), with
    the garbage collector running as usual and paused as startup pauses it (startup/collector.py); warm cache."""
    env = {"PYTHONPATH": str(ROOT / "src")}
    imports = (
        "from worker_transformers.worker import import_libraries; import_libraries(); print('imported', flush=True)"
    )
    paused = "from worker_transformers.startup.collector import collector_paused\nwith collector_paused(): " + imports
    timed([PY, "-c", imports], env)  # untimed: the libraries into the page cache
    return {
        "imports_s": statistics.median(timed([PY, "-c", imports], env, "imported")[0] for _ in range(runs)),
        "imports_collector_paused_s": statistics.median(
            timed([PY, "-c", paused], env, "imported")[0] for _ in range(runs)
        ),
    }


def sdk_costs(runs: int) -> dict:
    """runpod's import, plain and as the worker does it, and its startup checks, in fresh processes."""
    env = {"PYTHONPATH": str(ROOT / "src")}
    worker_import = "from worker_transformers.startup.sdk import import_runpod; import_runpod()"
    checks = (
        "import asyncio, time; from runpod.serverless.modules.rp_fitness import run_fitness_checks; "
        "t = time.perf_counter(); asyncio.run(run_fitness_checks()); print('checks', time.perf_counter() - t)"
    )
    plain = [timed([PY, "-c", "import runpod"])[0] for _ in range(runs)]
    patched = [timed([PY, "-c", worker_import], env)[0] for _ in range(runs)]
    try:
        seconds = [
            float(next(x for x in timed([PY, "-c", checks])[1] if x.startswith("checks")).split()[1])
            for _ in range(runs)
        ]
        checks_s = statistics.median(seconds)
    except RuntimeError:  # a failing check exits the process, as it would the worker
        checks_s = None
    return {
        "runpod_import_s": statistics.median(plain),
        "runpod_import_worker_s": statistics.median(patched),
        "startup_checks_s": checks_s,
    }


# On a GPU: the weights phase's rate for a checkpoint this large or larger, from a warm page cache.
PLACEMENT_MIN_GB = 8.0
PLACEMENT_GOAL_GB_S = 20.0


def goals(cases: dict, gpu: bool) -> list[dict]:
    """Each goal's verdict per case; ratios must stay at or under their limit. On a GPU, also the placement
    rate (GB/s, which must reach its goal) of each warm case of PLACEMENT_MIN_GB or more: on the CPU the
    weights are memory-mapped, not moved, so no rate means anything there."""
    verdicts = []
    for goal, cache, key, baseline, limit in GOALS:
        for name, case in cases.items():
            if case["cache"] != cache:
                continue
            ratio = case["median"][key] / baseline(case["median"])
            verdicts.append(
                {"goal": goal, "case": name, "ratio": round(ratio, 3), "limit": limit, "met": ratio <= limit}
            )
    for name, case in cases.items():
        if gpu and case["cache"] == "warm" and case["weights_gb"] >= PLACEMENT_MIN_GB:
            rate = case["weights_gb"] / case["median"]["weights_s"]
            verdicts.append({
                "goal": f"placement >= {PLACEMENT_GOAL_GB_S:g} GB/s (GPU, warm, >= {PLACEMENT_MIN_GB:g} GB)",
                "case": name, "gb_s": round(rate, 1), "limit": PLACEMENT_GOAL_GB_S, "met": rate >= PLACEMENT_GOAL_GB_S,
            })  # fmt: skip
    return verdicts


def print_report(result: dict) -> None:
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB, GPU: {m['gpu'] or 'none'}; "
          f"torch {m['torch']}, transformers {m['transformers']}; cold cache by {result['cold_method']}; "
          f"medians of {result['runs']} runs ({result['cold_runs']} cold)")  # fmt: skip
    header = (
        f"{'case':<18}{'ready':>7}{'no ra':>7}{'naive':>7}{'floor':>7}{'raw':>7}{'model':>7}{'weights':>9}"
        f"{'naive w':>9}  phases (median s)"
    )
    print(header)
    for name, case in result["cases"].items():
        med = case["median"]
        phases = ", ".join(f"{p['name']} {p['seconds']:.2f}" for p in case["phases"] if p["name"] != "ready")
        print(f"{name:<18}{med['ready_s']:>7.2f}{med['no_readahead_ready_s']:>7.2f}{med['naive_ready_s']:>7.2f}"
              f"{med['import_floor_s']:>7.2f}"
              f"{med['raw_read_s']:>7.3f}{med['model_s']:>7.3f}{med['weights_s']:>9.3f}{med['naive_weights_s']:>9.3f}"
              f"  {phases}")  # fmt: skip
    sdk = result["sdk"]
    checks = f"{sdk['startup_checks_s'] * 1000:.0f} ms" if sdk["startup_checks_s"] is not None else "failed here"
    print(f"runpod import: {sdk['runpod_import_s']:.2f} s plain, {sdk['runpod_import_worker_s']:.2f} s as the worker "
          f"imports it (whole process); SDK startup checks: {checks}")  # fmt: skip
    imports = result["imports"]
    print(f"the worker's imports: {imports['imports_s']:.2f} s with the garbage collector as usual, "
          f"{imports['imports_collector_paused_s']:.2f} s paused (from process start, warm cache)")  # fmt: skip
    print("'no ra': the worker started without its readahead (as without a manifest)")
    print("goals:")
    for verdict in result["goals"]:
        figure = f"{verdict['gb_s']:.1f} GB/s" if "gb_s" in verdict else f"{verdict['ratio']:.2f}"
        print(f"  {'met    ' if verdict['met'] else 'NOT met'}  {verdict['goal']:<52}{verdict['case']:<18}"
              f"{figure} (limit {verdict['limit']})")  # fmt: skip
    for name, case in result["cases"].items():
        if case["cache"] == "warm":
            med = case["median"]
            ratio = (med["model_s"] + med["weights_s"]) / med["raw_read_s"]
            print(f"  (model + weights) / raw read, {name}: {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per case with a warm cache (default 3)")
    parser.add_argument("--cold-runs", type=int, default=None, help="runs per case with a cold cache (default: --runs)")
    parser.add_argument("--models", default="default,synthetic", help="comma-separated: default, synthetic")
    parser.add_argument("--synthetic-gb", type=float, default=1.0, help="size of the synthetic checkpoint")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/out/coldstart.json")
    parser.add_argument("--png", type=Path, default=ROOT / "bench/out/coldstart.png")
    args = parser.parse_args()
    cold_runs = args.runs if args.cold_runs is None else args.cold_runs

    default = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if default is None:
        sys.exit(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    cold_method = "drop_caches" if can_drop_caches() else "fadvise_dontneed_weights"
    started = time.perf_counter()
    ranges = record(MANIFEST)
    readahead_mb = sum(r.length for r in ranges) / 1e6
    print(f"readahead manifest: {len(ranges)} ranges, {readahead_mb:.0f} MB, in {time.perf_counter() - started:.0f} s")
    result: dict = {
        "machine": machine(),
        "runs": args.runs,
        "cold_runs": cold_runs,
        "cold_method": cold_method,
        "readahead_mb": round(readahead_mb, 1),
        "cases": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="coldstart-"))
    try:
        folders = {}
        for model in args.models.split(","):
            if model == "default":
                folders["default"] = (default, DEFAULT_MODEL)
            elif model == "synthetic":
                from synthetic import write_synthetic_model

                folder = write_synthetic_model(scratch / "synthetic", default, int(args.synthetic_gb * 1e9))
                folders["synthetic"] = (folder, "synthetic Llama, random float32 weights")
            else:
                sys.exit(f"--models: unknown model {model!r}; use default, synthetic")
        for model, (folder, label) in folders.items():
            for cache, runs in (("warm", args.runs), ("cold", cold_runs)):
                if runs < 1:
                    continue
                name = f"{model}/{cache}"
                print(f"{name}: {runs} runs", flush=True)
                samples = run_case(folder, cache, runs, cold_method)
                median, phases, naive = summarize(samples)
                size = sum(p.stat().st_size for p in weight_paths(folder))
                result["cases"][name] = {
                    "model": label, "cache": cache, "weights_gb": size / 1e9, "median": median, "phases": phases,
                    "naive_phases": naive, "samples": samples,
                }  # fmt: skip
        result["sdk"] = sdk_costs(args.runs)
        result["imports"] = import_costs(args.runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cases = result["cases"]
    for key in ("ready_s", "naive_ready_s", "import_floor_s", "raw_read_s", "weights_s", "model_s"):
        result[key] = {name: round(case["median"][key], 4) for name, case in cases.items()}
    result["phases"] = {name: case["phases"] for name, case in cases.items()}
    result["goals"] = goals(cases, gpu=result["machine"]["gpu"] is not None)
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    from plot import draw

    draw(result, args.png)
    print_report(result)
    print(f"wrote {args.json} and {args.png} in {result['bench_seconds']:.0f} s")


if __name__ == "__main__":
    main()
