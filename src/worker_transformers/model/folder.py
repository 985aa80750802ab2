"""Is this folder a model the worker can load? The one check every source applies (sources, the Hub
download, the default-model builder): a readable config, tokenizer files and complete weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from worker_transformers.model.errors import UnsupportedWeights
from worker_transformers.model.weights import weight_map

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_folder(path: Path, model_id: str, allow_pickle: bool = False) -> None:
    """Raise UnsupportedWeights unless `path` holds a readable config, tokenizer files and complete
    safetensors weights (or, with `allow_pickle`, pickle weights)."""
    config = path / "config.json"
    if not config.is_file():
        raise UnsupportedWeights(f"{model_id}: {path} has no config.json; the copy is incomplete: fetch it again")
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise UnsupportedWeights(
            f"{model_id}: {config} is not valid JSON ({error}); the copy is damaged: fetch it again"
        ) from None
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UnsupportedWeights(
            f"{model_id}: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); the copy is incomplete: "
            "fetch the model again with its tokenizer files"
        )
    mapping = weight_map(path, model_id)
    if mapping is not None:
        shards = sorted(set(mapping.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise UnsupportedWeights(
                f"{model_id}: {path} is missing {len(missing)} of {len(shards)} weight shards ({missing[0]}, ...); "
                "the copy is incomplete: download it again"
            )
        return
    if any(path.glob("*.safetensors")):
        return
    pickles = pickle_weights(path)
    if pickles and allow_pickle:
        log.warning("%s: loading pickle weights (%s), as ALLOW_PICKLE_WEIGHTS allows", model_id, ", ".join(pickles))
        return
    if pickles:
        raise UnsupportedWeights(
            f"{model_id}: {path} has only pickle weights ({', '.join(pickles)}), which can run arbitrary code "
            "when loaded; this worker loads safetensors: choose a revision with .safetensors files, convert "
            "the weights with safetensors' convert script, or set ALLOW_PICKLE_WEIGHTS=true if you trust them"
        )
    raise UnsupportedWeights(f"{model_id}: {path} has no .safetensors weights")


def pickle_weights(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
