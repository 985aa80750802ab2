"""The benchmark programs: they run end to end on the tiny model and write what they promise (no timings
asserted), and the cold-start benchmark reads the worker's startup table from its log, so the two must stay in
step."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker_transformers.startup.budget import InitBudget

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_render_benchmark_compares_the_renderer_with_in_process_rendering(tiny_model_dir, tmp_path):
    out = tmp_path / "render.json"
    proc = subprocess.run(
        [sys.executable, "bench/render.py", "--model", str(tiny_model_dir), "--json", str(out)]
        + ["--requests", "20", "--rounds", "2", "--concurrency", "1,2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [(row["case"], row["threads"]) for row in report["rows"]] == [
        ("chat", 1), ("chat", 2), ("chat+tools", 1), ("chat+tools", 2)
    ]  # fmt: skip
    for row in report["rows"]:
        assert row["in_process_us"] > 0 and row["renderer_us"] > 0
        assert row["overhead_us"] == pytest.approx(row["renderer_us"] - row["in_process_us"])
    assert all(len(samples) == 2 for samples in report["samples"].values())
    assert "in-process us" in proc.stdout


@pytest.mark.slow
def test_serve_benchmark_writes_its_table_json_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [
            sys.executable,
            "bench/serve.py",
            "--json",
            str(out),
            "--requests",
            "4",
            "--levels",
            "1,2",
            "--new-tokens",
            "8",
            "--dtypes",
            "float32",
            "--cb-configs",
            "1",
            "--no-step-overhead",
            "--rounds",
            "2",
            "--goal-concurrency",
            "2",
        ],  # fmt: skip
        cwd=ROOT,
        env={**os.environ, "MODEL_NAME": str(tiny_model_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert {"throughput_tok_s", "ttft_p50_s", "latency_p50_s", "latency_p99_s"} <= set(level)
        assert level["output_tokens"] > 0
    assert report["serial_throughput_tok_s"] == report["levels"][0]["throughput_tok_s"]
    [run] = report["runs"]
    assert set(run["worker"]) == {"batch", "continuous", "serial"}
    assert {kind: details["engine"] for kind, details in run["worker_details"].items()} == {
        "batch": "batch",
        "continuous": "continuous",
        "serial": "serial",
    }
    assert [level["concurrency"] for level in run["worker"]["serial"]] == [1]
    assert [level["concurrency"] for level in run["worker"]["continuous"]] == [1, 2]
    [generate_batch] = run["transformers"]["generate_batch"]
    assert generate_batch["output_tokens"] > 0 and run["transformers"]["generate_serial"]["output_tokens"] > 0
    h2h = run["head_to_head"]
    assert (h2h["engine"], h2h["concurrency"], len(h2h["samples"])) == ("batch", 2, 2)
    assert h2h["generate_batch_config"] == generate_batch["config"]
    assert set(h2h["median_ratio"]) == {"x_generate_batch", "x_generate", "itl_p99_over_c1_p50"}
    assert all(h2h["median"][key] > 0 for key in ("worker_tok_s", "generate_batch_tok_s", "generate_tok_s"))
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "serial baseline" in proc.stdout


def load_bench(name: str = "coldstart"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


def test_the_benchmark_reads_every_phase_of_the_startup_table():
    clock = Clock()
    budget = InitBudget(420, clock=clock, age_s=0.25)
    with budget.phase("resolve"):
        clock.now += 0.5
    budget.begin("prefetch")  # still running at ready
    with budget.phase("warm-up"):
        clock.now += 1.25
    budget.ready()
    log = ["2026-01-01 00:00:00,000 INFO worker_transformers.startup.budget: " + budget.table(), "INFO   | Job result"]
    phases = load_bench().parse_timeline("\n".join(log).splitlines())
    assert phases == [
        {"name": "resolve", "start_s": 0.25, "seconds": 0.5},
        {"name": "prefetch", "start_s": 0.75, "seconds": 1.25},
        {"name": "warm-up", "start_s": 0.75, "seconds": 1.25},
        {"name": "ready", "start_s": 2.0, "seconds": 2.0},
    ]


def case(cache, gb, **median):
    base = {"ready_s": 2.0, "naive_ready_s": 4.0, "import_floor_s": 2.5, "raw_read_s": 1.0, "weights_s": 0.5}
    return {"cache": cache, "weights_gb": gb, "median": {**base, **median}}


def test_goals_are_ratios_to_baselines_of_the_same_run_and_placement_counts_only_on_a_gpu():
    bench = load_bench()
    cases = {
        "big/warm": case("warm", 16.0, weights_s=0.5),
        "small/warm": case("warm", 1.0),
        "big/cold": case("cold", 16.0),
    }
    on_cpu = bench.goals(cases, gpu=False)
    assert not any("placement" in v["goal"] for v in on_cpu)
    naive = {v["case"]: v for v in on_cpu if v["goal"] == "ready <= 0.6 x naive"}
    assert naive["big/warm"]["ratio"] == 0.5 and naive["big/warm"]["met"]
    [placement] = [v for v in bench.goals(cases, gpu=True) if "placement" in v["goal"]]
    assert placement["case"] == "big/warm" and placement["gb_s"] == 32.0 and placement["met"]
    cases["big/warm"]["median"]["weights_s"] = 1.0  # 16 GB/s
    [placement] = [v for v in bench.goals(cases, gpu=True) if "placement" in v["goal"]]
    assert not placement["met"]


@pytest.mark.slow
def test_step_overhead_benchmark_measures_the_batcher_and_the_one_before(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/step_overhead.py", "--batch", "4", "--steps", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["batch"] == 4 and "batcher" in report["engines"]
    for row in report["engines"].values():
        assert row["greedy_host_ms"] > 0 and row["sampled_host_ms"] > 0 and row["forward_ms"] > 0


def test_hybrid_benchmark_models_have_about_100m_parameters_and_qwen3_5s_layer_pattern():
    import torch
    from transformers import AutoModelForCausalLM

    bench = load_bench("serve_hybrid")
    tokens = {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    for family, make_config in bench.FAMILIES.items():
        config = make_config(tokens)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        assert 90e6 < parameters < 110e6, family
    layers = bench.FAMILIES["qwen3_5_text"](tokens).layer_types
    assert layers == (["linear_attention"] * 3 + ["full_attention"]) * (len(layers) // 4)


def worker_row(name, concurrency, tok_s, answers=None):
    latencies = {f"{m}_p{q}_s": 0.1 for m in ("ttft", "itl") for q in (50, 99)}
    row = {"row": name, "concurrency": concurrency, "requests": 2, "throughput_tok_s": tok_s, **latencies}
    return {**row, "engine": name.removeprefix("ENGINE="), "answers": answers} if answers else row


def test_hybrid_benchmark_checks_answers_against_the_serial_engine_and_takes_medians_of_round_ratios():
    bench = load_bench("serve_hybrid")
    rounds = []
    for batch, serial in ((40.0, 10.0), (90.0, 10.0), (30.0, 5.0)):
        rows = [
            worker_row("ENGINE=batch", 8, batch, ["a", "c"]),
            worker_row("ENGINE=serial", 1, serial, ["a", "b"]),
            worker_row("ENGINE=serial", 8, serial, ["a", "b"]),
        ]
        bench.check_answers(rows)
        rounds.append([*rows, worker_row(bench.GENERATE, 1, 12.0)])
    batch = rounds[0][0]
    assert batch["equal_answers"] == 1 and batch["first_difference"] == {"request": 1, "this": "c", "serial": "b"}
    assert not any("answers" in row for row in rounds[0])
    rows = bench.medians(rounds)
    summary = bench.summary(rounds, rows, 8)
    assert rows[0]["throughput_tok_s"] == 40.0 and summary["batch_tok_s"] == 40.0 and summary["serial_tok_s"] == 10.0
    assert summary["batch_over_serial"] == 6.0  # the rounds' ratios 4, 9 and 6, not 40 / 10
    assert summary["batch_equal_answers"] == 1


def test_hybrid_benchmark_reports_a_refused_batch_engine_without_a_ratio(capsys):
    bench = load_bench("serve_hybrid")
    refused = {"row": "ENGINE=batch", "refused": "ENGINE=batch, but this model cannot be batched: ..."}
    rows = [refused, worker_row("ENGINE=serial", 8, 10.0, ["a", "b"])]
    bench.check_answers(rows)
    rounds = [[*rows, worker_row(bench.GENERATE, 1, 12.0)]]
    run = {"family": "mamba2", "architecture": "Mamba2ForCausalLM", "parameters": 98e6, "rows": bench.medians(rounds)}
    run["summary"] = bench.summary(rounds, run["rows"], 8)
    assert run["summary"]["batch_over_serial"] is None and run["summary"]["batch_tok_s"] is None
    bench.print_family(run, "float32", 1)
    out = capsys.readouterr().out
    assert "ENGINE=batch       refused: ENGINE=batch, but this model cannot be batched" in out
    assert "no ratio, ENGINE=batch refused" in out


def test_vision_benchmark_model_has_a_100m_text_model_a_small_vision_tower_and_images_of_64_to_256_tokens():
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    bench = load_bench("serve_vision")
    args = bench.arguments([])
    config, image_processor = bench.vlm_config(bench.vision_tokenizer("tiny"), args)
    config.text_config.vocab_size = 49156  # the default model's tokenizer and Qwen's four vision tokens
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert 90e6 < sum(p.numel() for p in model.parameters()) - vision < 110e6
    assert 2e6 < vision < 10e6
    tokens = [bench.image_tokens(image_processor, image) for image in bench.sample_images()]
    assert all(64 <= n <= args.image_tokens <= 256 for n in tokens) and len(set(tokens)) > 1


@pytest.mark.slow
def test_vision_benchmark_runs_image_requests_through_both_engines_and_generate_with_equal_answers(tmp_path):
    out = tmp_path / "serve_vision.json"
    tiny = ["--tokenizer", "tiny", "--hidden", "64", "--layers", "2", "--vision-depth", "1", "--vision-hidden", "64",
            "--image-tokens", "16", "--requests", "3", "--new-tokens", "4", "--levels", "1,2"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "bench/serve_vision.py", "--json", str(out), *tiny],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["levels"] == [1, 2] and report["machine"]["cores"] > 0
    assert report["model"]["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert all(0 < n <= 16 for n in report["model"]["image_tokens"])
    rows = [(row["row"], row["concurrency"]) for row in report["rows"]]
    assert rows == [("ENGINE=batch", 1), ("ENGINE=batch", 2), ("ENGINE=serial", 1), ("ENGINE=serial", 2),
                    ("generate, serial", 1)]  # fmt: skip
    assert [row.get("engine") for row in report["rows"]] == ["batch", "batch", "serial", "serial", None]
    for row in report["rows"]:
        assert row["equal_answers"] == 3, row.get("first_difference")
        assert row["output_tokens"] > 0 and row["throughput_tok_s"] > 0 and row["ttft_p50_s"] > 0
    for level in report["summary"]:
        assert level["batch_over_serial"] > 0 and level["batch_over_generate"] > 0
        assert level["batch_equal_answers"] == 3
    assert "batch / serial engine" in proc.stdout and "image tokens per image" in proc.stdout


def test_the_gpu_check_says_it_needs_cuda_where_there_is_none():
    proc = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr
