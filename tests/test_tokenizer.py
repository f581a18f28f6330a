"""Tokenizer conversion: AutoTokenizer on the output gives the ids Meta's tokenizer gives
(sentencepiece / tiktoken used directly as the reference), for code, unicode and whitespace.
Chat templates, infilling prompts and transformers 4.x: tests/test_chat.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import tiktoken
from meta_fixtures import (CODELLAMA_INFILL, LLAMA3_PATTERN, padded_sentencepiece_model,
                           sentencepiece_model, tiktoken_model)
from sentencepiece import sentencepiece_model_pb2 as pb
from tiktoken.load import load_tiktoken_bpe
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.tokenizer import check_ids, convert_tokenizer, load_source, tokenizer_kind

TEXTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n-1) + fibonacci(n-2)\n",
    "class A:\n\tdef f(self):  # tab, then   three spaces\n\t\tpass\n\n\n\n",
    "x = {'key': [1, 2, 3]}    \r\n    y = x['key'][0]",
    "Größe naïve café — 日本語 中文 한국어 русский 🦙🚀 ∑∫√",
    "    four leading spaces",
    "  two leading, trailing  ",
    " ",
    "\n\n\n",
    "9876543210 3.14159 0xFF",
    "",
)
# Meta's Llama 3 special tokens, by position: what the reference tiktoken.Encoding is given.
L3_NAMES = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
            7: "<|end_header_id|>", 9: "<|eot_id|>"}
L31_NAMES = {**L3_NAMES, 4: "<|finetune_right_pad_id|>", 8: "<|eom_id|>", 10: "<|python_tag|>"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Converted tokenizer directories: (family, source) -> (dir, summary)."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(family: str, source: Path) -> tuple[Path, dict]:
        key = f"{family}-{source.name}"
        if key not in cache:
            d = tmp_path_factory.mktemp(key)
            cache[key] = d, convert_tokenizer(source, d, family, 4096)
        return cache[key]

    return get


def sp_reference(path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("family", ["llama1", "llama2"])
def test_sentencepiece_ids_and_decode(out, family):
    d, summary = out(family, sentencepiece_model())
    sp = sp_reference(sentencepiece_model())
    tok = AutoTokenizer.from_pretrained(d)
    assert summary["vocab_size"] == len(tok) == sp.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), text


def test_written_files_load_in_transformers_4_and_5(out):
    """tokenizer_config.json avoids 5.x-only keys (a list `extra_special_tokens`, `backend`)
    that transformers 4.x cannot read; tokenizer.model travels with it (tests/test_chat.py loads
    the files in 4.x)."""
    d, _ = out("llama2", sentencepiece_model())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert not {"extra_special_tokens", "backend", "is_local"} & set(cfg)
    assert cfg["add_bos_token"] is True and cfg["legacy"] is True
    assert (d / "tokenizer.model").read_bytes() == sentencepiece_model().read_bytes()
    specials = json.loads((d / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                        "pad_token": "<unk>"}


def test_codellama_infilling_pieces_keep_metas_ids(out):
    """The infilling pieces stay at Meta's ids (the prompt is built from them: tests/test_chat.py
    checks it against Meta's infilling_prompt_tokens)."""
    model = padded_sentencepiece_model(32016)
    d, summary = out("codellama", model)
    sp = sp_reference(model)
    tok = AutoTokenizer.from_pretrained(d)
    assert summary["vocab_size"] == len(tok) == sp.get_piece_size() == 32016
    assert summary["infill"] == {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}
    for i, piece in CODELLAMA_INFILL.items():
        assert tok.convert_tokens_to_ids(piece) == sp.piece_to_id(piece) == i


@pytest.mark.parametrize("size", [32016, 32000])
def test_codellama_ids_through_autotokenizer(out, size):
    """Every text, leading spaces included, through AutoTokenizer and through tokenizer.json (what
    tokenizers-based servers load). The generic class keeps tokenizer.json as written: 5.x's
    CodeLlamaTokenizer would rebuild its pre-tokenizer and drop the dummy prefix before a
    leading space (the first assertion below catches that)."""
    model = padded_sentencepiece_model(size)
    d, _ = out("codellama", model)
    sp = sp_reference(model)
    raw = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(d)
    assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    for text in TEXTS:
        want = [sp.bos_id(), *sp.encode(text)]
        assert raw.encode(text).ids == want, text
        assert tok(text)["input_ids"] == want, text


def test_codellama_34b_has_no_infilling(out):
    d, summary = out("codellama", padded_sentencepiece_model(32000))
    assert summary["vocab_size"] == 32000 and summary["infill"] is None


def test_codellama_vocabulary_without_infilling_pieces_is_refused(tmp_path):
    m = pb.ModelProto()
    m.ParseFromString(padded_sentencepiece_model(32016).read_bytes())
    m.pieces[32008].piece = "<not SUF>"
    (tmp_path / "bad.model").write_bytes(m.SerializeToString())
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"32016 pieces but no infilling piece\(s\) \['▁<SUF>'\]"):
        convert_tokenizer(tmp_path / "bad.model", tmp_path / "out", "codellama", 4096)


def tiktoken_reference(path: Path, names: dict[int, str]) -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(str(path))
    n = len(ranks)
    specials = {names.get(i, f"<|reserved_{i}|>"): n + i for i in range(256)}
    return tiktoken.Encoding("ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


@pytest.mark.parametrize("family,names", [("llama3", L3_NAMES), ("llama3.1", L31_NAMES)])
def test_llama3_ids_and_special_tokens(out, family, names):
    d, summary = out(family, tiktoken_model())
    enc = tiktoken_reference(tiktoken_model(), names)
    tok = AutoTokenizer.from_pretrained(d)
    n = len(load_tiktoken_bpe(str(tiktoken_model())))
    assert len(tok) == summary["vocab_size"] == n + 256
    assert (tok.bos_token_id, tok.eos_token_id) == (n, n + 1)
    for i, name in names.items():
        assert tok.convert_tokens_to_ids(name) == n + i
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [n, *enc.encode(text, disallowed_special=())], text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert summary["stop_ids"] == [n + 1]  # base model; chat formats add theirs (test_chat.py)


def test_check_ids_catches_a_wrong_tokenizer_json(out, tmp_path):
    """Negative control for the conversion's own check: SentencePiece's dummy prefix dropped."""
    d, _ = out("llama2", sentencepiece_model())
    j = json.loads((d / "tokenizer.json").read_text())
    j["normalizer"] = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(PipelineError, match="encodes"):
        check_ids(tmp_path / "tokenizer.json", load_source(sentencepiece_model(), "llama2"))


def test_tokenizer_kind(tmp_path):
    assert tokenizer_kind(sentencepiece_model()) == "sentencepiece"
    assert tokenizer_kind(tiktoken_model()) == "tiktoken"
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 not a tokenizer \xff" * 50)
    with pytest.raises(InputError, match="neither a SentencePiece model nor a tiktoken"):
        tokenizer_kind(bad)
