"""Hybrid and recurrent models through the worker: the batch engine against the serial engine and `generate`.

    python bench/serve_hybrid.py [--families qwen3_5_text,mamba2] [--dtype float32] [--requests 16]
        [--new-tokens 32] [--levels 1,8,16] [--goal-concurrency 8] [--rounds 1] [--json PATH]

For each family, a model of about 100M random weights (seeded) is written as a real model folder (safetensors,
its config, the default model's tokenizer and chat template) to a temporary directory:
- qwen3_5_text: a Qwen3.5 text model, three linear-attention (gated delta net) layers to each full-attention one;
- mamba2: a Mamba 2 model, every layer a state-space mixer;
- llama: a plain Llama, which the batch engine serves already: it shows this benchmark's batch path at work.
Then, side by side, in each of --rounds rounds: the worker started through its real startup with ENGINE=batch and
then ENGINE=serial, the same greedy chat requests streamed through its real handler at each concurrency level,
and serial `generate`. Each worker's streamed answers are compared with the serial engine's at concurrency 1:
greedy, they should be equal (exactly so in float32). A startup that refuses ENGINE=batch (a model the batcher
cannot serve) is reported as the row's result. Prints a table and a summary line per family, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from serve import cpu_flags, level, machine, make_requests, one, percentiles  # noqa: E402
from synthetic import TOKENIZER_FILES  # noqa: E402

from worker_transformers.config import DEFAULT_MODEL, ConfigError, Settings, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402

ENGINES = ("batch", "serial")
GENERATE = "generate, serial"
# Medians across rounds are taken of these; the answers' check keeps its worst round.
METRICS = ("throughput_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s", "latency_p50_s",
           "latency_p99_s", "wall_s", "output_tokens")  # fmt: skip


def hybrid_layer_types(layers: int) -> list[str]:
    """Qwen3.5's pattern: three linear-attention layers, then one full-attention layer."""
    return ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(layers)]


def qwen3_5_text_config(tokens: dict):
    from transformers import Qwen3_5TextConfig

    # The proportions of Qwen3_5TextConfig's defaults (four query heads to a KV head, twice as many linear-attention
    # value heads as key heads), narrowed to about 100M parameters; tied embeddings keep the vocabulary's share down.
    return Qwen3_5TextConfig(
        **tokens,
        hidden_size=640,
        intermediate_size=1792,
        num_hidden_layers=12,
        layer_types=hybrid_layer_types(12),
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_key_heads=8,
        linear_num_value_heads=16,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def mamba2_config(tokens: dict):
    from transformers import Mamba2Config

    # mamba2-130m's layer (768 wide, expanded twice into 24 heads of 64, one group, state 128), 16 layers deep.
    return Mamba2Config(
        **tokens,
        hidden_size=768,
        num_hidden_layers=16,
        expand=2,
        num_heads=24,
        head_dim=64,
        n_groups=1,
        state_size=128,
        tie_word_embeddings=True,
    )


def llama_config(tokens: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        **tokens,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


FAMILIES = {"qwen3_5_text": qwen3_5_text_config, "mamba2": mamba2_config, "llama": llama_config}


def write_model(folder: Path, family: str, tokenizer_from: Path, dtype: str) -> dict:
    """A `family` model of seeded random weights saved to `folder` with the tokenizer of `tokenizer_from`; returns
    what the report says of it."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokens = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](tokens)).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}


def recording(handler, texts: dict[int, str]):
    """`handler`, keeping each job's streamed text under the id() of its input: the request dict that `level`
    hands `one`, which passes it on as is (the schema refuses any field that could carry a name)."""

    async def recorded(job: dict):
        parts = []
        async for chunk in handler(job):
            parts.append(chunk.get("text", ""))
            yield chunk
        texts[id(job["input"])] = "".join(parts)

    return recorded


def worker_rows(folder: Path, kind: str, dtype: str, jobs: list[dict], levels: list[int]) -> list[dict]:
    """The worker started with ENGINE=`kind` on `folder`, a row per concurrency level with each request's answer;
    one row saying why, when its startup refuses the engine."""
    from worker_transformers.serving.handlers import make_handler
    from worker_transformers.worker import setup

    env = {**os.environ, "MODEL_NAME": str(folder), "ENGINE": kind, "MAX_CONCURRENCY": str(max(levels)),
           "DTYPE": dtype}  # fmt: skip
    settings = Settings.from_env(env)
    try:
        frontend = setup(settings)
    except ConfigError as error:
        return [{"row": f"ENGINE={kind}", "refused": str(error)}]
    texts: dict[int, str] = {}
    handler = recording(make_handler(frontend, settings), texts)

    async def sweep() -> list[dict]:
        await one(handler, {**jobs[0], "max_new_tokens": 4})  # warm-up
        rows = []
        for concurrency in levels:
            texts.clear()
            row = await level(handler, jobs, concurrency)
            rows.append({"row": f"ENGINE={kind}", **row, "answers": [texts[id(job)] for job in jobs]})
        return rows

    try:
        rows = asyncio.run(sweep())
        served_by = frontend.generation.engine_kind
    finally:
        frontend.close()
    return [{**row, "engine": served_by} for row in rows]


class Stamps:
    """A `generate` streamer that notes when each new token comes out (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts: list[float] = []

    def put(self, value) -> None:
        self.puts.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_row(folder: Path, dtype: str, jobs: list[dict]) -> dict:
    """transformers' own `generate` on the same prompts, one after another, timed per token like the worker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    prompts = [
        tokenizer.apply_chat_template(job["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        for job in jobs
    ]

    def run(ids: list[int], max_new_tokens: int) -> dict:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        stamps, began = Stamps(), time.perf_counter()
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             generation_config=config, streamer=stamps)  # fmt: skip
        arrivals = stamps.puts[1:]
        return {"ttft": arrivals[0] - began, "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
                "latency": arrivals[-1] - began, "tokens": out.shape[1] - len(ids)}  # fmt: skip

    with torch.inference_mode():
        run(prompts[0], 4)  # warm-up
        start = time.perf_counter()
        results = [run(ids, jobs[0]["max_new_tokens"]) for ids in prompts]
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    return {
        "row": GENERATE,
        "concurrency": 1,
        "requests": len(jobs),
        "output_tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        **percentiles("ttft", [r["ttft"] for r in results]),
        **percentiles("itl", [g for r in results for g in r["gaps"]]),
        **percentiles("latency", [r["latency"] for r in results]),
    }


def check_answers(rows: list[dict]) -> None:
    """Each worker row's answers against the serial engine's at its first (lowest) level, in place: the count of
    equal ones, and the first that differs; the answers themselves leave the row."""
    reference = next((row["answers"] for row in rows if row.get("engine") == "serial"), None)
    for row in rows:
        answers = row.pop("answers", None)
        if answers is None or reference is None:
            continue
        differ = [i for i, (got, want) in enumerate(zip(answers, reference)) if got != want]
        row["equal_answers"] = len(answers) - len(differ)
        if differ:
            row["first_difference"] = {"request": differ[0], "this": answers[differ[0]], "serial": reference[differ[0]]}


def one_round(folder: Path, dtype: str, jobs: list[dict], levels: list[int], refused: dict[str, dict]) -> list[dict]:
    """Every row once; an engine in `refused` (by row name) is not asked again, as the model decides a refusal.
    Each worker is closed before the next starts and before `generate` runs: an engine thread's idle OpenMP
    team would slow every thread that computes after it (generation/engine.py)."""
    rows = []
    for kind in ENGINES:
        name = f"ENGINE={kind}"
        rows += [refused[name]] if name in refused else worker_rows(folder, kind, dtype, jobs, levels)
    check_answers(rows)
    return rows + [generate_row(folder, dtype, jobs)]


def medians(rounds: list[list[dict]]) -> list[dict]:
    """The rows of the first round with each metric the median over all rounds, and the fewest equal answers."""
    merged = []
    for i, row in enumerate(rounds[0]):
        samples = [r[i] for r in rounds]
        row = {**row, **{key: statistics.median(s[key] for s in samples) for key in METRICS if key in row}}
        if "equal_answers" in row:
            row["equal_answers"] = min(s["equal_answers"] for s in samples)
        merged.append(row)
    return merged


def tok_s(rows: list[dict], name: str, concurrency: int) -> float | None:
    """Tokens/s of the row `name` at `concurrency`; None when it has none (refused)."""
    found = (r["throughput_tok_s"] for r in rows if r["row"] == name and r.get("concurrency") == concurrency)
    return next(found, None)


def summary(rounds: list[list[dict]], rows: list[dict], concurrency: int) -> dict:
    """The goal, ENGINE=batch over ENGINE=serial in tokens/s at `concurrency`: the median of each round's ratio
    (None when an engine was refused), each side's median, and the batch engine's equal answers there."""
    sides = {"batch_tok_s": ("ENGINE=batch", concurrency), "serial_tok_s": ("ENGINE=serial", concurrency),
             "generate_tok_s": (GENERATE, 1)}  # fmt: skip
    samples = {key: [tok_s(r, *row) for r in rounds] for key, row in sides.items()}
    result = {key: None if None in values else statistics.median(values) for key, values in samples.items()}
    ratio = None
    if result["batch_tok_s"] and result["serial_tok_s"]:
        ratio = statistics.median(b / s for b, s in zip(samples["batch_tok_s"], samples["serial_tok_s"]))
    batch = next((r for r in rows if r["row"] == "ENGINE=batch" and r.get("concurrency") == concurrency), {})
    return {"concurrency": concurrency, **result, "batch_over_serial": ratio, "requests": batch.get("requests"),
            "batch_equal_answers": batch.get("equal_answers")}  # fmt: skip


def run_family(family: str, folder: Path, model: dict, args, jobs: list[dict], levels: list[int]) -> dict:
    rounds: list[list[dict]] = []
    for number in range(1, args.rounds + 1):
        print(f"{family}: round {number} of {args.rounds}", file=sys.stderr, flush=True)
        refused = {row["row"]: row for row in (rounds[0] if rounds else []) if "refused" in row}
        rounds.append(one_round(folder, args.dtype, jobs, levels, refused))
    rows = medians(rounds)
    return {"family": family, **model, "rows": rows, "rounds": rounds,
            "summary": summary(rounds, rows, args.goal_concurrency)}  # fmt: skip


def print_family(run: dict, dtype: str, rounds: int) -> None:
    print(f"\n{run['family']}: {run['architecture']}, {run['parameters'] / 1e6:.1f}M parameters, {dtype}")
    print(f"{'':18} {'conc':>4} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} "
          f"{'= serial':>8}")  # fmt: skip
    for row in run["rows"]:
        if "refused" in row:
            print(f"{row['row']:18} refused: {row['refused']}")
            continue
        equal = f"{row['equal_answers']}/{row['requests']}" if "equal_answers" in row else "-"
        print(
            f"{row['row']:18} {row['concurrency']:>4} {row['throughput_tok_s']:>8.1f} {row['ttft_p50_s']:>9.3f} "
            f"{row['ttft_p99_s']:>9.3f} {row['itl_p50_s']:>8.4f} {row['itl_p99_s']:>8.4f} {equal:>8}"
        )
    s = run["summary"]
    named = (("batch", s["batch_tok_s"]), ("serial engine", s["serial_tok_s"]), ("generate", s["generate_tok_s"]))
    sides = ", ".join(f"{name} {value:.1f} tok/s" for name, value in named if value is not None)
    if s["batch_over_serial"] is None:
        refused = " and ".join(row["row"] for row in run["rows"] if "refused" in row)
        print(f"{run['family']}: no ratio, {refused} refused; medians at concurrency {s['concurrency']}: {sides}")
        return
    print(
        f"{run['family']}: ENGINE=batch / ENGINE=serial at concurrency {s['concurrency']}: "
        f"{s['batch_over_serial']:.2f}x (goal >= 4; median of {rounds} rounds' ratios); medians: {sides}; "
        f"greedy answers equal to the serial engine's: {s['batch_equal_answers']}/{s['requests']}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve_hybrid.json")
    parser.add_argument("--families", default="qwen3_5_text,mamba2", help=f"comma-separated: {', '.join(FAMILIES)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8,16")
    parser.add_argument("--goal-concurrency", type=int, default=8, help="the level the summary's ratio is taken at")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every row; medians are reported")
    args = parser.parse_args()
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        sys.exit(f"--families: unknown {', '.join(unknown)}; use {', '.join(FAMILIES)}")
    # Concurrency 1 first: the serial engine's answers there are the reference the others are checked against.
    levels = sorted({int(x) for x in args.levels.split(",")} | {1, args.goal_concurrency})
    tokenizer_from = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
    if tokenizer_from is None:
        sys.exit(f"{DEFAULT_MODEL} (whose tokenizer the models use) is not in the Hugging Face cache: run `make model`")
    jobs = make_requests(args.requests, args.new_tokens)

    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-hybrid-") as scratch:
        for family in families:
            folder = Path(scratch) / family
            built = time.perf_counter()
            model = write_model(folder, family, tokenizer_from, args.dtype)
            model["build_s"] = time.perf_counter() - built
            runs.append(run_family(family, folder, model, args, jobs, levels))

    report = {
        "mode": "in-process handler (streaming); generate in the same process",
        "dtype": args.dtype,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "levels": levels,
        "rounds": args.rounds,
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "seconds": time.perf_counter() - started,
        "runs": runs,
    }
    print(
        f"{report['machine']['device']}, {report['machine']['cores']} cores; {args.requests} greedy chat requests of "
        f"up to {args.new_tokens} tokens, streamed; medians of {args.rounds} round(s); = serial: answers equal to "
        "the serial engine's at concurrency 1"
    )
    for run in runs:
        print_family(run, args.dtype, args.rounds)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
