"""Stream safetensors files into tensors on a device: large reads on reader threads into a ring of host
staging buffers, each chunk's tensor pieces copied out while the next chunks are read.

On CUDA the staging buffers are pinned and the copies are `non_blocking=True` on a side stream, so the disk
(or page cache), the host memory bus and the PCIe link all work at once; a buffer is refilled only after the
copies out of it have finished. The same code runs on the CPU with synchronous copies (Transfers), which is
how the tests exercise it. This replaces `safe_open(device="cuda")`, which copies tensor by tensor from a
memory map.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from dataclasses import dataclass

import torch

from worker_transformers.model.errors import CorruptWeights
from worker_transformers.model.weights import TensorEntry, WeightFile

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

CHUNK_BYTES = 64 << 20
READERS = 4


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
            raise CorruptWeights(
                f"{chunk.file.path} ended early, at {chunk.start + got} bytes: it changed while loading"
            )
        got += n


class _Converted:
    """Tensors whose dtype differs from their parameter's arrive as raw bytes on the device and are converted
    there once complete; the others are written in place through a byte view. A raw buffer exists only while its
    tensor is in flight, so a dtype change costs one tensor of memory, not a model."""

    def __init__(self, files: list[WeightFile], targets: dict[str, torch.Tensor], transfers: Transfers) -> None:
        self.targets, self.transfers = targets, transfers
        self.waiting = {  # bytes still to come, of each tensor to convert
            t.name: t.nbytes
            for f in files
            for t in f.tensors
            if TORCH_DTYPES[t.dtype] != targets[t.name].dtype or not targets[t.name].is_contiguous()
        }
        self.raw: dict[str, torch.Tensor] = {}

    def destination(self, entry: TensorEntry) -> torch.Tensor:
        """The bytes a piece of `entry` is copied into."""
        if entry.name not in self.waiting:
            return self.targets[entry.name].data.view(-1).view(torch.uint8)
        if entry.name not in self.raw:
            self.raw[entry.name] = self.transfers.empty(entry.nbytes)
        return self.raw[entry.name]

    def arrived(self, piece: _Piece) -> None:
        """`piece` was copied: its tensor, once whole, is converted into its parameter."""
        name = piece.entry.name
        if name in self.waiting:
            self.waiting[name] -= piece.nbytes
            if self.waiting[name] == 0:
                typed = self.raw.pop(name).view(TORCH_DTYPES[piece.entry.dtype]).view(piece.entry.shape)
                self.transfers.copy(self.targets[name].data, typed)


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

    converted = _Converted(files, targets, transfers)
    threads = [threading.Thread(target=read, name=f"weights-reader-{i}", daemon=True) for i in range(readers)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(len(chunks)):
            index, slot, error = filled.get()
            if error is not None:
                raise error
            for piece in chunks[index].pieces:
                src = slots[slot][piece.in_chunk : piece.in_chunk + piece.nbytes]
                into = converted.destination(piece.entry)
                transfers.copy(into[piece.in_tensor : piece.in_tensor + piece.nbytes], src)
                converted.arrived(piece)
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
