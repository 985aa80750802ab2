"""`python -m worker_transformers.advisor` as a user runs it: arguments, the model's own files (a folder, real
Hugging Face cache trees, the default model), the cold-start benchmark's JSON, the table and the JSON."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker_transformers.advisor.cli import main
from worker_transformers.config import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ["--requests-per-minute", "6", "--request-seconds", "30"]
KEYS = {"active_workers", "max_workers", "queue_delay_s", "gpu_pools", "init_timeout_s", "model_source"}


@pytest.fixture
def advise(capsys, tmp_path):
    """Run the advisor in-process; returns (exit code, stdout, stderr). The Hub is never asked."""
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "RUNPOD_CACHE_DIR": str(tmp_path / "runpod-cache")}

    def run(*argv: str, **env: str):
        try:
            code = main(list(argv), env={**base, **env})
        except SystemExit as stop:
            code = stop.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def as_json(advise, *argv, **env) -> dict:
    code, out, err = advise(*WORKLOAD, *argv, "--json", **env)
    assert code == 0, err
    return json.loads(out)


def hub_cache_tree(cache: Path, repo_id: str, model: Path, ref: str | None = "main") -> Path:
    """A model's files laid out as a Hugging Face cache entry, the way RunPod and huggingface_hub hold them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def test_the_json_holds_every_setting_and_the_worked_example(advise):
    report = as_json(advise)
    assert KEYS <= set(report) and set(report["reasons"]) == KEYS
    assert report["active_workers"] == 3  # 6 requests/min x 30 s / 60
    assert report["max_workers"] == 4
    assert report["queue_delay_s"] == 4
    assert report["init_timeout_s"] == 420
    assert all(isinstance(p, str) for p in report["gpu_pools"]) and report["gpu_pools"]
    assert report["model_source"] == "cached"  # the default model is public on the Hub
    assert report["model"]["name"] == DEFAULT_MODEL


def test_the_table_gives_each_setting_a_value_and_a_reason(advise):
    code, out, _ = advise(*WORKLOAD, "--peak-concurrency", "10")
    assert code == 0
    rows = out.splitlines()[2:]
    labels = ["Active workers", "Max workers", "Queue delay", "GPUs", "RUNPOD_INIT_TIMEOUT", "Model source"]
    assert [row.split("  ")[0] for row in rows] == labels
    assert all(len(re.split(r"\s{2,}", row)) == 3 for row in rows), "every row has a value and a reason"


@pytest.mark.slow
def test_the_default_models_real_files_fit_the_cheapest_pool_until_the_batch_grows(advise, default_model_path):
    assert as_json(advise)["gpu_pools"][0] == "AMPERE_16"
    big = as_json(advise, "--max-concurrency", "32", "--max-input-tokens", "16384", "--max-new-tokens", "4096")
    assert big["gpu_pools"] and big["gpu_pools"][0] != "AMPERE_16"
    assert "32 jobs x 20480 tokens" in big["reasons"]["gpu_pools"]


def test_a_model_folder_is_sized_from_its_files_and_baked(advise, tiny_model_dir):
    report = as_json(advise, "--model", str(tiny_model_dir))
    assert report["model"]["found"] == f"folder {tiny_model_dir}"
    assert report["gpu_pools"][0] == "AMPERE_16"
    assert report["model_source"] == "baked"  # a folder is not on the Hub
    assert report["model"]["stored_bytes"] == (
        tiny_model_dir / "model.safetensors"
    ).stat().st_size - 8 - json_header_size(tiny_model_dir / "model.safetensors")


def json_header_size(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def test_a_hub_id_is_read_from_the_local_hugging_face_cache(advise, tiny_model_dir, tmp_path):
    snapshot = hub_cache_tree(tmp_path / "hf", "Org/Tiny", tiny_model_dir)
    report = as_json(advise, "--model", "Org/Tiny", HF_HUB_CACHE=str(tmp_path / "hf"))
    assert report["model"]["found"] == f"cache {snapshot}"
    assert report["model_source"] == "cached"


def test_a_hub_id_is_read_from_runpods_cache_lowercased_and_without_refs(advise, tiny_model_dir, tmp_path):
    snapshot = hub_cache_tree(tmp_path / "runpod-cache", "org/tiny", tiny_model_dir, ref=None)
    report = as_json(advise, "--model", "Org/Tiny", HF_HUB_CACHE=str(tmp_path / "empty"))
    assert report["model"]["found"] == f"cache {snapshot}"


def test_private_models_are_baked(advise, tiny_model_dir, tmp_path):
    hub_cache_tree(tmp_path / "hf", "Org/Tiny", tiny_model_dir)
    assert (
        as_json(advise, "--model", "Org/Tiny", "--private", HF_HUB_CACHE=str(tmp_path / "hf"))["model_source"]
        == "baked"
    )


def test_a_snapshot_without_its_weights_is_not_used_and_the_error_names_both_caches(advise, tiny_model_dir, tmp_path):
    snapshot = hub_cache_tree(tmp_path / "hf", "Org/Tiny", tiny_model_dir)
    (snapshot / "model.safetensors").unlink()
    code, _, err = advise(*WORKLOAD, "--model", "Org/Tiny", HF_HUB_CACHE=str(tmp_path / "hf"))
    assert code == 2
    assert f"local Hugging Face cache ({tmp_path / 'hf'})" in err and "runpod-cache" in err
    assert "HF_HUB_OFFLINE is set" in err and "Traceback" not in err


def test_a_hub_id_that_is_nowhere_gets_the_hubs_answer_and_exit_2(advise, tmp_path):
    # Not offline: the Hub is asked, and whether it is unreachable or knows no such repo, the user is told.
    code, _, err = advise(
        *WORKLOAD, "--model", "worker-transformers-tests/no-such-model", HF_HUB_OFFLINE="0",
        HF_HUB_CACHE=str(tmp_path / "hf"),
    )  # fmt: skip
    assert code == 2
    assert "worker-transformers-tests/no-such-model@main: not in the local Hugging Face cache" in err
    assert "the Hub did not answer (" in err and "Traceback" not in err


def test_the_measured_cold_start_sets_the_init_timeout(advise, tmp_path):
    coldstart = tmp_path / "coldstart.json"
    phases = {"imports": 8.1, "weights": 30.0}
    report = {"ready_s": 95.2, "naive_ready_s": 240.0, "import_floor_s": 8.1, "raw_read_s": 20.0, "weights_s": 30.0}
    coldstart.write_text(json.dumps({**report, "phases": phases}))
    advice = as_json(advise, "--coldstart-json", str(coldstart))
    assert advice["init_timeout_s"] == 191
    assert "95.2 s x 2" in advice["reasons"]["init_timeout_s"]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read it"),
        ("not json", "not JSON"),
        ('{"naive_ready_s": 3}', "needs a top-level ready_s"),
        ('{"ready_s": "fast"}', "needs a top-level ready_s"),
        ('{"ready_s": true}', "needs a top-level ready_s"),
        ('{"ready_s": -4}', "needs a top-level ready_s"),
        ('[{"ready_s": 4}]', "needs a top-level ready_s"),
    ],
)
def test_a_bad_coldstart_json_is_refused_with_exit_2(advise, tmp_path, content, says):
    path = tmp_path / "coldstart.json"
    if content is not None:
        path.write_text(content)
    code, _, err = advise(*WORKLOAD, "--coldstart-json", str(path))
    assert code == 2
    assert f"--coldstart-json {path}: " in err and says in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--request-seconds", "30"], "--requests-per-minute"),
        (["--requests-per-minute", "-6", "--request-seconds", "30"], "'-6' must be above 0"),
        (["--requests-per-minute", "6", "--request-seconds", "half a minute"], "'half a minute' is not a number"),
        (["--requests-per-minute", "6", "--request-seconds", "nan"], "'nan' must be above 0"),
        ([*WORKLOAD, "--peak-concurrency", "2"], "--peak-concurrency 2 is below the average of 3.00"),
        ([*WORKLOAD, "--jobs-per-worker", "1.5"], "'1.5' is not a whole number"),
        ([*WORKLOAD, "--jobs-per-worker", "9"], "more than MAX_CONCURRENCY=8"),
        ([*WORKLOAD, "--max-concurrency", "0"], "--max-concurrency='0' is not allowed; use a whole number from 1"),
        ([*WORKLOAD, "--dtype", "fp8"], "invalid choice: 'fp8'"),
        ([*WORKLOAD, "--model", "../my model"], "--model='../my model' is not allowed"),
        ([*WORKLOAD, "--model", "/no/such/folder"], "--model /no/such/folder: no such folder"),
    ],
)
def test_a_bad_argument_gets_one_clear_line_and_exit_2(advise, argv, says):
    code, out, err = advise(*argv)
    assert code == 2 and out == ""
    assert says in err and "Traceback" not in err


def test_a_bad_setting_in_the_environment_is_named(advise):
    code, _, err = advise(*WORKLOAD, MAX_CONCURRENCY="lots")
    assert code == 2 and "MAX_CONCURRENCY='lots' is not allowed" in err


def test_the_module_runs_as_a_command_without_torch():
    script = (
        "import sys\n"
        "from worker_transformers.advisor.cli import main\n"
        f"code = main({[*WORKLOAD, '--json']!r})\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), 'the advisor imported torch'\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["active_workers"] == 3
    bad = subprocess.run(
        [sys.executable, "-m", "worker_transformers.advisor", "--requests-per-minute", "x"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "usage:" in bad.stderr


def test_the_readme_example_shows_what_the_advisor_prints(advise):
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\$ python -m worker_transformers\.advisor (.+)\n((?:.+\n)+?)```", readme)
    assert block, "the README shows no advisor run"
    code, out, _ = advise(*block[1].split())
    assert code == 0

    def settings(text: str) -> list[list[str]]:
        rows = [re.split(r"\s{2,}", line) for line in text.splitlines() if re.match(r"^[A-Z][\w ]+\s{2,}\S", line)]
        # the reasons too, but for the model source's, whose wording depends on whether the Hub answered
        return [row[:2] if row[0] == "Model source" else row[:3] for row in rows]

    assert settings(block[2]) == settings(out) and len(settings(out)) == 6
