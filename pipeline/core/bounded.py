"""The one boundary for what is read from outside: paths, JSON, TOML, text and the GGUF header,
each parsed with limits on size, nesting and counts, checked against the file's own size before
anything is allocated. Every defect is an InputError naming the file (and the key)."""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
import struct
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MAX_DEPTH = 64  # nesting of any JSON or TOML we read (the deepest real one, tokenizer.json, is ~6)
MAX_JSON_BYTES = 64 << 20  # config.json, an index, tokenizer.json, verify.json, job.json
MAX_TOML_BYTES = 1 << 20  # a recipe
MAX_LINE_BYTES = 16 << 20  # one calibration .jsonl record
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)
MAX_PATH_BYTES = 4095  # a whole path (PATH_MAX less its NUL)


# ---------------------------------------------------------------- paths


def shown(path: Path | str) -> str:
    """A path as a message may show it: undecodable bytes and control characters escaped."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def path_problem(path: Path | str) -> str | None:
    """Why `path` cannot name a file here (NUL byte, undecodable bytes, a name or path over the
    system's limits, a symbolic-link loop), or None."""
    text = str(path)
    if "\0" in text:
        return "contains a NUL byte"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(raw) > MAX_PATH_BYTES:
        return f"is {len(raw)} bytes long (the limit is {MAX_PATH_BYTES})"
    long = next((p for p in Path(text).parts if len(p.encode()) > MAX_NAME_BYTES), None)
    if long is not None:
        return f"has a name of {len(long.encode())} bytes (the limit is {MAX_NAME_BYTES})"
    try:
        Path(text).resolve()
    except (RuntimeError, OSError):  # RuntimeError: a symlink loop before Python 3.13
        return "is a symbolic-link loop"
    return None


def checked_path(path: Path | str, what: str = "") -> Path:
    """`path` as a Path, or an InputError naming it (and `what` it is) and the problem."""
    problem = path_problem(path)
    if problem:
        raise InputError(f"{what + ' ' if what else ''}{shown(path)}: {problem}")
    return Path(path)


def existing_dir(path: Path | str, what: str) -> Path:
    """A checked path that is a directory (not a file, not missing)."""
    path = checked_path(path, what)
    if not path.is_dir():
        state = "is a file, not a directory" if path.exists() else "does not exist"
        raise InputError(f"{what} {shown(path)}: {state}")
    return path


# ---------------------------------------------------------------- structured text


def check_depth(value: Any, where: str, limit: int = MAX_DEPTH) -> Any:
    """`value` unchanged when its lists and dicts nest at most `limit` deep (checked without
    recursion, so whatever reads it next cannot overflow the stack)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                raise InputError(f"{where}: nested more than {limit} levels deep")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def parsed(parse: Callable[[str], Any], data: bytes | str, where: str, language: str) -> Any:
    """`parse` (json.loads, tomllib.loads) on UTF-8 text, bounded in nesting; InputError naming
    `where`. ValueError covers the parsers' own errors and integers of more digits than Python
    converts."""
    try:
        value = parse(data.decode("utf-8") if isinstance(data, bytes) else data)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise InputError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as e:
        raise InputError(f"{where}: invalid {language} ({e})") from None
    return check_depth(value, where)


def loads_json(data: bytes | str, where: str) -> Any:
    """JSON text (UTF-8), bounded in nesting; InputError naming `where`."""
    return parsed(json.loads, data, where, "JSON")


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """A regular file's bytes, at most `limit` of them (a FIFO or device is refused unread);
    InputError otherwise."""
    path = checked_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InputError(f"{shown(path)}: file not found") from None
    except OSError as e:
        raise InputError(f"{shown(path)}: cannot read ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = " (a directory)" if stat.S_ISDIR(mode) else ""
        raise InputError(f"{shown(path)}: not a regular file{kind}, expected a {what}")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise InputError(f"{shown(path)}: cannot read ({e.strerror or e})") from None
    if len(data) > limit:
        raise InputError(f"{shown(path)}: larger than {size_text(limit)}, too large for a {what}")
    return data


def size_text(n: int) -> str:
    """A byte count as people write limits: 256 KiB, 64 MiB, 100 bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object file (config.json, an index, a tokenizer's or a stage's record): bounded in
    size and nesting, UTF-8, valid, an object; else InputError naming the file."""
    value = loads_json(read_bytes(path, limit, "JSON file"), shown(path))
    if not isinstance(value, dict):
        raise InputError(f"{shown(path)}: expected a JSON object, got {type(value).__name__}")
    return value


def read_toml(path: Path, limit: int = MAX_TOML_BYTES) -> dict[str, Any]:
    """A TOML file (a recipe), bounded in size and nesting; InputError naming the file."""
    return parsed(tomllib.loads, read_bytes(path, limit, "TOML file"), shown(path), "TOML")


def typed(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """obj[key] when it has type `kind` (bool is not an int here); InputError naming where/key."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    value = obj.get(key) if isinstance(obj, dict) else None
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        got = "missing" if not isinstance(obj, dict) or key not in obj else type(value).__name__
        raise InputError(f"{where}: {key!r} must be {names}, got {got}")
    return value


# ---------------------------------------------------------------- GGUF


GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS
GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a memory map; every count is checked against the bytes left."""

    def __init__(self, buf: mmap.mmap, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def fail(self, what: str) -> InputError:
        return InputError(f"{self.where}: corrupt GGUF header at byte {self.pos}: {what}")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n} bytes, {len(self.buf) - self.pos} are left")
        at, self.pos = self.pos, self.pos + n
        return at

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def count(self, each: int, what: str) -> int:
        """A u64 count of items of at least `each` bytes, bounded by the bytes left."""
        n = self.u("<Q", what)
        if n * each > len(self.buf) - self.pos:
            raise self.fail(f"{what} {n} cannot fit in the {len(self.buf) - self.pos} bytes left")
        return n

    def string(self, what: str) -> bytes:
        n = self.count(1, f"{what} length")
        return bytes(self.buf[self.take(n, what):self.pos])

    def value(self, vtype: int, key: str) -> Any:
        """Skip (or read, for small scalars and strings) one value; arrays iteratively."""
        if vtype in GGUF_SCALARS:
            size = GGUF_SCALARS[vtype]
            return self.buf[self.take(size, key):self.pos]
        if vtype == GGUF_STRING:
            return self.string(key)
        if vtype != GGUF_ARRAY:
            raise self.fail(f"{key}: unknown value type {vtype}")
        etype = self.u("<I", f"{key} element type")
        if etype in GGUF_SCALARS:
            n = self.count(GGUF_SCALARS[etype], f"{key} array length")
            self.take(n * GGUF_SCALARS[etype], key)
        elif etype == GGUF_STRING:
            for _ in range(self.count(8, f"{key} array length")):
                self.string(key)
        else:  # llama.cpp writes no nested arrays
            raise self.fail(f"{key}: arrays of type {etype} are not supported")
        return None


def check_gguf(path: Path) -> dict[str, Any]:
    """Walk a GGUF file's header in time and memory bounded by the file's size, whatever it
    declares: magic, version, every key/value, every tensor's dims, type and data range. Returns
    {version, tensors, keys}; InputError naming the file on any defect."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = checked_path(path, "GGUF file")
    where = shown(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise InputError(f"{where}: {size} bytes, too short for a GGUF file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise InputError(f"{where}: GGUF file missing") from None
    except IsADirectoryError:
        raise InputError(f"{where}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read ({e.strerror or e})") from None
    with buf:
        c = _Cursor(buf, where)
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise InputError(f"{where}: not a GGUF file (magic {bytes(buf[:4])!r})")
        c.pos = 4
        version = c.u("<I", "version")
        if version not in GGUF_VERSIONS:
            raise c.fail(f"version {version} (readable: {GGUF_VERSIONS})")
        n_tensors = c.count(8 + 4 + 4 + 8, "tensor count")
        n_kv = c.count(8 + 4 + 1, "key/value count")
        alignment = 32
        for _ in range(n_kv):
            key = c.string("key").decode("utf-8", "replace")
            vtype = c.u("<I", f"{key} type")
            value = c.value(vtype, key)
            if key == "general.alignment":
                alignment = int.from_bytes(value, "little") if isinstance(value, (bytes, memoryview)) else 0
                if vtype != 4 or alignment < 1 or alignment & (alignment - 1):
                    raise c.fail(f"general.alignment must be a power-of-two u32, got {alignment}")
        tensors = []
        for _ in range(n_tensors):
            name = c.string("tensor name").decode("utf-8", "replace")
            n_dims = c.u("<I", f"{name} dimension count")
            if not 1 <= n_dims <= GGUF_MAX_DIMS:
                raise c.fail(f"tensor {name}: {n_dims} dimensions (1 to {GGUF_MAX_DIMS})")
            dims = [c.u("<Q", f"{name} dimension") for _ in range(n_dims)]
            ttype, offset = c.u("<I", f"{name} type"), c.u("<Q", f"{name} offset")
            try:
                block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise c.fail(f"tensor {name}: unknown tensor type {ttype}") from None
            n = 1
            for d in dims:
                n *= d
            if dims[0] % block:
                raise c.fail(f"tensor {name}: row of {dims[0]} is not whole blocks of {block}")
            tensors.append((name, offset, n // block * nbytes))
        start = -(-c.pos // alignment) * alignment
        for name, offset, nbytes in tensors:
            if offset % alignment or start + offset + nbytes > size:
                raise InputError(f"{where}: tensor {name}: data [{offset}, {offset + nbytes}) "
                                 f"after byte {start} is misaligned or past the end of the "
                                 f"{size}-byte file (truncated or corrupt)")
    return {"version": version, "tensors": n_tensors, "keys": n_kv}


def gguf_reader(path: Path) -> Any:
    """gguf's GGUFReader on a file whose header check_gguf passed (so its work is bounded)."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise InputError(f"{shown(path)}: not a readable GGUF file ({e})") from None


MAX_SIZE = 1 << 60  # a shard size beyond any disk
DEFAULT_SHARD_SIZE = "5GB"  # the stages' default largest safetensors file (parse_size)


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1024' -> bytes (at least 1, at most MAX_SIZE), exactly."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"(-?(?:\d{1,30}(?:\.\d{0,30})?|\.\d{1,30}))\s*([KMGT]I?B|B)?",
                     str(text).strip().upper())
    if not m:
        raise ValueError(f"cannot parse size {str(text)[:40]!r} (examples: 5GB, 500MB, 2GiB)")
    size = int(Fraction(m.group(1)) * units[m.group(2) or ""])
    if size < 1:
        raise ValueError(f"size {str(text)[:40]!r}: must be at least 1 byte")
    if size > MAX_SIZE:
        raise ValueError(f"size {str(text)[:40]!r}: must be at most {MAX_SIZE >> 50} PiB")
    return size
