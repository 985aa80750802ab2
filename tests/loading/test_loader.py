"""loader.py around the fast path: the model's code imported up front, the warm-up, and what running out
of memory is reported as."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from worker_transformers.config import Settings
from worker_transformers.loading.loader import (
    LoadError,
    _check_fits,
    build_model,
    import_model_code,
    load_weights,
    warm_up,
)
from worker_transformers.model.sources import ModelLocation
from worker_transformers.model.weights import inspect
from worker_transformers.startup.budget import human_bytes
from worker_transformers.startup.prefetch import host_memory_free

ROOT = Path(__file__).resolve().parents[2]


def location(path: Path) -> ModelLocation:
    return ModelLocation(path, "folder", "org/tiny", None)


def test_the_model_code_is_imported_before_loading(tiny_model_dir):
    code = (
        "import sys; from pathlib import Path\n"
        "from worker_transformers.config import Settings\n"
        "from worker_transformers.loading.loader import import_model_code\n"
        "from worker_transformers.model.sources import ModelLocation\n"
        f"path = Path({str(tiny_model_dir)!r})\n"
        "import_model_code(ModelLocation(path, 'folder', 'tiny', None), Settings.from_env({}))\n"
        "print('transformers.models.llama.modeling_llama' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src")}
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_a_model_with_its_own_code_is_refused_without_trust_remote_code(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my-own-llm", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="set TRUST_REMOTE_CODE=true if you trust it"):
        import_model_code(location(folder), Settings.from_env({}))


def test_warm_up_generates_through_the_chat_template(tiny_model_dir, tiny_engine):
    settings = Settings.from_env({"MODEL_NAME": str(tiny_model_dir)})
    files = inspect(tiny_model_dir, "tiny")
    model = load_weights(
        location(tiny_model_dir), settings, files, build_model(location(tiny_model_dir), settings, files)
    )
    warm_up(model, tiny_engine.tokenizer, tiny_engine.warm_up_ids())  # raises on failure


def test_a_model_larger_than_free_host_memory_is_refused_with_both_numbers(tiny_model_dir):
    free = host_memory_free()
    with pytest.raises(LoadError) as refused:
        _check_fits(location(tiny_model_dir), free + 10**12, torch.device("cpu"), torch.float32)
    need, has = re.search(r"the weights need ([\d.]+ [kMGT]?B), ([\d.]+ [kMGT]?B) is free", str(refused.value)).groups()
    assert need == human_bytes(free + 10**12) and has.endswith("GB")
    assert str(refused.value).startswith("org/tiny: not enough host memory on cpu")
    assert str(refused.value).endswith("use a smaller DTYPE (bfloat16), a device with more memory, or a smaller model")
