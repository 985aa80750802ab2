"""The benchmark programs run end to end on the tiny model and write what they promise (no timings asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_benchmark_writes_its_table_json_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, "bench/serve.py", "--json", str(out), "--requests", "4", "--levels", "1,2"],
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
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert "serial baseline" in proc.stdout
