"""The fast path loads the same weights as from_pretrained: same logits, on the tiny model and the default
one, memory-mapped and streamed, with and without a dtype change. The GPU's asynchronous copies are played
by a stand-in that runs each copy late, when the loader says it waits for it, as a real stream would."""

import json
import logging
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from worker_transformers.config import Settings
from worker_transformers.loading.loader import build_model, load_weights
from worker_transformers.loading.placement import NotEligible, build_empty, fill
from worker_transformers.loading.streaming import Transfers, plan_chunks
from worker_transformers.model.sources import ModelLocation
from worker_transformers.model.weights import inspect

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 61, 11]])  # within the tiny vocabulary


def load_fast(path, files, device, dtype, transfers=None):
    return fill(build_empty(path, files, device, dtype), files, transfers)


def load_model(location, settings, files):
    """The two startup phases, model then weights, as setup runs them."""
    return load_weights(location, settings, files, build_model(location, settings, files))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS.to(model.device)).logits.float()


def reference(path, dtype="auto"):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).eval()


class SmallChunks(Transfers):
    """Synchronous copies in tiny chunks: tensors span chunks and every staging buffer is reused."""

    chunk_bytes = 4096
    readers = 3


class LateCopies(SmallChunks):
    """A stand-in for a CUDA stream: a copy is only queued, and runs when the loader waits on a fence
    recorded after it (or at finish). A loader that refilled a staging buffer before waiting would see
    its queued copies read the new bytes: wrong weights."""

    def __init__(self) -> None:
        self.queued: list = []
        self.done = 0
        self.lock = threading.Lock()

    def copy(self, dst, src) -> None:
        with self.lock:
            self.queued.append(lambda: dst.copy_(src))

    def fence(self) -> int:
        with self.lock:
            return len(self.queued)

    def wait(self, fence) -> None:
        if fence is not None:
            self._run_until(fence)

    def finish(self) -> None:
        self._run_until(len(self.queued))

    def _run_until(self, fence: int) -> None:
        with self.lock:
            while self.done < fence:
                self.queued[self.done]()
                self.done += 1


class NeverWaits(LateCopies):
    """The same stand-in with waiting broken: the test below shows it is caught."""

    def wait(self, fence) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_files(tiny_model_dir):
    return inspect(tiny_model_dir, "tiny")


def test_the_fast_path_gives_from_pretrained_logits_on_the_tiny_model(tiny_model_dir, tiny_files):
    fast = load_fast(tiny_model_dir, tiny_files, CPU, None)
    assert torch.equal(logits(fast), logits(reference(tiny_model_dir)))
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # the tie survives
    assert not fast.training


def test_memory_mapped_weights_come_from_the_file_without_a_copy(tiny_model_dir, tiny_files):
    fast = load_fast(tiny_model_dir, tiny_files, CPU, None)
    stored = load_file(tiny_model_dir / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(fast.get_parameter(name), stored[name])


def test_a_prefills_last_positions_reach_the_lm_head_in_one_matrix_product(tiny_model_dir, tiny_files):
    """Not one batched product over a copy of the lm_head's weight per row, which torch's matmul makes of a frozen
    weight: the fast path's parameters are what from_pretrained's are."""
    fast = load_fast(tiny_model_dir, tiny_files, CPU, None)
    vocab = fast.lm_head.weight.shape[0]
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as profile:
        fast(IDS.repeat(4, 1), logits_to_keep=1)
    batched = [e for e in profile.events() if e.name == "aten::bmm" and vocab in sum(map(list, e.input_shapes), [])]
    assert not batched
    assert [p.requires_grad for p in fast.parameters()] == [
        p.requires_grad for p in reference(tiny_model_dir).parameters()
    ]


@pytest.mark.parametrize("transfers", [SmallChunks, LateCopies], ids=["streamed", "streamed-async"])
def test_streamed_weights_give_from_pretrained_logits(tiny_model_dir, tiny_files, transfers):
    fast = load_fast(tiny_model_dir, tiny_files, CPU, None, transfers=transfers())
    assert torch.equal(logits(fast), logits(reference(tiny_model_dir)))


def test_a_loader_that_reuses_staging_before_its_copies_ran_would_be_caught(tiny_model_dir, tiny_files):
    broken = load_fast(tiny_model_dir, tiny_files, CPU, None, transfers=NeverWaits())
    assert not torch.equal(logits(broken), logits(reference(tiny_model_dir)))


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bf16")
    reference(tiny_model_dir).to(torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize("transfers", [None, SmallChunks, LateCopies], ids=["mapped", "streamed", "streamed-async"])
def test_weights_converted_to_another_dtype_match_from_pretrained(bf16_model_dir, transfers):
    files = inspect(bf16_model_dir, "tiny")
    fast = load_fast(bf16_model_dir, files, CPU, torch.float32, transfers=transfers and transfers())
    assert fast.dtype == torch.float32
    assert torch.equal(logits(fast), logits(reference(bf16_model_dir, dtype=torch.float32)))


def test_auto_dtype_keeps_the_checkpoint_dtype(bf16_model_dir):
    assert load_fast(bf16_model_dir, inspect(bf16_model_dir, "tiny"), CPU, None).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def sharded_model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sharded")
    reference(tiny_model_dir).save_pretrained(folder, max_shard_size="30KB")
    return folder


@pytest.mark.parametrize("transfers", [None, SmallChunks, LateCopies], ids=["mapped", "streamed", "streamed-async"])
def test_a_sharded_checkpoint_gives_from_pretrained_logits(sharded_model_dir, transfers):
    files = inspect(sharded_model_dir, "tiny")
    assert len(files) > 1
    fast = load_fast(sharded_model_dir, files, CPU, None, transfers=transfers and transfers())
    assert torch.equal(logits(fast), logits(reference(sharded_model_dir)))


@pytest.fixture(scope="module")
def renamed_model_dir(tiny_model_dir, tmp_path_factory):
    """A checkpoint saved from the base model: no `model.` prefix, which from_pretrained maps back."""
    folder = tmp_path_factory.mktemp("tiny-renamed")
    state = load_file(tiny_model_dir / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, folder / "model.safetensors", {"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    return folder


def test_a_checkpoint_the_fast_path_cannot_take_is_refused_with_the_reason(renamed_model_dir):
    with pytest.raises(NotEligible, match="checkpoint names differ from the model's"):
        load_fast(renamed_model_dir, inspect(renamed_model_dir, "tiny"), CPU, None)


def test_a_quantized_checkpoint_is_left_to_from_pretrained(tiny_model_dir, tmp_path):
    folder = tmp_path / "quantized"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotEligible, match="quantized"):
        load_fast(folder, [], CPU, None)


def location(path) -> ModelLocation:
    return ModelLocation(path, "folder", "tiny", None)


def test_load_model_falls_back_to_from_pretrained_and_says_why(renamed_model_dir, tiny_model_dir, caplog):
    settings = Settings.from_env({"MODEL_NAME": str(renamed_model_dir)})
    with caplog.at_level(logging.INFO, logger="worker_transformers.loading.loader"):
        model = load_model(location(renamed_model_dir), settings, inspect(renamed_model_dir, "tiny"))
    assert "fast loading does not apply (checkpoint names differ" in caplog.text
    assert "by from_pretrained" in caplog.text
    assert torch.equal(logits(model), logits(reference(tiny_model_dir)))


def test_fast_load_off_uses_from_pretrained(tiny_model_dir, tiny_files, caplog):
    settings = Settings.from_env({"MODEL_NAME": str(tiny_model_dir), "FAST_LOAD": "false"})
    with caplog.at_level(logging.INFO, logger="worker_transformers.loading.loader"):
        load_model(location(tiny_model_dir), settings, tiny_files)
    assert "by from_pretrained" in caplog.text


def test_load_model_uses_the_fast_path_by_default(tiny_model_dir, tiny_files, caplog):
    settings = Settings.from_env({"MODEL_NAME": str(tiny_model_dir)})
    with caplog.at_level(logging.INFO, logger="worker_transformers.loading.loader"):
        load_model(location(tiny_model_dir), settings, tiny_files)
    assert "by fast path" in caplog.text


def test_chunks_cover_every_tensor_byte_once(tiny_files):
    covered: dict[str, list[tuple[int, int]]] = {}
    for chunk in plan_chunks(tiny_files, 1000):
        assert chunk.end - chunk.start <= 1000
        for piece in chunk.pieces:
            assert 0 <= piece.in_chunk and piece.in_chunk + piece.nbytes <= chunk.end - chunk.start
            assert chunk.start + piece.in_chunk == piece.entry.start + piece.in_tensor
            covered.setdefault(piece.entry.name, []).append((piece.in_tensor, piece.in_tensor + piece.nbytes))
    for entry in (t for f in tiny_files for t in f.tensors):
        spans = covered[entry.name]
        assert spans[0][0] == 0 and spans[-1][1] == entry.nbytes
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.slow
def test_the_fast_path_gives_from_pretrained_logits_on_the_default_model(default_model_path):
    files = inspect(default_model_path, "default")
    reference_logits = logits(reference(default_model_path))
    assert torch.equal(logits(load_fast(default_model_path, files, CPU, None)), reference_logits)
    streamed = load_fast(default_model_path, files, CPU, None, transfers=Transfers())
    assert torch.equal(logits(streamed), reference_logits)
