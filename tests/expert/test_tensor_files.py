"""safetensors written one tensor at a time and read by name: byte-compatible with the library."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from expert.tensor_files import TensorReader, write_streamed


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 2, 2, generator=g).half(),
        "d.index": torch.arange(5, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
        "h.bytes": torch.arange(3, dtype=torch.uint8),  # leaves the next offset unaligned
        "i.float8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_a_streamed_file_loads_with_safetensors_as_written(tmp_path):
    tensors = _tensors()
    path = tmp_path / "streamed.safetensors"
    write_streamed(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], iter(tensors.values()))
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and _same_bytes(loaded[key], value), key
    size = int.from_bytes(path.read_bytes()[:8], "little")
    assert size % 8 == 0 and json.loads(path.read_bytes()[8:8 + size])["__metadata__"] == {"format": "pt"}


def test_the_reader_reads_what_safetensors_wrote(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors")
    reader = TensorReader(tmp_path / "lib.safetensors")
    assert set(reader.names()) == set(tensors)
    for key, value in tensors.items():
        read = reader.read(key)
        assert reader.shape(key) == tuple(value.shape) and reader.dtype(key) == value.dtype
        assert read.shape == value.shape and _same_bytes(read, value), key


def test_a_tensor_unlike_its_layout_or_a_missing_one_fails_the_write(tmp_path):
    layout = [("a", (2, 3), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(ValueError, match=r"b: got \(5,\)"):
        write_streamed(tmp_path / "x.safetensors", layout, iter([torch.zeros(2, 3), torch.zeros(5)]))
    with pytest.raises(ValueError, match="a: got .* torch.float16"):
        write_streamed(tmp_path / "x.safetensors", layout, iter([torch.zeros(2, 3).half(), torch.zeros(4)]))
    with pytest.raises(ValueError):
        write_streamed(tmp_path / "x.safetensors", layout, iter([torch.zeros(2, 3)]))


def test_a_file_cut_short_is_named(tmp_path):
    from expert.errors import ModelError

    save_file({"a": torch.zeros(100)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ModelError, match="cut.safetensors' is cut short"):
        TensorReader(tmp_path / "cut.safetensors").read("a")
