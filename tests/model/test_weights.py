"""Safetensors headers read and checked on real files: a damaged copy is caught before loading, with a fix."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from worker_transformers.model.errors import CorruptWeights
from worker_transformers.model.weights import inspect, read_header, total_bytes, weight_paths

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.ones(5, dtype=torch.bfloat16),
    "c.scale": torch.tensor(2.0),
}


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    return path


def test_a_header_gives_each_tensor_its_dtype_shape_and_bytes(weights_file):
    file = read_header(weights_file, "org/model")
    assert file.size == weights_file.stat().st_size
    entries = {t.name: t for t in file.tensors}
    assert (entries["a.weight"].dtype, entries["a.weight"].shape) == ("F32", (3, 4))
    assert (entries["b.bias"].dtype, entries["c.scale"].shape) == ("BF16", ())
    data = weights_file.read_bytes()
    for name, tensor in TENSORS.items():
        entry = entries[name]
        assert data[entry.start : entry.end] == tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    assert [t.start for t in file.tensors] == sorted(t.start for t in file.tensors)


def test_a_truncated_file_is_reported_with_its_size_and_the_fix(weights_file):
    data = weights_file.read_bytes()
    weights_file.write_bytes(data[:-10])
    with pytest.raises(CorruptWeights) as caught:
        read_header(weights_file, "org/model")
    message = str(caught.value)
    assert message.startswith(f"org/model: {weights_file} is truncated: it has {len(data) - 10} bytes")
    assert f"its header says {len(data)}" in message
    assert "delete it and fetch the model again" in message


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:4], "too few for a safetensors header"),
        (lambda data: data[:20], "truncated or not safetensors"),
        (lambda data: data + b"\0" * 7, "7 bytes more than its header describes"),
        (lambda data: b"PK\x03\x04" + b"\0" * 200, "truncated or not safetensors"),
        (lambda data: struct.pack("<Q", 4) + b"{not" + data[12:], "not valid JSON"),
    ],
    ids=["shorter-than-header-length", "cut-in-header", "extra-bytes", "not-safetensors", "bad-json"],
)
def test_a_damaged_file_is_refused_with_the_reason(weights_file, damage, reason):
    weights_file.write_bytes(damage(weights_file.read_bytes()))
    with pytest.raises(CorruptWeights, match=reason):
        read_header(weights_file, "org/model")


def test_a_header_entry_whose_size_does_not_match_its_shape_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
    with pytest.raises(CorruptWeights, match="malformed header entry for 'w'"):
        read_header(path, "org/model")


def write_sharded(folder):
    folder.mkdir()
    save_file({"a.weight": TENSORS["a.weight"]}, folder / "model-00001-of-00002.safetensors")
    save_file({"b.bias": TENSORS["b.bias"]}, folder / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_a_sharded_model_is_read_in_shard_order(tmp_path):
    folder = write_sharded(tmp_path / "m")
    files = inspect(folder, "org/model")
    assert [f.path.name for f in files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert total_bytes(files) == sum(p.stat().st_size for p in weight_paths(folder))


def test_a_shard_lacking_a_tensor_its_index_places_there_is_refused(tmp_path):
    folder = write_sharded(tmp_path / "m")
    shutil.copy(folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors")
    with pytest.raises(CorruptWeights, match="lacks 'b.bias', which the index places there"):
        inspect(folder, "org/model")
