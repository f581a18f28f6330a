"""The input boundary (pipeline/core/bounded.py), by class: nesting, sizes and counts larger than the file,
types that are not what they claim, and paths. Each hostile input is built here and must give an
InputError naming the file, in bounded time and memory; the well-formed twin of each is read."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.bounded import (MAX_DEPTH, check_gguf, checked_path, gguf_reader, loads_json,
                                   read_bytes, read_json, read_toml, typed)
from pipeline.core.errors import InputError


def deep_json(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


@pytest.mark.parametrize("text", [deep_json(50_000), deep_json(MAX_DEPTH + 1),
                                  '{"a":' * 5000 + "1" + "}" * 5000,
                                  '{"x": ' + deep_json(MAX_DEPTH + 5) + "}"])
def test_json_nested_too_deep_is_an_input_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"{path}: nested more than {MAX_DEPTH} levels"):
        read_json(path)


def test_json_at_the_depth_limit_reads():
    value = loads_json('{"a": ' + deep_json(MAX_DEPTH - 1) + "}", "x")
    assert isinstance(value["a"], list)


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ("{" + '"a": 1,' * 3 + "}", "invalid JSON"),
    ("1" * 5000, "invalid JSON"),  # more digits than Python converts to an int
    ("\xff\xfe{}", "invalid JSON"),
])
def test_json_of_the_wrong_shape(tmp_path, text, problem):
    path = tmp_path / "job.json"
    path.write_text(text)
    with pytest.raises(InputError, match=problem):
        read_json(path)


def test_json_binary_and_oversized(tmp_path):
    path = tmp_path / "verify.json"
    path.write_bytes(b"\x00\xff\x80binary")
    with pytest.raises(InputError, match=rf"{path}: not UTF-8"):
        read_json(path)
    path.write_bytes(b"{" + b" " * 2048 + b"}")
    with pytest.raises(InputError, match="larger than 1 KiB"):
        read_json(path, limit=1024)


@pytest.mark.parametrize("text", ["a = " + deep_json(20_000),
                                  "a = " + "{b = " * 3000 + "1" + "}" * 3000,
                                  "[" + ".".join(["t"] * (MAX_DEPTH + 2)) + "]\nx = 1\n",
                                  "x." * (MAX_DEPTH + 2) + "y = 1\n"])
def test_toml_nested_too_deep_is_an_input_error(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"{path}: nested more than {MAX_DEPTH} levels"):
        read_toml(path)


def test_toml_numbers_and_bytes(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text("x = " + "9" * 5000 + "\n")
    with pytest.raises(InputError, match="invalid TOML"):
        read_toml(path)
    path.write_bytes(b"x = '\xff'\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_toml(path)


def test_a_fifo_or_directory_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "params.json"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(InputError, match="not a regular file"):
        read_bytes(fifo, 100)
    assert time.monotonic() - t0 < 5
    with pytest.raises(InputError, match=r"not a regular file \(a directory\)"):
        read_json(tmp_path)


def test_typed_names_file_and_key():
    obj = {"stages": [], "n": True, "x": 1}
    with pytest.raises(InputError, match="job.json: 'stages' must be dict, got list"):
        typed(obj, "stages", dict, "job.json")
    with pytest.raises(InputError, match="'n' must be int, got bool"):
        typed(obj, "n", int, "f")
    with pytest.raises(InputError, match="'gone' must be str, got missing"):
        typed(obj, "gone", str, "f")
    assert typed(obj, "x", int, "f") == 1


@pytest.mark.parametrize("path, problem", [
    ("a\0b", "contains a NUL byte"),
    ("x" * 256, "has a name of 256 bytes"),
    ("d/" * 2100, "bytes long"),
    (os.fsdecode(b"caf\xe9"), "not valid UTF-8"),
])
def test_paths_that_cannot_name_a_file(path, problem):
    with pytest.raises(InputError, match=problem):
        checked_path(path, "--out")


def test_a_symlink_loop_is_named(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(InputError, match="symbolic-link loop"):
        checked_path(tmp_path / "a" / "params.json")
    with pytest.raises(InputError, match=r"a: is a symbolic-link loop"):
        read_json(tmp_path / "a")


# ---------------------------------------------------------------- GGUF


def tiny_gguf(path: Path) -> Path:
    """A small valid GGUF file (llama.cpp's own writer): string, array and scalar metadata and
    two tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_token_list(["a", "b", "c"])
    w.add_uint32("test.count", 7)
    w.add_tensor("t0", np.arange(64, dtype=np.float32))
    w.add_tensor("t1", np.ones((4, 32), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def header_counts(data: bytes) -> tuple[int, int]:
    return struct.unpack_from("<QQ", data, 8)


def key_offset(data: bytes, key: bytes) -> int:
    """Byte offset of a key/value entry's value type, just after the key's string."""
    at = data.index(key)
    return at + len(key)


def test_valid_gguf_reads(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    assert check_gguf(path) == {"version": 3, "tensors": 2, "keys": 4}
    assert gguf_reader(path).get_field("general.name").contents() == "tiny"


def mutate(data: bytes, kind: str) -> bytes:
    b = bytearray(data)
    if kind == "tensor count 2^62":
        struct.pack_into("<Q", b, 8, 1 << 62)
    elif kind == "key count 2^60":
        struct.pack_into("<Q", b, 16, 1 << 60)
    elif kind == "array of 2^60 strings":
        at = key_offset(data, b"tokenizer.ggml.tokens")
        struct.pack_into("<Q", b, at + 8, 1 << 60)  # after the value type and element type
    elif kind == "string of 2^63 bytes":
        struct.pack_into("<Q", b, key_offset(data, b"general.name") + 4, 1 << 63)
    elif kind == "unknown value type":
        struct.pack_into("<I", b, key_offset(data, b"test.count"), 99)
    elif kind == "bad magic":
        b[:4] = b"GGML"
    elif kind == "version 99":
        struct.pack_into("<I", b, 4, 99)
    elif kind == "truncated":
        del b[len(b) // 2:]
    elif kind == "tensor past the end":
        del b[-16:]
    elif kind == "tensor with 9 dims":
        at = data.index(b"t0") + 2
        struct.pack_into("<I", b, at, 9)
    elif kind == "tensor of unknown type":
        at = data.index(b"t0") + 2 + 4 + 8
        struct.pack_into("<I", b, at, 1000)
    return bytes(b)


@pytest.mark.parametrize("kind", ["tensor count 2^62", "key count 2^60", "array of 2^60 strings",
                                  "string of 2^63 bytes", "unknown value type", "bad magic",
                                  "version 99", "truncated", "tensor past the end",
                                  "tensor with 9 dims", "tensor of unknown type"])
def test_gguf_header_is_bounded_by_the_file(tmp_path, kind):
    good = tiny_gguf(tmp_path / "good.gguf").read_bytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(mutate(good, kind))
    t0 = time.monotonic()
    with pytest.raises(InputError, match=str(path)):
        gguf_reader(path)
    assert time.monotonic() - t0 < 2, "reading a hostile header must not take time it declares"
