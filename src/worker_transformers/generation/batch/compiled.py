"""The batch engine's decode step, compiled: the model's forward for one token per row, as one graph of fused
kernels (torch.compile, Inductor) instead of its Python run op by op.

Compiling takes tens of seconds, so it never delays readiness by default (COMPILE=background): the worker serves
on the eager step while a thread compiles this one, and the batcher switches to it once it is ready; a request
never waits for a compile. COMPILE=before_ready compiles during startup instead (a phase of its timeline, within
RUNPOD_INIT_TIMEOUT); COMPILE=off never compiles.

One graph serves every batch and cache width: the batch's rows and the cache's columns are dynamic sizes (a batch
of one runs as two, as the compiler specializes size 1), compiled on a scratch cache before it is switched in, so
serving never compiles again; a step that would (a guard the warm-up did not see) is refused by the compiler's
`fail_on_recompile` stance and the batcher goes back to eager for good, saying why. Inside the graph, the step's
keys and values are written in place into the slot cache's buffers at the step's column (a tensor, not a
constant), and the masks are built from the cache's positions, exactly as the eager step builds them
(masks.attention_masks): the same arithmetic, so the same tokens, up to the fused kernels' rounding. In bfloat16
and float16 on the CPU the weights are frozen into the graph (Inductor's `freezing`), which packs each linear
layer's weight for oneDNN once: most of what a CPU step gains, for a second copy of the weights in memory.

What is compiled is saved (torch.compiler.save_cache_artifacts) in COMPILE_CACHE_DIR, in a file named for the
model, its dtype, the device and the torch build, and loaded by the next worker before it compiles, which then
takes seconds instead of tens of them (Inductor caches no frozen graph: a frozen step is compiled afresh). A model
whose step cannot be compiled as one graph (a graph break, an operation the compiler cannot trace) keeps the eager
step, and the log says why.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer

from worker_transformers.generation.batch.layout import CacheLayout, forward_parameters
from worker_transformers.generation.batch.masks import attention_masks
from worker_transformers.generation.batch.slot_cache import SlotCache
from worker_transformers.generation.engine import release_openmp_team

log = logging.getLogger(__name__)

# The compiler specializes sizes 0 and 1 and keeps the others dynamic: a graph compiled for two rows serves every
# batch of two or more, and a batch of one is run as two (its row, and a copy of it in the row after), which costs
# little next to a second compile. A cache that can hold one row only gets the graph of one row.
_FEWEST_ROWS = 2
_SCRATCH_COLUMNS = 8  # the scratch cache's width: any width above 1 stands for every other
# Timing the compiled step against the eager one (on a CPU): cache columns, and steps of each, interleaved.
_TIMED_COLUMNS = 256
_TIMINGS = 5


class DecodeGraph:
    """The compiled decode step of one model, once `ready`; `run` is what the batcher calls instead of its eager
    forward."""

    def __init__(self, model: PreTrainedModel, layout: CacheLayout, artifacts: Path | None, max_rows: int) -> None:
        self.model = model
        self.layout = layout
        self.fewest_rows = min(_FEWEST_ROWS, max_rows)  # a step runs at least this many rows (the cache has them)
        # The widest batch the compiled step serves: on a CPU, the widest it beats the eager step at (timed once
        # compiled); wider batches run the eager step.
        self.most_rows = max_rows
        # Weights frozen into the graph where that packs them for oneDNN's low-precision kernels (bfloat16 and
        # float16 on the CPU): a CPU step's gain. Inductor keeps no frozen graph in its cache, so such a step is
        # compiled afresh by every worker; the others are saved for the next.
        self.frozen = model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16)
        self.artifacts = artifacts  # the file its compiled code is saved to and loaded from; None: not kept
        self.ready = False
        self.failed = ""  # why the step stays eager, once that is known
        self.compile_s: float | None = None
        self._takes = forward_parameters(model)
        self._additive = model.config._attn_implementation != "sdpa"
        self._done = threading.Event()
        self._step = None  # torch.compile's wrapper, made by `compile` (it imports the compiler: not at startup)

    @staticmethod
    def why_not(model: PreTrainedModel, layout: CacheLayout) -> str:
        """Why this model's decode step is not compiled, or "" when it can be tried."""
        if not layout.batchable:
            return "the batcher does not serve it"
        if layout.recurrent:
            return "its recurrent layers' states are updated in ways the compiled step does not follow yet"
        if layout.held_mask:
            return "its layers take a 2D mask of held columns (ALiBi), which the compiled step does not build"
        takes = forward_parameters(model)
        if layout.cache_argument != "past_key_values" or not {"attention_mask", "position_ids"} <= takes:
            return "its forward takes no cache, masks or positions the compiled step can give"
        return ""

    # Compiling

    def start(self, then: Callable[[], None] = lambda: None) -> threading.Thread:
        """Compile in a thread of its own, then call `then`; the batcher switches to the step once it is ready."""

        def compile_then() -> None:
            try:
                self.compile()
            finally:
                then()

        thread = threading.Thread(target=compile_then, name="decode-compile", daemon=True)
        thread.start()
        return thread

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the compile to end, at most `timeout_s`; whether it has ended (ready or failed)."""
        return self._done.wait(timeout_s)

    @torch.inference_mode()
    def compile(self) -> bool:
        """Compile the step for the shapes that stand for every batch (loading what an earlier worker saved
        first), each on a scratch cache; whether it is ready. Never raises: a failure leaves the step eager."""
        # The compiler's modules take about a second to import: here, behind the worker's readiness.
        from torch._inductor import config as inductor_config
        from torch.fx.experimental import _config as shape_config

        started = time.monotonic()
        self._step = torch.compile(self._eager_step, fullgraph=True, dynamic=True)
        loaded = self._load_artifacts()
        try:
            # Without duck sizing: a size that happens to equal another at compile time (the scratch cache's
            # width, or its rows, equal to the model's head count) would otherwise be taken for the same size.
            # Inductor reads its config as it compiles, so freezing is patched around the compile (torch.compile's
            # `options` does not reach it).
            with shape_config.patch(use_duck_shape=False), inductor_config.patch(freezing=self.frozen):
                self._warm(self.fewest_rows)
        except Exception as error:  # noqa: BLE001 - any failure to compile leaves the eager step serving
            self.failed = _first_line(error)
            log.warning("compiled decode step unavailable, the eager step serves on: %s", self.failed)
            log.debug("the compile's failure", exc_info=True)
            self._done.set()
            release_openmp_team()
            return False
        self.compile_s = time.monotonic() - started
        try:
            if self.model.device.type == "cpu":
                self.most_rows = self._most_rows_faster(self.most_rows)
        finally:
            release_openmp_team()  # this thread's team would slow the engine thread's forwards (engine.py)
        self.ready = self.most_rows > 0
        self._done.set()
        saved = "with the compiled code an earlier worker saved" if loaded else "nothing saved to start from"
        if not self.ready:
            log.warning("compiled decode step unavailable: slower than the eager step here at every batch size")
            return False
        log.info(
            "compiled decode step in service for batches of up to %d after %.1f s of compiling (%s)",
            self.most_rows,
            self.compile_s,
            saved,
        )
        self._save_artifacts()
        return True

    def _warm(self, rows: int) -> None:
        """Compile for `rows` rows, on a scratch cache."""
        cache = self._scratch(rows, _SCRATCH_COLUMNS)
        ids = torch.ones(rows, 1, dtype=torch.long, device=self.model.device)
        positions = torch.full((rows, 1), 2, device=self.model.device)
        self.run(ids, positions, positions, cache, rows, 2, compile_now=True)

    def _scratch(self, rows: int, columns: int) -> SlotCache:
        """A scratch cache of `rows` rows and `columns` columns, each row holding two tokens prefilled by the eager
        forward (which allocates each layer's keys and values in their shapes)."""
        device = self.model.device
        cache = SlotCache(list(self.layout.layers), rows, columns, device)
        ids = torch.ones(rows, 2, dtype=torch.long, device=device)
        positions = torch.arange(2, device=device).expand(rows, 2)
        cache.positions[:, :2] = positions
        masks = attention_masks(cache.positions[:, :2], positions, self.layout.kinds, self.model.dtype, self._additive)
        with cache.writing(slice(0, rows), 0, 2):
            self.model(
                input_ids=ids, past_key_values=cache, attention_mask=masks, position_ids=positions, use_cache=True
            )
        return cache

    def _most_rows_faster(self, max_rows: int) -> int:
        """The largest batch (of 1, 2, 4, ... up to `max_rows`) whose compiled step beats the eager one here: on a
        CPU, the compiled attention of a wide batch can be the slower. 0 where none does."""
        faster = 0
        for rows in sorted({min(2**i, max_rows) for i in range(max_rows.bit_length() + 1)}):
            compiled, eager = self._time_steps(rows)
            if compiled >= eager:
                break
            faster = rows
        return faster

    def _time_steps(self, rows: int) -> tuple[float, float]:
        """Median seconds of the compiled and of the eager step for `rows` rows, interleaved, on a scratch cache of
        _TIMED_COLUMNS columns."""
        cache = self._scratch(max(rows, self.fewest_rows), _TIMED_COLUMNS + 2)
        cache.positions[:, :_TIMED_COLUMNS] = torch.arange(_TIMED_COLUMNS, device=self.model.device)
        column = _TIMED_COLUMNS
        ids = torch.ones(rows, 1, dtype=torch.long, device=self.model.device)
        positions = torch.full((rows, 1), column, device=self.model.device)
        compiled, eager = [], []
        for _ in range(_TIMINGS):
            compiled.append(_timed(lambda: self.run(ids, positions, positions, cache, rows, column)))
            eager.append(_timed(lambda: self._eager_decode(ids, positions, cache, rows, column)))
        return statistics.median(compiled), statistics.median(eager)

    def _eager_decode(self, ids, positions, cache: SlotCache, rows: int, column: int) -> torch.Tensor:
        """The eager decode step, as the batcher runs it (its `_forward`), for timing against the compiled one."""
        held = cache.positions[:rows, : column + 1]
        masks = attention_masks(held, positions, self.layout.kinds, self.model.dtype, self._additive, decode=True)
        with cache.writing(slice(0, rows), column, column + 1, continuing=True):
            out = self.model(
                input_ids=ids, past_key_values=cache, attention_mask=masks, position_ids=positions, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        return out.logits[:, -1]

    def _load_artifacts(self) -> bool:
        if self.artifacts is None or not self.artifacts.is_file():
            return False
        try:
            # None where torch could not read it (it logs why): damaged, or written by another torch
            loaded = torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
        except Exception as error:  # noqa: BLE001 - a damaged or stale file costs a full compile, nothing more
            loaded, why = None, _first_line(error)
        else:
            why = "not compiled code this torch reads"
        if loaded is None:
            log.warning("COMPILE_CACHE_DIR: %s could not be loaded (%s); compiling afresh", self.artifacts, why)
            return False
        return True

    def _save_artifacts(self) -> None:
        if self.artifacts is None:
            return
        saved = torch.compiler.save_cache_artifacts()
        if saved is None or not saved[0]:
            log.info("compiled decode step: nothing to save for the next worker (frozen weights are not cached)")
            return
        try:
            self.artifacts.parent.mkdir(parents=True, exist_ok=True)
            partial = self.artifacts.with_suffix(".partial")
            partial.write_bytes(saved[0])
            partial.replace(self.artifacts)  # whole or not at all, for a worker loading it meanwhile
        except OSError as error:
            log.warning("COMPILE_CACHE_DIR: the compiled decode step could not be saved (%s)", error)
            return
        log.info("compiled decode step saved to %s (%d kB)", self.artifacts, len(saved[0]) // 1000)

    # Serving

    def run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rotary: torch.Tensor,
        cache: SlotCache,
        rows: int,
        column: int,
        compile_now: bool = False,
    ) -> torch.Tensor:
        """The logits of one decode step for the first `rows` rows of `cache`, their tokens `ids` (rows, 1) at
        `positions` (rotary positions `rotary`), written at `column`: what the batcher's eager `_forward` gives for
        a decode step. Fewer rows than `fewest_rows` run with copies of the first in the rows after (free rows,
        which the cache has: the batcher sees to it), each seeing only its own new token. The cache keeps a column
        free after `column` (the batcher sees to that too), so that the step's views of its buffers are never the
        whole buffers, which the graph would take for another layout. Raises where the step would have to compile
        again (unless `compile_now`)."""
        end = column + 1
        cache.positions[:rows, column:end] = positions
        # The step's small inputs copied into one layout, whatever they are views of (a row of the batcher's state,
        # a block of the cache's positions as wide as its buffer or narrower): the graph is specialized on strides.
        width = max(rows, self.fewest_rows)
        ids, positions, rotary = (_padded(x.reshape(rows, -1), width) for x in (ids, positions, rotary))
        held = cache.positions[:width, :end].clone(memory_format=torch.contiguous_format)
        if width > rows:  # the copies hold nothing but their new token
            held[rows:] = -1
            held[rows:, column] = positions[rows:, 0]
        keys = [layer.keys[:width, :, :end] if _keeps_keys(layer) else None for layer in cache.layers]
        values = [layer.values[:width, :, :end] if _keeps_keys(layer) else None for layer in cache.layers]
        at = torch.tensor([column], device=ids.device)
        with torch.compiler.set_stance("default" if compile_now else "fail_on_recompile"):
            return self._step(ids, positions, rotary, held, at, keys, values)[:rows]

    def _eager_step(self, ids, positions, rotary, held, column, keys, values) -> torch.Tensor:
        """What is compiled: the forward of one token per row over a cache that writes at `column`."""
        cache = _StepCache(keys, values, column)
        arguments = {
            "input_ids": ids,
            "past_key_values": cache,
            "use_cache": True,
            "logits_to_keep": 1,
            "attention_mask": attention_masks(
                held, positions, self.layout.kinds, self.model.dtype, self._additive, decode=True
            ),
            "position_ids": rotary,
        }
        if "cache_position" in self._takes:
            arguments["cache_position"] = column
        return self.model(**arguments).logits[:, -1]


class _StepLayer(CacheLayerMixin):
    """An attention layer's keys and values within the compiled step: views of the slot cache's buffers (the
    batch's rows, the columns up to the step's), written in place at the step's column."""

    is_sliding = False
    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.column = keys, values, column
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.column, key_states)
        self.values.index_copy_(2, self.column, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2] - 1

    def get_max_length(self) -> int:
        return -1


class _StepCache(Cache):
    """The cache the model sees within the compiled step: a `_StepLayer` for each layer that keeps keys and values,
    a layer that keeps nothing for the others (the model's shared-KV and MLP-only layers)."""

    def __init__(self, keys: list, values: list, column: torch.Tensor) -> None:
        super().__init__(layers=[DummyLayer() if k is None else _StepLayer(k, v, column) for k, v in zip(keys, values)])


def _timed(step: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _padded(rows: torch.Tensor, width: int) -> torch.Tensor:
    """`rows` and copies of its first row after it, `width` rows in all, in a new contiguous tensor."""
    if rows.shape[0] < width:
        rows = torch.cat([rows, rows[:1].expand(width - rows.shape[0], *rows.shape[1:])])
    return rows.clone(memory_format=torch.contiguous_format)


def _keeps_keys(layer) -> bool:
    return getattr(layer, "is_initialized", False) and hasattr(layer, "keys") and layer.keys is not None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def artifacts_file(folder: Path, model: PreTrainedModel, identity: str) -> Path:
    """Where the compiled step of this model is kept in `folder`: a file per model (`identity`: its files' own
    name, revision or hashes), dtype, device and torch build, since compiled code fits only those."""
    device = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu"
    key = "|".join((identity, str(model.dtype), device, torch.__version__))
    return folder / f"decode-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"
