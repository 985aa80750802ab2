"""What rendering the chat template in a child process costs a request, against rendering it in the worker.

    python bench/render.py [--model PATH] [--requests 400] [--rounds 5] [--concurrency 1,8] [--json PATH]

The worker renders templates in child processes (serving/renderer.py) so that a template that loops can be
stopped. Each request then pays a round trip to a child: its messages pickled over a socket, the text back. This
measures, in rounds and side by side in one process, one request's render in-process (`apply_chat_template`, the
baseline) and through the renderers, one at a time and from several threads at once (MAX_CONCURRENCY's pool), on
the default model's tokenizer and template with a system prompt and a user turn, and with tools. The medians of
the rounds are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHAT = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France, and what river runs through it?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def default_tokenizer(path: str | None):
    from transformers import AutoTokenizer

    from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir
    from worker_transformers.model import hf_cache

    folder = path or hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if folder is None:
        raise SystemExit(f"{DEFAULT_MODEL} is not in the Hugging Face cache: run `make model` first")
    return AutoTokenizer.from_pretrained(folder), str(folder)


def per_request_s(render, requests: int, threads: int) -> float:
    """Wall seconds per request for `requests` renders shared out over `threads` threads."""
    each = requests // threads
    start = threading.Barrier(threads + 1)

    def work():
        start.wait()
        for _ in range(each):
            render()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - began) / (each * threads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model folder (default: the default model in the Hugging Face cache)")
    parser.add_argument("--requests", type=int, default=400, help="renders per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,8", help="threads rendering at once, comma-separated")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    from worker_transformers.serving.renderer import TEMPLATE_TIMEOUT_S, TemplateRenderers

    tokenizer, folder = default_tokenizer(args.model)
    renderers = TemplateRenderers(TEMPLATE_TIMEOUT_S, max(levels))
    renderers.serve(tokenizer)
    cases = {}
    for name, tools in (("chat", None), ("chat+tools", TOOLS)):
        expected = tokenizer.apply_chat_template(CHAT, tools=tools, add_generation_prompt=True, tokenize=False)
        assert renderers.render(CHAT, tools) == expected, "the renderer's text differs from the tokenizer's"
        for threads in levels:
            cases[(name, threads, "in-process")] = lambda t=tools: tokenizer.apply_chat_template(
                CHAT, tools=t, add_generation_prompt=True, tokenize=False
            )
            cases[(name, threads, "renderer")] = lambda t=tools: renderers.render(CHAT, t)
    # The pool grows while every child is busy: let it settle at what the threads need before anything is timed.
    settled = 0
    while settled < 3:
        before = renderers.children
        for threads in levels:
            per_request_s(lambda: renderers.render(CHAT), 50 * threads, threads)
        settled = settled + 1 if renderers.children == before == len(renderers.idle_pids()) else 0

    samples: dict[tuple, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for (name, threads, way), render in cases.items():
            samples[(name, threads, way)].append(per_request_s(render, args.requests, threads))
    children = renderers.children
    renderers.close()

    rows = []
    print(f"{'case':<12} {'threads':>7} {'in-process us':>14} {'renderer us':>12} {'overhead us':>12}")
    for name in ("chat", "chat+tools"):
        for threads in levels:
            base = statistics.median(samples[(name, threads, "in-process")])
            child = statistics.median(samples[(name, threads, "renderer")])
            rows.append(
                {
                    "case": name,
                    "threads": threads,
                    "in_process_us": base * 1e6,
                    "renderer_us": child * 1e6,
                    "overhead_us": (child - base) * 1e6,
                }
            )
            print(f"{name:<12} {threads:>7} {base * 1e6:>14.1f} {child * 1e6:>12.1f} {(child - base) * 1e6:>12.1f}")
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(
        f"medians of {args.rounds} rounds of {args.requests} renders, {children} renderer children; "
        f"{machine}; template of {folder}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": folder, "rounds": args.rounds, "requests": args.requests, "children": children}
        report.update(machine=machine, rows=rows)
        report["samples"] = {f"{n}|{t}|{w}": v for (n, t, w), v in samples.items()}
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
