"""Property-based fuzzing (hypothesis) of every kind of input the tool reads, each through the
command that reads it, in this process: params.json, checklist.chk and a tiktoken tokenizer.model
(convert), config.json, a safetensors header and tokenizer_config.json (quantize), a calibration
.jsonl (quantize), a recipe (run), job.json (run), verify.json (publish), and GGUF headers and
metadata (the reader every GGUF consumer goes through). Mutations are structural (a JSON value
replaced by a hostile one: deep nesting, huge numbers, wrong types, paths, a secret) and byte by
byte (flips, splices, truncation).

For every mutant: the exit code is 0, 2 or 3; no traceback; the inputs are byte-identical
afterwards; and the canary secret in $HF_TOKEN (which mutants also write into the inputs) appears
in no output. Seeded (derandomize) and bounded: EXAMPLES per kind, under a minute in all."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import textwrap
from pathlib import Path

import pytest
from cli_runner import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meta_fixtures import build_checkpoint, refresh_checklist
from tiny_project import RTN, build_project

from pipeline.core.bounded import gguf_reader
from pipeline.core.errors import InputError
from pipeline.gguf import write_gguf

pytestmark = pytest.mark.slow  # hypothesis over every input kind

CANARY = "hf_" + "FuzzCanary0SecretValue1234567890abcdef"
EXAMPLES = 60  # per kind: about a minute for all kinds on 2 idle cores
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HOSTILE = st.one_of(
    st.sampled_from([None, True, -1, 0, 2**64, 10**400, 1e308, -0.0, "", CANARY, "HF_TOKEN",
                     "../../escape", "/etc/passwd", "a\0b", "x" * 300, [], {}, [[]] * 3,
                     "F16", "llama", {"rope_type": "llama3"}]),
    st.integers(min_value=1, max_value=40_000).map(lambda n: json.loads("[" * min(n, 900) +
                                                                         "]" * min(n, 900))),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
DEEP = st.integers(min_value=65, max_value=60_000).map(lambda n: ("[" * n + "]" * n).encode())


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in [root] if root.is_file() else sorted(root.rglob("*")):
        h.update(str(p).encode() + b"\0")
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@st.composite
def byte_mutant(draw, data: bytes) -> bytes:
    """1-3 byte-level edits: bit flips, splices of hostile bytes, deletions, truncation."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(len(b) - 1, 0)))
        op = draw(st.sampled_from(["flip", "splice", "delete", "truncate"]))
        if op == "flip" and b:
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "splice":
            piece = draw(st.one_of(st.binary(max_size=16), DEEP, st.just(CANARY.encode()),
                                   st.just(b"9" * 400), st.just(b"\xff\xfe\x00")))
            b[at:at + draw(st.integers(0, 8))] = piece
        elif op == "delete":
            del b[at:at + draw(st.integers(1, 64))]
        else:
            del b[at:]
    return bytes(b)


@st.composite
def json_mutant(draw, value: object) -> bytes:
    """One structural edit of a JSON document: a value somewhere replaced by a hostile one, a key
    deleted or added."""
    value = json.loads(json.dumps(value))
    node, steps = value, draw(st.integers(0, 4))
    for _ in range(steps):
        children = list(node) if isinstance(node, dict) else list(range(len(node))) \
            if isinstance(node, list) else []
        if not children:
            break
        key = draw(st.sampled_from(children))
        if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
            break
        node = node[key]
    if isinstance(node, dict):
        keys = list(node) or ["new"]
        key = draw(st.sampled_from(keys + ["new_key"]))
        if key in node and draw(st.integers(0, 5)) == 0:
            del node[key]
        else:
            node[key] = draw(HOSTILE)
    elif isinstance(node, list) and node:
        node[draw(st.integers(0, len(node) - 1))] = draw(HOSTILE)
    else:
        value = draw(HOSTILE)
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def mutant(draw, data: bytes, structured: bool) -> bytes:
    if structured and draw(st.booleans()):
        try:
            return draw(json_mutant(json.loads(data)))
        except (ValueError, RecursionError):
            pass
    return draw(byte_mutant(data))


@st.composite
def toml_mutant(draw, text: str) -> bytes:
    """A recipe with one line's value replaced by a hostile TOML value, or byte-level edits."""
    lines = text.splitlines()
    if draw(st.booleans()):
        i = draw(st.sampled_from([i for i, line in enumerate(lines) if " = " in line]))
        key = lines[i].split(" = ")[0]
        value = draw(st.sampled_from([
            '"../../escape"', '"/tmp/x"', '"HF_TOKEN"', f'"{CANARY}"', "9" * 400, "-1", "true",
            "[" * 30000 + "]" * 30000, '"a\\u0000b"', '"x\\n"', '{ a = { b = 1 } }', "[]",
            '"org/x..y"', "1e999", '"' + "y" * 300 + '"']))
        lines[i] = f"{key} = {value}"
        return ("\n".join(lines) + "\n").encode()
    return draw(byte_mutant(text.encode()))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    d = build_project(tmp_path_factory.mktemp("fuzz"))
    build_checkpoint(d / "meta3", "llama3", n_shards=1)
    (d / "cal.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in
                                         inspect.getsource(textwrap).split("\n\n")))
    write_gguf(d / "fp16", d / "m.gguf")
    return d


class Case:
    """One fuzzed kind: the file mutated, the command that reads it, the inputs to keep intact."""

    def __init__(self, root: Path, target: str, argv: list, inputs: list[str]) -> None:
        self.root, self.target, self.argv, self.inputs = root, root / target, argv, inputs


def cases(d: Path) -> dict[str, Case]:
    job = d / "job"
    q = ["quantize", d / "fp16", d / "out", *RTN]
    return {
        "params.json": Case(d, "meta/params.json", ["convert", d / "meta", d / "out"], ["meta"]),
        "checklist.chk": Case(d, "meta/checklist.chk", ["convert", d / "meta", d / "out"], ["meta"]),
        "tiktoken tokenizer.model": Case(d, "meta3/tokenizer.model",
                                         ["convert", d / "meta3", d / "out"], ["meta3"]),
        "config.json": Case(d, "fp16/config.json", q, ["fp16"]),
        "safetensors header": Case(d, "fp16/model.safetensors", q, ["fp16"]),
        "tokenizer_config.json": Case(d, "fp16/tokenizer_config.json",
                                      ["quantize", d / "fp16", d / "out", "--calibration", d / "cal.py",
                                       "--nsamples", "2", "--seqlen", "16", "--device", "cpu"],
                                      ["fp16", "cal.py"]),
        "calibration .jsonl": Case(d, "cal.jsonl", ["quantize", d / "fp16", d / "out", "--calibration",
                                                    d / "cal.jsonl", "--nsamples", "2", "--seqlen",
                                                    "16", "--device", "cpu"], ["fp16", "cal.jsonl"]),
        "recipe": Case(d, "tiny.toml", ["run", d / "tiny.toml", "--workdir", d / "new", "--stage",
                                        "convert", "--device", "cpu"], ["tiny.toml", "meta"]),
        "job.json": Case(d, "job/job.json", ["run", d / "tiny.toml", "--workdir", job, "--stage",
                                             "convert", "--device", "cpu"], ["meta", "tiny.toml"]),
        "verify.json": Case(d, "job/verify/verify.json",
                            ["publish", d / "tiny.toml", "--workdir", job, "--dry-run"],
                            ["job/fp16", "job/gptq", "job/verify"]),
    }


@pytest.fixture
def fuzz_env(monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", CANARY)

    def run(argv: list) -> tuple[int, str]:
        return (lambda c, o, e: (c, o + e))(*run_cli(argv, monkeypatch, capsys))
    return run


@pytest.mark.parametrize("kind", list(cases(Path("/x"))))
def test_fuzz_every_input_kind(built, tmp_path, fuzz_env, kind):
    original = cases(built)[kind].target.read_bytes()
    structured = kind.endswith(".json")

    @FUZZ
    @given(st.data())
    def one(data):
        root = tmp_path / "case"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(built, root, symlinks=True)
        case = cases(root)[kind]
        bad = data.draw(toml_mutant(original.decode()) if kind == "recipe"
                        else mutant(original, structured))
        case.target.write_bytes(bad)
        if case.target.parent.name in ("meta", "meta3") and case.target.name != "checklist.chk":
            refresh_checklist(case.target.parent)  # the edit must reach the parser, not md5
        before = {p: digest(root / p) for p in case.inputs}
        code, text = fuzz_env(case.argv)
        where = f"{kind}: exit {code}\n{text[-2500:]}"
        assert code in (0, 2, 3), where
        assert "Traceback" not in text and "internal error" not in text, where
        assert CANARY not in text, where
        assert {p: digest(root / p) for p in case.inputs} == before, where
    one()


@settings(FUZZ, max_examples=4 * EXAMPLES)
@given(st.data())
def test_fuzz_gguf_headers_and_metadata(built, tmp_path, data):
    """Every GGUF consumer (verify --gguf, publish's scan, the card) reads through gguf_reader:
    each mutant is an InputError naming the file, or a reader whose every field decodes."""
    good = (built / "m.gguf").read_bytes()
    header_end = good.index(b"general.architecture") + 4096  # the metadata region
    head = data.draw(byte_mutant(good[:header_end]))
    path = tmp_path / "m.gguf"
    path.write_bytes(head + good[header_end:])
    try:
        reader = gguf_reader(path)
    except InputError as e:
        assert str(path) in str(e)
        return
    for f in reader.fields.values():
        f.contents()
