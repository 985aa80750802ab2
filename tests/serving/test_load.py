"""Load through the real runpod local API server: 500 jobs at concurrency 32, mixed lengths, some streaming,
some invalid. Every valid job is answered exactly once with the serial reference's answer, every invalid one
is refused, none is lost, and the server's memory stays flat after warm-up.

The tiny model runs in float32, where batched greedy decoding equals one-at-a-time decoding exactly, so the
reference is the same jobs run one by one in this process.
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from api_server import api_server

from worker_transformers.serving.schema import parse_request

pytestmark = pytest.mark.slow

JOBS, CONCURRENCY, WARMUP = 500, 32, 64
RSS_GROWTH_LIMIT_MB = 64  # after warm-up; a leak of one KV cache or one request per job would pass it within ~100 jobs
PROMPTS = ["Hello world", "The capital of France is", "one, two, three", "A small model says", "Stop here, then"]
INVALID = [
    {"prompt": "x", "temperature": 9},
    {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
    {"prompt": ""},
    {"prompt": "x", "max_new_tokens": 10_000},
    {"messages": [{"role": "robot", "content": "y"}]},
    {"prompt": "x", "mystery": True},
    {"prompt": "one two " * 400},  # over MAX_INPUT_TOKENS
]


def make_jobs(seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(JOBS):
        kind = rng.random()
        if kind < 0.15:
            jobs.append({"kind": "invalid", "input": INVALID[i % len(INVALID)]})
            continue
        job = {"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(1, 48), "temperature": 0}
        jobs.append({"kind": "stream" if kind < 0.3 else "whole", "input": {**job, "stream": kind < 0.3}})
    return jobs


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    env = {
        "MODEL_NAME": str(tiny_model_dir),
        "MAX_CONCURRENCY": str(CONCURRENCY),
        "MAX_NEW_TOKENS": "64",
        "MAX_INPUT_TOKENS": "512",
        "RUNPOD_LOG_LEVEL": "WARN",
    }
    with api_server(env, start_timeout_s=120) as server:
        yield server.url, server.proc.pid


def test_500_jobs_at_concurrency_32_none_lost_all_right_memory_flat(server, tiny_engine):
    url, pid = server
    jobs = make_jobs()
    reference = {}
    for job in jobs:
        if job["kind"] != "invalid":
            key = (job["input"]["prompt"], job["input"]["max_new_tokens"])
            if key not in reference:
                reference[key] = tiny_engine.generate(parse_request({**job["input"], "stream": False}, 64))["text"]

    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=CONCURRENCY, pool_maxsize=CONCURRENCY))

    def send(job):
        reply = session.post(f"{url}/runsync", json={"input": job["input"]}, timeout=120)
        return reply.status_code, reply.json()

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(send, jobs[:WARMUP]))  # warm-up: allocator pools, caches, first batches
        rss_after_warmup = rss_mb(pid)
        started = time.monotonic()
        answers = list(pool.map(send, jobs))
        elapsed = time.monotonic() - started
    rss_after_load = rss_mb(pid)

    wrong, lost, refused = [], [], 0
    for job, (status, body) in zip(jobs, answers):
        if status != 200 or body.get("status") != "COMPLETED":
            lost.append((job, status, body))
            continue
        output = body["output"]
        if job["kind"] == "invalid":
            refused += output == [{"error": output[0].get("error")}] and ": " in str(output[0].get("error"))
            continue
        text = "".join(chunk["text"] for chunk in output)
        expected = reference[(job["input"]["prompt"], job["input"]["max_new_tokens"])]
        if text != expected or (job["kind"] == "whole" and len(output) != 1):
            wrong.append((job, output, expected))

    invalid = sum(job["kind"] == "invalid" for job in jobs)
    print(
        f"\n{JOBS} jobs at concurrency {CONCURRENCY} in {elapsed:.1f} s: {len(lost)} lost, {len(wrong)} wrong, "
        f"{refused}/{invalid} invalid refused; server RSS {rss_after_warmup:.0f} MB after warm-up, "
        f"{rss_after_load:.0f} MB after load (limit +{RSS_GROWTH_LIMIT_MB} MB)"
    )
    assert not lost, lost[:3]
    assert not wrong, wrong[:3]
    assert refused == invalid
    assert rss_after_load - rss_after_warmup < RSS_GROWTH_LIMIT_MB
