"""Fetch a model's files into a folder, verified, with a manifest: the baked image's /models, or a volume folder.

    python builder/fetch_model.py SOURCE --out DIR [--model-id ID] [--revision REV] [--retries N]

SOURCE is a Hugging Face model id (downloaded from the Hub) or a local folder (copied). Only safetensors,
config and tokenizer files are taken. Every file is checked against its expected size and hash (the Hub's
sha256 for weights, its git blob id for small files; the source's sha256 for a folder), then `manifest.json`
(model id, revision, every file with its size and sha256) is written and the folder is renamed into place.
The work happens in a staging folder beside DIR: an interrupted run never leaves a DIR that looks complete,
and a rerun keeps the files it already verified. The token comes from the BuildKit secret file
/run/secrets/HF_TOKEN, else from HF_TOKEN in the environment, and is never printed.
Exit status: 0 when DIR holds the model, 1 with a one-line message on stderr otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from worker_transformers.model.manifest import (  # noqa: E402
    is_model_file,
    model_files,
    sha256,
    why_incomplete,
    write_manifest,
)

SECRET_FILE = Path("/run/secrets/HF_TOKEN")


class FetchError(Exception):
    """A failure the user can act on; the message is one line."""


@dataclass(frozen=True)
class Expected:
    path: str
    size: int
    sha256: str | None = None  # weights (LFS files) and folder copies
    git_blob: str | None = None  # small files on the Hub are identified by their git blob id


def read_token() -> str | None:
    if SECRET_FILE.is_file() and SECRET_FILE.read_text().strip():
        return SECRET_FILE.read_text().strip()
    return os.environ.get("HF_TOKEN", "").strip() or None


def verified_sha256(path: Path, expected: Expected, progress) -> str | None:
    """The file's sha256 when it has the expected size and hash, else None."""
    if not path.is_file() or path.stat().st_size != expected.size:
        return None
    digest = sha256(path, progress.update)
    if expected.sha256 is not None:
        return digest if digest == expected.sha256 else None
    blob = hashlib.sha1(b"blob %d\0" % expected.size + path.read_bytes()).hexdigest()
    return digest if blob == expected.git_blob else None


def with_retries(what: str, attempts: int, action):
    """Run `action` until it succeeds, waiting 1, 2, 4 ... s (at most 30) after each transient fault: no
    connection, a timeout, a cut transfer, HTTP 429 or 5xx. Any other error is raised as it is."""
    from httpx2 import HTTPError
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except HfHubHTTPError as error:
            status = http_status(error)
            if status is not None and status < 500 and status != 429:
                raise
            fault = f"HTTP {status}"
        except (HTTPError, ConnectionError, TimeoutError) as error:
            fault = type(error).__name__
        if attempt == attempts:
            raise FetchError(f"{what}: failed {attempts} times, last with {fault}; check the network and retry")
        wait = min(2 ** (attempt - 1), 30)
        print(f"{what}: {fault}, retrying in {wait} s ({attempt}/{attempts})", file=sys.stderr)
        time.sleep(wait)


def http_status(error) -> int | None:
    return error.response.status_code if error.response is not None else None


def refused(what: str, error) -> FetchError:
    """A one-line FetchError for an HTTP error the Hub will answer again. Only the status is kept: the
    error's own text can quote request details."""
    status = http_status(error)
    hint = "; check HF_TOKEN" if status in (401, 403) else ""
    return FetchError(f"{what}: the Hub answered HTTP {status}{hint}")


def hub_files(model_id: str, revision: str | None, token: str | None, attempts: int) -> tuple[str, list[Expected]]:
    """The commit `revision` points at, and the model files at that commit with their sizes and hashes."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    what = f"{model_id}@{revision or 'main'}"
    try:
        info = with_retries(
            what, attempts, lambda: HfApi(token=token).model_info(model_id, revision=revision, files_metadata=True)
        )
    except GatedRepoError:
        raise FetchError(f"{model_id} is gated: accept its terms on the Hub and pass HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise FetchError(f"{model_id} is not on the Hub or is private: check the id, or pass HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FetchError(f"{model_id} has no revision {revision!r}: check MODEL_REVISION") from None
    except HfHubHTTPError as error:
        raise refused(what, error) from None
    files = [
        Expected(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
        for s in info.siblings or []
        if is_model_file(s.rfilename)
    ]
    return info.sha, files


def folder_files(source: Path) -> list[Expected]:
    paths = model_files(source)
    check_weights(paths, str(source))
    with progress_bar("hashing the source", sum((source / p).stat().st_size for p in paths)) as bar:
        return [Expected(p, (source / p).stat().st_size, sha256(source / p, bar.update)) for p in paths]


def check_weights(paths: list[str], source: str) -> None:
    if not any(path.endswith(".safetensors") for path in paths):
        raise FetchError(
            f"{source} has no .safetensors weights; this worker loads safetensors only (pickle weights can run "
            "code when loaded): choose a revision with safetensors or convert the weights"
        )


def progress_bar(description: str, total: int):
    from tqdm import tqdm

    # Without a terminal (a docker build log) every redraw is a new line: redraw rarely there.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, mininterval=0.5 if interactive else 15)


def fetch(source: str, out: Path, model_id: str, revision: str | None, attempts: int) -> str:
    """Fill `out` with the model; return the closing line."""
    if why_incomplete(out, model_id, revision) is None:
        return f"{out} already holds {model_id}@{revision or 'main'}; nothing to do"
    staging = out.parent / f".{out.name}.partial"  # beside `out`, so the final rename stays on one filesystem
    local = Path(source)
    if local.is_dir():
        files = folder_files(local)

        def obtain(f: Expected) -> None:
            shutil.copyfile(local / f.path, staging / f.path)

    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError

        token = read_token()
        commit, files = hub_files(source, revision, token, attempts)
        check_weights([f.path for f in files], source)

        def obtain(f: Expected) -> None:
            try:
                with_retries(
                    f.path,
                    attempts,
                    lambda: hf_hub_download(source, f.path, revision=commit, local_dir=staging, token=token),
                )
            except HfHubHTTPError as error:
                raise refused(f.path, error) from None

    hashes = {}
    with progress_bar(f"{model_id}", sum(f.size for f in files)) as bar:
        for f in files:
            target = staging / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(attempts + 1):  # a file kept from an earlier run is checked before anything else
                hashes[f.path] = verified_sha256(target, f, bar)
                if hashes[f.path] is not None:
                    break
                if attempt == attempts:
                    raise FetchError(f"{f.path} does not match its expected size and hash after {attempts} tries")
                target.unlink(missing_ok=True)
                obtain(f)
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    for leftover in set(model_files(staging)) - set(hashes):  # from an earlier run for another source
        (staging / leftover).unlink()
    write_manifest(
        staging, model_id, revision, [{"path": f.path, "size": f.size, "sha256": hashes[f.path]} for f in files]
    )
    replace_folder(staging, out)
    total = sum(f.size for f in files) / 1e6
    return f"{out} holds {model_id}@{revision or 'main'}: {len(files)} files, {total:.1f} MB, sizes and hashes verified"


def replace_folder(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`. A previous `out` is moved aside first and removed after, so
    `out` is at every moment either absent or complete."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a Hugging Face model id, or a local folder holding the model")
    parser.add_argument("--out", type=Path, required=True, help="the folder to fill (e.g. /models)")
    parser.add_argument("--model-id", help="the model id recorded in the manifest (default: SOURCE, when an id)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--retries", type=int, default=5, help="tries per download before giving up")
    args = parser.parse_args(argv)
    model_id = args.model_id or args.source
    if Path(args.source).is_dir() and not args.model_id:
        parser.error("a folder SOURCE needs --model-id, the model id the worker will serve it as")
    try:
        print(fetch(args.source, args.out.resolve(), model_id, args.revision or None, max(args.retries, 1)))
    except FetchError as error:
        print(f"fetch_model: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, permissions: the file name is in the message, the token never is
        print(f"fetch_model: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
