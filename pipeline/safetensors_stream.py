"""Sharded safetensors written tensor by tensor: headers are planned up front, so no shard is
ever held in memory (safetensors.save_file needs every tensor of a file at once)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor that will be written: its name, dtype and shape (its data comes later)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1024' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if not num or unit not in units:
        raise ValueError(f"cannot parse size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(float(num) * units[unit])


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes the planned tensors, in plan order, straight into `model-0000i-of-0000n.safetensors`
    files (one `model.safetensors` when everything fits one shard), plus the index when sharded."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._pos = 0
        self._shard = -1
        self._fh: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, dtype and shape must match the plan."""
        if self._pos >= len(self._queue):
            raise RuntimeError(f"tensor {name} was not planned (all planned tensors are written)")
        shard, spec = self._queue[self._pos]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"expected {spec.name} {spec.dtype} {spec.shape}, got {name} "
                               f"{tensor.dtype} {tuple(tensor.shape)}")
        if shard != self._shard:
            self._open(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._fh is not None
        self._fh.write(memoryview(data))
        self._pos += 1

    def _open(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = shard
        self._fh = open(self.directory / self.files[shard], "wb")
        self._fh.write(_header(self.shards[shard], self.metadata))

    def close(self) -> list[str]:
        """Finish the last shard and write the index; returns the file names written."""
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1].name
            raise RuntimeError(f"{len(self._queue) - self._pos} planned tensors not written "
                               f"(next: {missing})")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) == 1:
            return list(self.files)
        index = {
            "metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
            "weight_map": {s.name: self.files[i] for i, s in self._queue},
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*self.files, INDEX_NAME]

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fh is not None:
            self._fh.close()
