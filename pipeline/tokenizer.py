"""Tokenizer conversion through transformers: a SentencePiece model (Llama 1/2, Code Llama with its
infilling pieces) or a tiktoken ranks file (Llama 3.x) becomes tokenizer.json,
tokenizer_config.json and special_tokens_map.json, checked id for id against the source."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import InputError, PipelineError

# Meta's Llama 3 pre-tokenisation pattern and special tokens (256 after the BPE ranks).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
_R = "<|reserved_special_token_{}|>"
LLAMA3_SPECIAL = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", *(_R.format(i) for i in range(4)),
               "<|start_header_id|>", "<|end_header_id|>", _R.format(4), "<|eot_id|>",
               *(_R.format(i) for i in range(5, N_SPECIAL - 5))],
    "llama3.1": ["<|begin_of_text|>", "<|end_of_text|>", _R.format(0), _R.format(1),
                 "<|finetune_right_pad_id|>", _R.format(2), "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                 *(_R.format(i) for i in range(3, N_SPECIAL - 8))],
}
# Code Llama's infilling pieces (7B/13B: after the 32000 Llama pieces) and HF's fill marker.
INFILL = {"prefix_token": "▁<PRE>", "middle_token": "▁<MID>", "suffix_token": "▁<SUF>",
          "eot_token": "▁<EOT>"}
FILL_TOKEN = "<FILL_ME>"
# Generation stops at any of these (Llama 3.x: end of text, end of message, end of turn).
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# transformers class written to tokenizer_config.json, per family. Llama 1/2 and Llama 3 use the
# generic class: transformers 5.x rebuilds LlamaTokenizer's pre-tokenizer on load (Metaspace, which
# drops SentencePiece's dummy prefix before leading spaces), the generic class keeps tokenizer.json.
TOKENIZER_CLASS = {
    "llama1": "PreTrainedTokenizerFast",
    "llama2": "PreTrainedTokenizerFast",
    "codellama": "CodeLlamaTokenizer",  # infilling (prefix/suffix/middle ids, <FILL_ME>)
    "llama3": "PreTrainedTokenizerFast",
    "llama3.1": "PreTrainedTokenizerFast",
}

# Text the converted tokenizer must encode exactly as the source does: code, whitespace runs,
# leading spaces, unicode (accents, CJK, emoji: byte fallback), digits.
PROBES = (
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "    indented = {'a': [1, 2, 3]}  # comment\n\n\n\tx = 'tab'\r\n",
    "  two leading spaces, trailing   ",
    " ",
    "Größe naïve café — 日本語のテキスト, 한국어, 🦙🚀 ∑∫√",
    "1234567890 3.14159 0xDEADBEEF",
    "",
)

TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")


def tokenizer_kind(path: Path) -> str:
    """'tiktoken' (lines `base64 rank`) or 'sentencepiece' (a protobuf model); else InputError."""
    head = Path(path).read_bytes()[:1 << 16].splitlines()[:-1] or [b""]
    if all(TIKTOKEN_LINE.fullmatch(line) for line in head[:64]):
        return "tiktoken"
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise InputError(f"{path}: neither a SentencePiece model nor a tiktoken ranks file "
                         f"({str(e).splitlines()[0][:120]})") from e
    return "sentencepiece"


@dataclass(frozen=True)
class SourceTokenizer:
    """Meta's tokenizer as Meta's code uses it: `encode` gives ids without BOS."""

    kind: str
    vocab_size: int
    bos_id: int
    eos_id: int
    encode: Callable[[str], list[int]]


def load_source(path: Path, family: str) -> SourceTokenizer:
    """The source tokenizer through sentencepiece or tiktoken (the reference for every id check)."""
    kind = tokenizer_kind(path)
    if kind == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        return SourceTokenizer(kind, sp.get_piece_size(), sp.bos_id(), sp.eos_id(), sp.encode)
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except ValueError as e:
        raise InputError(f"{path}: not a valid tiktoken ranks file ({e})") from e
    n = len(ranks)
    specials = LLAMA3_SPECIAL.get(family, LLAMA3_SPECIAL["llama3.1"])
    enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(specials)})
    return SourceTokenizer(kind, n + N_SPECIAL, n, n + 1, lambda text: enc.encode(
        text, allowed_special=set(), disallowed_special=()))


def _added_tokens(backend: Any) -> dict[str, dict[str, Any]]:
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                     "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())}


def _sentencepiece_backend(path: Path) -> Any:
    """transformers' own SentencePiece conversion (AutoTokenizer on a directory holding the model),
    with SentencePiece's exact text handling: dummy prefix always, spaces to '▁', no splitting."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, Path(tmp) / "tokenizer.model")
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": True}))
        backend = AutoTokenizer.from_pretrained(tmp).backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return backend


def _tiktoken_backend(path: Path, family: str, bos: str) -> Any:
    """transformers' TikTokenConverter with Meta's pattern, Meta's special tokens, BOS prepended."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PATTERN).converted()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in LLAMA3_SPECIAL[family]])
    bos_id = backend.token_to_id(bos)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    return backend


def check_ids(tokenizer_json: Path, source: SourceTokenizer,
              texts: tuple[str, ...] = PROBES) -> None:
    """tokenizer.json must have the source's vocabulary size and encode every text to BOS + the
    source's ids; PipelineError names the first text that differs."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    n = tok.get_vocab_size(with_added_tokens=True)
    if n != source.vocab_size:
        raise PipelineError(f"{tokenizer_json}: {n} tokens, the source tokenizer has "
                            f"{source.vocab_size}")
    for text in texts:
        got, want = tok.encode(text).ids, [source.bos_id, *source.encode(text)]
        if got != want:
            raise PipelineError(f"{tokenizer_json}: encodes {text[:40]!r} as {got[:12]}..., the "
                                f"source tokenizer as {want[:12]}...")


def convert_tokenizer(path: Path, out: Path, family: str, max_positions: int) -> dict[str, Any]:
    """Write tokenizer.model (copied), tokenizer.json, tokenizer_config.json and
    special_tokens_map.json into `out`; returns a summary (class, vocab size, special ids)."""
    source = load_source(path, family)
    if source.kind == "sentencepiece":
        backend = _sentencepiece_backend(path)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = LLAMA3_SPECIAL[family]
        special = {"bos_token": specials[0], "eos_token": specials[1]}
        backend = _tiktoken_backend(path, family, special["bos_token"])
    (out / "tokenizer.json").write_text(backend.to_str(pretty=True), encoding="utf-8")
    check_ids(out / "tokenizer.json", source)
    shutil.copyfile(path, out / "tokenizer.model")

    config: dict[str, Any] = {
        "tokenizer_class": TOKENIZER_CLASS[family], **special,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions, "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": _added_tokens(backend),
    }
    if source.kind == "sentencepiece":
        config["legacy"] = True
    if family == "codellama":
        config.update(INFILL, fill_token=FILL_TOKEN)
        special["additional_special_tokens"] = list(INFILL.values())
        missing = [t for t in INFILL.values() if backend.token_to_id(t) is None]
        if source.vocab_size > 32000 and missing:
            raise InputError(f"{path}: {source.vocab_size} pieces but no infilling "
                             f"piece(s) {missing}")
        if missing:  # 34B and -Python: no infilling pieces, so no infilling
            config.update({k: None for k in INFILL}, fill_token=None)
            special.pop("additional_special_tokens")
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    stop = [backend.token_to_id(t) for t in STOP_TOKENS if backend.token_to_id(t) is not None]
    return {"class": config["tokenizer_class"], "kind": source.kind,
            "vocab_size": source.vocab_size, "bos_token_id": source.bos_id,
            "eos_token_id": source.eos_id,
            "stop_ids": stop if source.kind == "tiktoken" else [source.eos_id]}
