"""The Hugging Face cache layout (`models--ORG--NAME/snapshots/<commit>`), read with huggingface_hub's own
helpers: RunPod's cached models and the local cache are both laid out this way. Light: huggingface_hub is
imported only when a cache is looked at."""

from __future__ import annotations

from pathlib import Path


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    """The folder a cache keeps `repo_id` in, whether or not it exists."""
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")


def snapshot(cache_dir: Path, repo_id: str, revision: str | None, newest_if_no_ref: bool) -> Path | None:
    """The snapshot folder of `repo_id` in a Hugging Face cache, found by huggingface_hub's own lookup
    (refs/<revision>, or snapshots/<commit>). When there is no ref for main and `newest_if_no_ref` is set,
    fall back to the newest snapshot (RunPod's cache has been seen without refs)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    if isinstance(config, str):
        return Path(config).parent
    snapshots = repo_folder(cache_dir, repo_id) / "snapshots"
    if revision is None and newest_if_no_ref and snapshots.is_dir():
        candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
        if candidates:
            return max(candidates, key=lambda s: s.stat().st_mtime)
    return None
