"""The exceptions every part of the model's files raises: one home, below sources, download and volume,
so none of them imports another for its error types. Messages say what was found and what to do."""

import errno
import os


class ModelNotFound(Exception):
    """No source holds the model. The message lists every path tried and the setting that would fix it."""


class UnsupportedWeights(Exception):
    """The folder holds the model, but not in a form this worker loads (pickle weights, missing shards)."""


class CorruptWeights(UnsupportedWeights):
    """A weight file is truncated or is not valid safetensors. The message names the file and the fix."""


def storage_problem(error: OSError, setting: str) -> str | None:
    """What a filesystem error on a folder the worker writes means, and the fix; None for any other error."""
    path = error.filename or "the folder"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {mount_point(path)}: free some, or point {setting} at a larger disk"
    if error.errno == errno.EROFS:
        return f"{path} is on a read-only filesystem: point {setting} at a writable folder"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"{path} may not be written by this worker (permission denied): make it writable or change {setting}"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{path} (or a folder above it) exists as a file: remove it or point {setting} elsewhere"
    return None


def mount_point(path: str | os.PathLike) -> str:
    """The mount that holds `path` (or would, once created): /runpod-volume for a network volume."""
    current = os.path.abspath(path)
    while not os.path.ismount(current):
        current = os.path.dirname(current)
    return current
