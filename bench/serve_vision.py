"""Image requests through the worker: the batch engine against the serial engine and `generate`.

    python bench/serve_vision.py [--requests 16] [--new-tokens 32] [--levels 1,8] [--rounds 1] [--dtype float32]
        [--tokenizer default] [--hidden 768] [--layers 10] [--vision-depth 4] [--vision-hidden 256]
        [--image-tokens 144] [--json PATH]

A Qwen 2.5-VL model of seeded random weights is written as a real model folder (safetensors, its config, processor
and chat template) to a temporary directory: tests/tiny_vlms.py's Qwen 2.5-VL scaled up to a text model of about
100M parameters (768 wide, 10 layers, the default model's tokenizer of 49,152 tokens) and a vision tower 4 blocks
deep and 256 wide, whose image processor makes each image at most --image-tokens tokens. Each chat request carries
one of a few generated images (a PNG data URL) and a short question, greedy, up to --new-tokens new tokens.

Then, side by side, in each of --rounds rounds (bench/serve_hybrid.py's rows): the worker started through its real
startup with ENGINE=batch (an image prompt's prefill runs in a forward of its own with its pixels; it then decodes
in the batch) and then ENGINE=serial (transformers' `generate`, one request at a time), the same requests streamed
through its real handler at each concurrency level, and transformers' processor and `generate` outside the worker,
one request after another. Every row's answers are compared with the serial engine's at concurrency 1: greedy, in
float32 they should be equal. Prints a table and a summary line per level, writes JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
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
sys.path.insert(0, str(ROOT))  # tests/tiny_vlms.py, whose Qwen 2.5-VL this model scales up

from serve import cpu_flags, machine, percentiles  # noqa: E402
from serve_hybrid import ENGINES, GENERATE, Stamps, check_answers, medians, summary, tok_s, worker_rows  # noqa: E402

from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402

QUESTIONS = ["What is in the picture?", "Describe this image in one sentence.", "Which colors do you see?"]
# Qwen 2.5-VL's vision geometry: 14-pixel patches, 2x2 of them merged into one image token (28x28 pixels).
PATCH, MERGE = 14, 2
UNIT = PATCH * MERGE
HEAD_DIM = 64  # text and vision heads; the text's multimodal RoPE splits its 32 frequencies as below
MROPE_SECTION = [8, 12, 12]
VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def sample_images() -> list:
    """Four distinct RGB pictures of different shapes, larger than the processor's limit, so that each is scaled
    down to at most --image-tokens tokens, keeping its aspect: a gradient, a checkerboard, blocks of seeded noise and
    rings."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, 448, dtype=np.uint8)
    gradient = np.stack([np.tile(x, (336, 1)), np.tile(x[::-1], (336, 1)), np.full((336, 448), 96, np.uint8)], -1)
    squares = ((np.indices((448, 336)) // 32).sum(0) % 2 * 255).astype(np.uint8)
    checker = np.stack([squares, 255 - squares, np.full_like(squares, 200)], -1)
    blocks = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    yy, xx = np.indices((392, 504)) - np.array([196, 252])[:, None, None]
    ring = (np.hypot(yy, xx) // 20 % 2 * 255).astype(np.uint8)
    rings = np.stack([ring, np.full_like(ring, 64), 255 - ring], -1)
    return [Image.fromarray(a, "RGB") for a in (gradient, checker, blocks, rings)]


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_requests(count: int, new_tokens: int, images: list) -> tuple[list[dict], list[tuple[int, str]]]:
    """Greedy streamed chat requests, each one image and a question; and each one's (image index, question), for
    `generate` to ask the same."""
    urls = [data_url(image) for image in images]
    asked = [(i % len(images), QUESTIONS[i % len(QUESTIONS)]) for i in range(count)]
    jobs = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": urls[image]}}, {"type": "text", "text": q}],
                }
            ],
            "max_new_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
        }
        for image, q in asked
    ]
    return jobs, asked


def intermediate(hidden: int) -> int:
    """The MLP's width: 8/3 of `hidden` (Llama's and Qwen's proportion), in whole multiples of 64."""
    return 64 * max(1, round(hidden * 8 / 3 / 64))


def vlm_config(tok, args):
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.tiny_vlms import _ids

    start, end, image, video = _ids(tok, *VISION_SPECIALS)
    tokens = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    heads = max(1, args.hidden // HEAD_DIM)
    text = dict(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=intermediate(args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION},
        **tokens,
    )
    # The real vision tower's layout, narrowed: windowed attention in every block but the last, 112-pixel windows.
    vision = {
        "depth": args.vision_depth,
        "hidden_size": args.vision_hidden,
        "intermediate_size": intermediate(args.vision_hidden),
        "num_heads": max(1, args.vision_hidden // HEAD_DIM),
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "window_size": 4 * UNIT,
        "out_hidden_size": args.hidden,
        "fullatt_block_indexes": [args.vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
        tie_word_embeddings=True,
        **tokens,
    )
    # An image becomes (height / 28) x (width / 28) tokens, scaled down (aspect kept) to at most --image-tokens.
    pixels = {"shortest_edge": 4 * UNIT * UNIT, "longest_edge": args.image_tokens * UNIT * UNIT}
    processor = Qwen2VLImageProcessorPil(size=pixels, patch_size=PATCH, temporal_patch_size=2, merge_size=MERGE)
    return config, processor


def vision_tokenizer(which: str):
    """A text tokenizer with Qwen's vision tokens added and Qwen's chat template (tiny_vlms' own): the default model's
    (ChatML, as Qwen's chat is) or tiny_vlms' byte-level one of a few hundred tokens (no download; for the tests)."""
    from tests.tiny_vlms import QWEN_TEMPLATE, _tokenizer

    if which == "tiny":
        from tests.tiny_tokenizers import byte_level_tokenizer as base
    else:
        from transformers import AutoTokenizer

        snapshot = hf_cache.snapshot(hf_hub_cache_dir(os.environ), DEFAULT_MODEL, None, newest_if_no_ref=False)
        if snapshot is None:
            sys.exit(
                f"{DEFAULT_MODEL} (whose tokenizer the model uses) is not in the Hugging Face cache: run `make model`"
            )

        def base():
            return AutoTokenizer.from_pretrained(snapshot)

    tok = _tokenizer(base, VISION_SPECIALS)
    tok.chat_template = QWEN_TEMPLATE
    return tok


def image_tokens(image_processor, image) -> int:
    """The tokens `image` becomes: its grid of patches (frames x rows x columns), merged 2x2."""
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // MERGE**2


def write_model(folder: Path, args, images: list) -> dict:
    """The scaled-up Qwen 2.5-VL of seeded random weights saved to `folder` as tiny_vlms.make_tiny_vlm saves its own
    (processor, image processor and chat template beside the weights); returns what the report says of it."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from tests.tiny_vlms import QWEN_TEMPLATE, build_processor

    tok = vision_tokenizer(args.tokenizer)
    config, image_processor = vlm_config(tok, args)
    processor = build_processor(
        Qwen2_5_VLProcessor,
        config.model_type,
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).to(getattr(torch, args.dtype)).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_parameters": vision,
        "vocab_size": len(tok),
        "image_tokens": [image_tokens(image_processor, image) for image in images],
    }


def generate_row(folder: Path, dtype: str, jobs: list[dict], asked: list[tuple[int, str]], images: list) -> dict:
    """transformers' own processor and `generate` on the same chats, one after another, timed per token like the
    worker; its answers kept for the check against the serial engine's."""
    import torch
    from transformers import GenerationConfig

    from tests.tiny_vlms import image_message, load

    processor, model = load(folder)
    model = model.to(getattr(torch, dtype))
    tokenizer = processor.tokenizer
    prompts = [
        processor.apply_chat_template(
            image_message(images[image], q),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        for image, q in asked
    ]

    def run(inputs, max_new_tokens: int) -> dict:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        stamps, began = Stamps(), time.perf_counter()
        out = model.generate(**inputs, generation_config=config, streamer=stamps)
        arrivals = stamps.puts[1:]
        new = out[0, inputs["input_ids"].shape[1] :]
        return {"ttft": arrivals[0] - began, "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
                "latency": arrivals[-1] - began, "tokens": len(new),
                "answer": tokenizer.decode(new, skip_special_tokens=True)}  # fmt: skip

    with torch.inference_mode():
        run(prompts[0], 4)  # warm-up
        start = time.perf_counter()
        results = [run(inputs, jobs[0]["max_new_tokens"]) for inputs in prompts]
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
        "answers": [r["answer"] for r in results],
    }


def distinct_answers(rows: list[dict]) -> int | None:
    """How many different answers the serial engine gave at its first level: the check of equal answers means
    little where a random model says the same thing to every image."""
    reference = next((row["answers"] for row in rows if row.get("engine") == "serial"), None)
    return None if reference is None else len(set(reference))


def one_round(folder: Path, args, jobs: list[dict], asked, images, levels: list[int]) -> list[dict]:
    """Every row once, each worker closed before the next starts and before `generate` runs (serve_hybrid.py)."""
    rows = [row for kind in ENGINES for row in worker_rows(folder, kind, args.dtype, jobs, levels)]
    rows.append(generate_row(folder, args.dtype, jobs, asked, images))
    distinct = distinct_answers(rows)
    check_answers(rows)
    return [{**row, "distinct_answers": distinct} if row.get("engine") == "serial" else row for row in rows]


def level_summary(rounds: list[list[dict]], rows: list[dict], concurrency: int) -> dict:
    """serve_hybrid's summary at `concurrency` (ENGINE=batch over ENGINE=serial), and ENGINE=batch over serial
    `generate` outside the worker: the median of each round's ratio."""
    result = summary(rounds, rows, concurrency)
    ratios = [(tok_s(r, "ENGINE=batch", concurrency), tok_s(r, GENERATE, 1)) for r in rounds]
    result["batch_over_generate"] = (
        statistics.median(b / g for b, g in ratios) if all(b and g for b, g in ratios) else None
    )
    return result


def print_report(report: dict) -> None:
    m, model = report["machine"], report["model"]
    print(
        f"{m['device']}, {m['cores']} cores; {report['requests']} greedy chat requests, one image each, of up to "
        f"{report['new_tokens']} tokens, streamed; medians of {report['rounds']} round(s); = serial: answers equal "
        "to the serial engine's at concurrency 1"
    )
    print(
        f"\n{model['architecture']}: {model['parameters'] / 1e6:.1f}M parameters "
        f"({model['vision_parameters'] / 1e6:.1f}M vision), vocabulary {model['vocab_size']}, {report['dtype']}; "
        f"image tokens per image: {', '.join(map(str, model['image_tokens']))}"
    )
    print(f"{'':18} {'conc':>4} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} "
          f"{'= serial':>8}")  # fmt: skip
    for row in report["rows"]:
        if "refused" in row:
            print(f"{row['row']:18} refused: {row['refused']}")
            continue
        equal = f"{row['equal_answers']}/{row['requests']}" if "equal_answers" in row else "-"
        print(
            f"{row['row']:18} {row['concurrency']:>4} {row['throughput_tok_s']:>8.1f} {row['ttft_p50_s']:>9.3f} "
            f"{row['ttft_p99_s']:>9.3f} {row['itl_p50_s']:>8.4f} {row['itl_p99_s']:>8.4f} {equal:>8}"
        )
    distinct = next((row["distinct_answers"] for row in report["rows"] if row.get("engine") == "serial"), None)
    print(f"the serial engine's answers: {distinct} distinct of {report['requests']}")
    for s in report["summary"]:
        if s["batch_over_serial"] is None:
            print(f"concurrency {s['concurrency']}: no ratio (an engine refused)")
            continue
        over_generate = f"{s['batch_over_generate']:.2f}x" if s["batch_over_generate"] else "-"
        print(
            f"concurrency {s['concurrency']}: ENGINE=batch {s['batch_tok_s']:.1f} tok/s, ENGINE=serial "
            f"{s['serial_tok_s']:.1f}, generate {s['generate_tok_s']:.1f}; batch / serial engine "
            f"{s['batch_over_serial']:.2f}x, batch / generate {over_generate} (medians of rounds' ratios); answers "
            f"equal to the serial engine's: {s['batch_equal_answers']}/{s['requests']}"
        )


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve_vision.json")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every row; medians are reported")
    tokenizers = f"default: {DEFAULT_MODEL}'s (run `make model`); tiny: a byte-level one of ~400 tokens"
    parser.add_argument("--tokenizer", default="default", choices=("default", "tiny"), help=tokenizers)
    parser.add_argument("--hidden", type=int, default=768, help="the text model's width (heads of 64)")
    parser.add_argument("--layers", type=int, default=10, help="the text model's layers")
    parser.add_argument("--vision-depth", type=int, default=4, help="the vision tower's blocks")
    parser.add_argument("--vision-hidden", type=int, default=256, help="the vision tower's width")
    parser.add_argument("--image-tokens", type=int, default=144, help="the most tokens an image becomes")
    return parser.parse_args(argv)


def main() -> int:
    args = arguments()
    # Concurrency 1 first: the serial engine's answers there are the reference the others are checked against.
    levels = sorted({int(x) for x in args.levels.split(",")} | {1})
    images = sample_images()
    jobs, asked = make_requests(args.requests, args.new_tokens, images)

    started = time.perf_counter()
    rounds: list[list[dict]] = []
    with tempfile.TemporaryDirectory(prefix="serve-vision-") as scratch:
        folder = Path(scratch) / "qwen2_5_vl"
        built = time.perf_counter()
        model = write_model(folder, args, images)
        model["build_s"] = time.perf_counter() - built
        for number in range(1, args.rounds + 1):
            print(f"round {number} of {args.rounds}", file=sys.stderr, flush=True)
            rounds.append(one_round(folder, args, jobs, asked, images, levels))
    rows = medians(rounds)

    report = {
        "mode": "in-process handler (streaming); processor + generate in the same process",
        "dtype": args.dtype,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "levels": levels,
        "rounds": args.rounds,
        "machine": {**machine(), "cpu_flags": cpu_flags()},
        "model": model,
        "rows": rows,
        "summary": [level_summary(rounds, rows, c) for c in levels],
        "all_rounds": rounds,
        "seconds": time.perf_counter() - started,
    }
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
