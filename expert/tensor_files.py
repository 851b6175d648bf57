"""safetensors files read and written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Both the header and every offset follow from the names,
shapes and dtypes alone, so a writer can put the header first and stream each tensor's bytes
after it: a file of any size is written with one tensor in memory, where `safetensors.save_file`
needs the whole shard. Reads here use plain file reads, not a memory map, so the bytes read stay
in the page cache and out of the process's resident memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from expert.errors import ModelError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """(header without its __metadata__, offset of the first data byte)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read safetensors file '{path}': {exc}; download it again.") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class TensorReader:
    """The tensors of one safetensors file, read by name when asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.header, self._start = read_header(self.path)

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        found = self.header[name]["dtype"]
        if found not in DTYPES:
            raise ModelError(f"'{self.path}' holds {name} as {found}, a dtype EXPERT cannot read")
        return DTYPES[found]

    def read(self, name: str) -> torch.Tensor:
        begin, end = self.header[name]["data_offsets"]
        data = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            if f.readinto(data) != len(data):
                raise ModelError(f"'{self.path}' is cut short (reading {name}); download it again")
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(self.dtype(name)).reshape(self.shape(name))


def write_streamed(path: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                   tensors: Iterable[torch.Tensor]) -> None:
    """Write `tensors`, which come one at a time in the order and shapes `layout` names, as one
    safetensors file. A tensor that is not what its layout entry says is an error (nothing later
    could tell)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in layout:
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        written = 0
        for (name, shape, dtype), tensor in zip(layout, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout says {shape} {dtype}")
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            written += data.nbytes
        f.flush()
        os.fsync(f.fileno())
    assert written == offset, (path, written, offset)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
