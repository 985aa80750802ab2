"""The fast path: an empty model of the right shape, then the checkpoint's bytes moved straight into it.

`from_pretrained` is general: it renames and fuses keys, quantizes, offloads, and walks every tensor through
that machinery. Most checkpoints need none of it: their tensor names and shapes are the model's own. For
those, this module
- builds the model with weight initialisation skipped (the weights are overwritten anyway) and the
  non-persistent buffers (rotary frequencies) computed as usual, directly on the target device;
- on the CPU, points each parameter at the memory-mapped file (no copy: the page cache is the weights);
- on CUDA, streams the files in large chunks through pinned host buffers, with reader threads filling one
  buffer while earlier ones are copied to the GPU with `non_blocking=True` on a side stream. This avoids
  `safe_open(device="cuda")`, which copies tensor by tensor from a memory map.
Anything else (quantized, custom code, renamed keys, float32-pinned modules, tied weights stored twice) raises
NotEligible, and the caller uses `from_pretrained`.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .weights import FLOAT_DTYPES, CorruptWeights, TensorEntry, WeightFile

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

CHUNK_BYTES = 64 << 20
READERS = 4


class NotEligible(Exception):
    """The fast path cannot load this checkpoint as it is; the message says why."""


def checkpoint_dtype(config, files: list[WeightFile]) -> torch.dtype:
    """The dtype DTYPE=auto means: the config's, else the first floating tensor's (as from_pretrained does)."""
    if isinstance(config.dtype, torch.dtype):
        return config.dtype
    for tensor in (t for f in files for t in f.tensors):
        if tensor.dtype in FLOAT_DTYPES:
            return TORCH_DTYPES[tensor.dtype]
    return torch.float32


def load_fast(
    path: Path,
    files: list[WeightFile],
    device: torch.device,
    dtype: torch.dtype | None,
    transfers: Transfers | None = None,
) -> PreTrainedModel:
    """The model from `path` on `device`, or NotEligible. `dtype` None keeps the checkpoint's. The bytes
    are memory-mapped on the CPU and streamed with CudaTransfers on CUDA, unless `transfers` says how."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_eligible(config)
    dtype = dtype or checkpoint_dtype(config, files)
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    try:
        targets, tied_missing = _targets(model, files)
    except NotEligible:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()  # from_pretrained needs that memory next
        raise
    if transfers is None and device.type == "cpu":
        _map_from_files(model, files, targets)
    else:
        stream_weights(files, targets, transfers or CudaTransfers(device))
    model.tie_weights(missing_keys=tied_missing, recompute_mapping=False)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.requires_grad_(False)
    return model.eval()


def _check_eligible(config) -> None:
    if getattr(config, "quantization_config", None) is not None:
        raise NotEligible("the checkpoint is quantized")
    if getattr(config, "auto_map", None):
        raise NotEligible("the model ships its own code")
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise NotEligible(f"{type(config).__name__} has no causal-LM class in transformers") from None
    if model_class._keep_in_fp32_modules or getattr(model_class, "_keep_in_fp32_modules_strict", None):
        raise NotEligible(f"{model_class.__name__} keeps some modules in float32")


def _targets(model: PreTrainedModel, files: list[WeightFile]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each checkpoint tensor's destination in the model, and the tied names the checkpoint leaves out."""
    state = model.state_dict()
    tied = model.all_tied_weights_keys  # {target: source}
    stored = {t.name: t for f in files for t in f.tensors}
    unknown = stored.keys() - state.keys()
    if unknown:
        raise NotEligible(f"checkpoint names differ from the model's (e.g. {sorted(unknown)[0]!r})")
    missing = state.keys() - stored.keys()
    if missing - tied.keys():
        raise NotEligible(f"the checkpoint lacks {len(missing - tied.keys())} of the model's tensors")
    if any(tied[name] not in stored for name in missing) or tied.keys() & stored.keys():
        raise NotEligible("tied weights are stored in an unusual way")
    for name, entry in stored.items():
        if tuple(state[name].shape) != entry.shape:
            raise NotEligible(f"{name} has shape {entry.shape} in the checkpoint, {tuple(state[name].shape)} in the model")
    return {name: state[name] for name in stored}, missing


def _map_from_files(model: PreTrainedModel, files: list[WeightFile], targets: dict[str, torch.Tensor]) -> None:
    """CPU: parameters backed by the memory-mapped files (copy-on-write, so the files never change)."""
    state = {}
    for file in files:
        with safe_open(file.path, framework="pt", device="cpu") as mapped:
            for entry in file.tensors:
                tensor = mapped.get_tensor(entry.name)
                target = targets[entry.name]
                state[entry.name] = tensor if tensor.dtype == target.dtype else tensor.to(target.dtype)
    model.load_state_dict(state, strict=False, assign=True)


class Transfers:
    """How bytes move from host staging buffers to the device, in chunks of `chunk_bytes` read by `readers`
    threads. This base class is the synchronous version, for the CPU; CudaTransfers makes copies asynchronous."""

    device = torch.device("cpu")
    chunk_bytes = CHUNK_BYTES
    readers = READERS

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def fence(self) -> object | None:
        """A marker after every copy issued so far."""
        return None

    def wait(self, fence: object | None) -> None:
        """Block until the copies before `fence` are done (called from reader threads)."""

    def finish(self) -> None:
        """Block until every copy is done."""


class CudaTransfers(Transfers):
    """Pinned staging buffers and a side stream: the GPU copies one buffer while readers fill the others."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def staging(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def empty(self, nbytes: int) -> torch.Tensor:
        with torch.cuda.stream(self.stream):  # owned by the stream that uses it, for the caching allocator
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def fence(self) -> torch.cuda.Event:
        return self.stream.record_event()

    def wait(self, fence: torch.cuda.Event | None) -> None:
        if fence is not None:
            fence.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


@dataclass(frozen=True)
class _Piece:
    """The part of one tensor that lies in one chunk."""

    entry: TensorEntry
    in_chunk: int  # offset in the chunk buffer
    in_tensor: int  # offset in the tensor's bytes
    nbytes: int


@dataclass(frozen=True)
class _Chunk:
    file: WeightFile
    start: int  # absolute offsets in the file
    end: int
    pieces: tuple[_Piece, ...]


def plan_chunks(files: list[WeightFile], chunk_bytes: int) -> list[_Chunk]:
    """Each file's data cut into chunks of at most `chunk_bytes`, with the tensor pieces in each."""
    chunks = []
    for file in files:
        tensors = [t for t in file.tensors if t.nbytes]
        first = 0  # the first tensor that may still overlap the next chunk
        for start in range(file.data_start, file.size, chunk_bytes):
            end = min(start + chunk_bytes, file.size)
            pieces = []
            for entry in tensors[first:]:
                if entry.start >= end:
                    break
                low, high = max(entry.start, start), min(entry.end, end)
                pieces.append(_Piece(entry, low - start, low - entry.start, high - low))
            while first < len(tensors) and tensors[first].end <= end:
                first += 1
            chunks.append(_Chunk(file, start, end, tuple(pieces)))
    return chunks


def _host_view(buffer: torch.Tensor) -> memoryview:
    """A writable view of a host tensor's bytes, for os.preadv (no numpy needed)."""
    return memoryview((ctypes.c_ubyte * buffer.numel()).from_address(buffer.data_ptr())).cast("B")


def _read_chunk(fd: int, chunk: _Chunk, view: memoryview) -> None:
    want, got = chunk.end - chunk.start, 0
    while got < want:
        n = os.preadv(fd, [view[got:want]], chunk.start + got)
        if n == 0:
            raise CorruptWeights(f"{chunk.file.path} ended early, at {chunk.start + got} bytes: it changed while loading")
        got += n


def stream_weights(files: list[WeightFile], targets: dict[str, torch.Tensor], transfers: Transfers) -> None:
    """Read every file in chunks on reader threads into a ring of staging buffers, and copy each chunk's
    tensor pieces into `targets` while the next chunks are being read. A buffer is refilled only after
    the copies out of it are done (`transfers.wait`)."""
    chunks = plan_chunks(files, transfers.chunk_bytes)
    if not chunks:
        return
    readers = max(1, min(transfers.readers, len(chunks)))
    slot_bytes = max(c.end - c.start for c in chunks)
    slots = [transfers.staging(slot_bytes) for _ in range(readers + 2)]
    views = [_host_view(s) for s in slots]
    fences: list[object | None] = [None] * len(slots)
    free: queue.Queue[int] = queue.Queue()
    for slot in range(len(slots)):
        free.put(slot)
    todo: queue.Queue[int] = queue.Queue()
    for index in range(len(chunks)):
        todo.put(index)
    filled: queue.Queue[tuple[int, int, BaseException | None]] = queue.Queue()
    stop = threading.Event()
    fds = {f.path: os.open(f.path, os.O_RDONLY) for f in files}

    def read() -> None:
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            slot = free.get()
            if stop.is_set():
                return
            try:
                transfers.wait(fences[slot])
                _read_chunk(fds[chunks[index].file.path], chunks[index], views[slot])
            except BaseException as error:  # handed to the main thread, which raises it
                filled.put((index, slot, error))
                return
            filled.put((index, slot, None))

    # Tensors whose dtype differs from their parameter's arrive as raw bytes on the device and are
    # converted there once complete; the others are written in place through a byte view.
    raw: dict[str, torch.Tensor] = {}
    waiting: dict[str, int] = {}
    for entry in (t for f in files for t in f.tensors):
        target = targets[entry.name]
        if TORCH_DTYPES[entry.dtype] != target.dtype or not target.is_contiguous():
            raw[entry.name] = transfers.empty(entry.nbytes)
            waiting[entry.name] = entry.nbytes

    def destination(entry: TensorEntry) -> torch.Tensor:
        if entry.name in raw:
            return raw[entry.name]
        return targets[entry.name].data.view(-1).view(torch.uint8)

    threads = [threading.Thread(target=read, name=f"weights-reader-{i}", daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(chunks)):
            index, slot, error = filled.get()
            if error is not None:
                raise error
            for piece in chunks[index].pieces:
                name = piece.entry.name
                src = slots[slot][piece.in_chunk : piece.in_chunk + piece.nbytes]
                transfers.copy(destination(piece.entry)[piece.in_tensor : piece.in_tensor + piece.nbytes], src)
                if name in waiting:
                    waiting[name] -= piece.nbytes
                    if waiting[name] == 0:
                        typed = raw.pop(name).view(TORCH_DTYPES[piece.entry.dtype]).view(piece.entry.shape)
                        transfers.copy(targets[name].data, typed)
            fences[slot] = transfers.fence()
            free.put(slot)
        transfers.finish()
    finally:
        stop.set()
        for _ in threads:
            free.put(0)  # wake readers blocked on a free slot so they see `stop`
        for thread in threads:
            thread.join()
        for fd in fds.values():
            os.close(fd)
