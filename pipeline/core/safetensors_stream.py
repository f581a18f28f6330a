"""Sharded safetensors written tensor by tensor: headers are planned up front, so no shard is
ever held in memory (safetensors.save_file needs every tensor of a file at once). Also the
header reader that checks a file we did not write before anything else trusts it."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from pipeline.core.bounded import checked_path, loads_json
from pipeline.core.errors import InputError

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
DTYPE_BYTES = {name: torch.tensor([], dtype=dt).element_size() for dt, name in DTYPES.items()}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


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


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as a checked safetensors header describes it."""

    dtype: str  # safetensors name: "F16", "I32", ...
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range in the data section


def header_bytes(path: Path) -> tuple[bytes, int]:
    """A safetensors file's JSON header bytes and the file's size, the framing checked: an
    8-byte length that fits both MAX_HEADER_BYTES and the file. InputError naming the file."""
    path = checked_path(path, "safetensors file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path}: not a safetensors file: its header length "
                                 f"({n if n is not None else 'missing'}) does not fit in its "
                                 f"{size} bytes (truncated or corrupt)")
            return f.read(n), size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, its header checked against the format and the file: a
    bounded UTF-8 JSON object, known dtypes, each data range exactly its shape x dtype size, and
    the ranges tiling the data section to the end of the file (no gap, overlap or truncation).
    Every defect is an InputError naming the file (and the tensor)."""
    path = Path(path)
    raw, size = header_bytes(path)
    n = len(raw)
    header = loads_json(raw, f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise InputError(f"{path}: corrupt safetensors header (__metadata__ must map strings "
                         "to strings)")
    tensors = {name: _stored(path, name, entry) for name, entry in header.items()}
    end = 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].offsets):
        if t.offsets[0] != end:
            raise InputError(f"{path}: tensor {name}: data_offsets {list(t.offsets)} "
                             f"{'overlap' if t.offsets[0] < end else 'leave a gap after'} the "
                             f"previous tensor's data (ending at {end})")
        end = t.offsets[1]
    if end != size - 8 - n:
        raise InputError(f"{path}: the header describes {end} data bytes, the file holds "
                         f"{size - 8 - n}: " + ("truncated" if end > size - 8 - n else
                                                 "trailing bytes no tensor owns"))
    return tensors


def _stored(path: Path, name: str, entry: object) -> StoredTensor:
    """One header entry, checked: dtype known, shape non-negative ints, range = its byte size."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InputError(f"{where}: header entry must hold exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise InputError(f"{where}: dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}")

    def ints(v: object) -> bool:
        return isinstance(v, list) and all(type(x) is int and x >= 0 for x in v)

    if not ints(shape):
        raise InputError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise InputError(f"{where}: data_offsets {offsets!r} is not a [begin, end] byte range")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise InputError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                         f"but {dtype} {shape} needs {nbytes}")
    return StoredTensor(dtype, tuple(shape), (offsets[0], offsets[1]))
