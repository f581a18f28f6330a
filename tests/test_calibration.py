"""Calibration windows against SentencePiece's own encoding of the text (the tokenizer reference),
for glob, directory, file and JSONL sources; seeds; clear errors."""

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from demo_model import demo_fp16
from transformers import AutoTokenizer

from pipeline.core.calibration import load_calibration
from pipeline.core.errors import InputError

NAMES = ["x", "y", "n", "total", "count", "items", "value", "key", "result", "data", "index"]
OPS = ["+", "-", "*", "//", "%"]


def _function(rng: random.Random) -> str:
    """One small Python function with regular structure (loops, arithmetic, returns)."""
    a, b, c = rng.sample(NAMES, 3)
    k, m = rng.randint(1, 99), rng.randint(2, 9)
    op = rng.choice(OPS)
    body = rng.choice([
        f"    {c} = 0\n    for i in range({a}):\n        {c} = {c} {op} i * {m}\n    return {c}\n",
        f"    if {a} > {k}:\n        return {a} {op} {b}\n    return {b} {op} {k}\n",
        f"    {c} = [{a} {op} i for i in range({m})]\n    return sum({c}) + {k}\n",
        f"    while {a} < {k}:\n        {a} = {a} * {m}\n    return {a} {op} {b}\n",
    ])
    return f"def {rng.choice(NAMES)}_{k}({a}, {b}):\n{body}\n"


def write_corpus(directory: Path, name: str, seed: int, n_functions: int) -> Path:
    rng = random.Random(seed)
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_function(rng) for _ in range(n_functions)))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return demo_fp16(tmp_path_factory.mktemp("demo") / "fp16")


@pytest.fixture(scope="module")
def tok(model):
    return AutoTokenizer.from_pretrained(model)


def spm_stream(model, texts: list[str]) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    return [t for text in texts for t in sp.encode(text) + [sp.eos_id()]]


def assert_windows_from(windows: torch.Tensor, stream: list[int], seqlen: int) -> None:
    """Every window is BOS + one of the stream's aligned (seqlen−1)-token chunks, all distinct."""
    span = seqlen - 1
    chunks = [tuple(stream[k:k + span]) for k in range(0, len(stream) - span + 1, span)]
    rows = [tuple(w[1:].tolist()) for w in windows]
    assert windows.shape[1] == seqlen and (windows[:, 0] == 1).all()
    assert all(r in chunks for r in rows) and len(set(rows)) == len(rows)


def test_file_and_glob_windows_match_sentencepiece(model, tok, tmp_path):
    text = write_corpus(tmp_path, "a/one.py", seed=5, n_functions=60).read_text()
    windows, info = load_calibration(str(tmp_path / "a" / "*.py"), tok, nsamples=8, seqlen=64, seed=0)
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    assert_windows_from(windows, spm_stream(model, [text]), 64)
    assert info["files"] == 1 and info["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert (info["nsamples"], info["seqlen"], info["seed"]) == (8, 64, 0)
    same, _ = load_calibration(str(tmp_path / "a" / "one.py"), tok, nsamples=8, seqlen=64, seed=0)
    other, _ = load_calibration(str(tmp_path / "a" / "one.py"), tok, nsamples=8, seqlen=64, seed=1)
    assert torch.equal(same, windows) and not torch.equal(other, windows)


def test_directory_and_jsonl(model, tok, tmp_path):
    src = tmp_path / "data"
    docs = [write_corpus(tmp_path, f"docs/{i}.txt", seed=10 + i, n_functions=20).read_text() for i in range(3)]
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "records.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "meta": 1}) for d in docs[:2]) + "\n\n")
    (src / "code.py").write_text(docs[2])
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref: refs/heads/main " * 500)  # hidden: skipped
    (src / "blob.bin").write_bytes(b"\xff\xfe\x00" * 1000)  # not UTF-8: skipped
    windows, info = load_calibration(str(src), tok, nsamples=30, seqlen=32, seed=3)
    assert info["files"] == 2
    orders = ([docs[0], docs[1], docs[2]], [docs[2], docs[0], docs[1]])  # files shuffled by seed
    assert any(all(tuple(w[1:].tolist()) in {tuple(s[k:k + 31]) for k in range(0, len(s), 31)}
                   for w in windows) for s in (spm_stream(model, o) for o in orders))


def test_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="no files found"):
        load_calibration(str(tmp_path / "missing" / "**" / "*.py"), tok, 4, 32)
    (tmp_path / "small.py").write_text("def f(x):\n    return x\n" * 5)
    with pytest.raises(InputError, match=r"small.py.*tokens make \d+ windows of 32 tokens, 100 requested"):
        load_calibration(str(tmp_path / "small.py"), tok, 100, 32)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: a JSONL record needs one of the fields"):
        load_calibration(str(tmp_path / "bad.jsonl"), tok, 1, 8)
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:1: invalid JSON"):
        load_calibration(str(tmp_path / "broken.jsonl"), tok, 1, 8)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as when it is not installed
    with pytest.raises(InputError, match="needs the `datasets` library"):
        load_calibration("hf:allenai/c4:en:train:text", tok, 4, 32)
    with pytest.raises(InputError, match=r"expected hf:DATASET\[:CONFIG\]:SPLIT:FIELD"):
        load_calibration("hf:c4", tok, 4, 32)


class _Stream(list):
    """A stand-in for a streamed `datasets` split: iterable records and a seeded shuffle."""

    def shuffle(self, seed: int, buffer_size: int) -> "_Stream":
        return _Stream(sorted(self, key=lambda r: hashlib.sha256(f"{seed}{r}".encode()).digest()))


def test_hf_source_keeps_dataset_order_for_eval_and_shuffles_for_calibration(monkeypatch):
    """The `datasets` path: evaluation text in the split's order, calibration seeded-shuffled."""
    from types import SimpleNamespace

    from pipeline.core.calibration import hf_documents

    records = _Stream({"text": f"doc {i}"} for i in range(20))
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return records

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    assert list(hf_documents("hf:wikitext:wikitext-2-raw-v1:test:text", None)) == \
        [f"doc {i}" for i in range(20)]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test", True)]
    shuffled = list(hf_documents("hf:some/set:train:text", 0))
    assert sorted(shuffled) == sorted(f"doc {i}" for i in range(20))
    assert shuffled != [f"doc {i}" for i in range(20)]
    with pytest.raises(InputError, match="records have no field 'content'"):
        list(hf_documents("hf:some/set:train:content", None))
