"""The safetensors files of a model folder: which files, how big, where each tensor's bytes are.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Reading only the headers (a few kB) tells the prefetcher what to
read, lets the loader stream raw byte ranges to the device, and catches a truncated or damaged copy before
anything is loaded, with a message that says what to do. Light on purpose (no torch).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from worker_transformers.model.errors import CorruptWeights, UnsupportedWeights
from worker_transformers.model.manifest import outside

# Bytes per element of each safetensors dtype the loader can place.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
# The floating dtypes, by their torch names: the ones DTYPE converts.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors spelling: BF16, F32, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class WeightFile:
    path: Path
    size: int
    data_start: int
    tensors: tuple[TensorEntry, ...]  # in file order


def weight_map(folder: Path, model_id: str) -> dict[str, str] | None:
    """The sharded checkpoint's index: tensor name -> shard file name. None when the folder has no index.
    Raises UnsupportedWeights naming the field of an index that is malformed or names a file outside `folder`."""
    index = folder / INDEX
    if not index.is_file():
        return None
    try:
        mapping = json.loads(index.read_text()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise _bad_index(model_id, index, "is not a JSON object") from None
    if not isinstance(mapping, dict):
        raise _bad_index(model_id, index, 'has no "weight_map" object of tensor names to file names')
    for tensor, shard in mapping.items():
        if why := outside(folder, shard):
            raise _bad_index(model_id, index, f"weight_map[{tensor!r}] = {shard!r} {why}")
    return mapping


def _bad_index(model_id: str, index: Path, what: str) -> UnsupportedWeights:
    return UnsupportedWeights(
        f"{model_id}: {index} {what}; the copy is damaged: fetch the model again (rebuild the image if it is baked)"
    )


def weight_paths(folder: Path, model_id: str = "the model") -> list[Path]:
    """The model's safetensors files: those its index names, else every *.safetensors in the folder."""
    mapping = weight_map(folder, model_id)
    if mapping is not None:
        return [folder / name for name in sorted(set(mapping.values()))]
    return sorted(folder.glob("*.safetensors"))


def _damaged(path: Path, model_id: str, reason: str) -> CorruptWeights:
    return CorruptWeights(
        f"{model_id}: {path} {reason}; the copy is incomplete or damaged: delete it and fetch the model again "
        "(rebuild the image if it is baked)"
    )


def read_header(path: Path, model_id: str) -> WeightFile:
    """Parse and check one file's header against its size. Raises CorruptWeights."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, model_id, f"has {size} bytes, too few for a safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _damaged(
                path, model_id, f"is truncated or not safetensors (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _damaged(path, model_id, "has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise _damaged(path, model_id, "has a header that is not a JSON object")
    data_start = 8 + header_len
    tensors = sorted(
        (_entry(path, model_id, name, spec, data_start) for name, spec in header.items() if name != "__metadata__"),
        key=lambda t: t.start,
    )
    expected_end = data_start
    for tensor in tensors:
        if tensor.start != expected_end:
            raise _damaged(path, model_id, f"has tensor byte ranges that overlap or leave gaps (at {tensor.name})")
        expected_end = tensor.end
    if size < expected_end:
        raise _damaged(path, model_id, f"is truncated: it has {size} bytes and its header says {expected_end}")
    if size > expected_end:
        raise _damaged(path, model_id, f"has {size - expected_end} bytes more than its header describes")
    return WeightFile(path, size, data_start, tuple(tensors))


def _entry(path: Path, model_id: str, name: str, spec: object, data_start: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]  # type: ignore[index]
        valid = (
            dtype in DTYPE_SIZES
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and end - begin == math.prod(shape) * DTYPE_SIZES[dtype]
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise _damaged(path, model_id, f"has a malformed header entry for {name!r}")
    return TensorEntry(name, dtype, shape, data_start + begin, data_start + end)


def inspect(folder: Path, model_id: str) -> list[WeightFile]:
    """Every weight file of the folder, checked. Raises CorruptWeights (or UnsupportedWeights)."""
    files = [read_header(path, model_id) for path in weight_paths(folder, model_id)]
    if not files:
        raise UnsupportedWeights(f"{model_id}: {folder} has no .safetensors weights")
    mapping = weight_map(folder, model_id)
    if mapping is not None:
        held = {(f.path.name, t.name) for f in files for t in f.tensors}
        for name, shard in mapping.items():
            if (shard, name) not in held:
                raise _damaged(folder / shard, model_id, f"lacks {name!r}, which the index places there")
    return files


def total_bytes(files: list[WeightFile]) -> int:
    return sum(f.size for f in files)
