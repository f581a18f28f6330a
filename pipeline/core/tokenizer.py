"""Tokenizer conversion through transformers: a SentencePiece model (Llama 1/2, Code Llama with its
infilling pieces) or a tiktoken ranks file (Llama 3.x) becomes tokenizer.json,
tokenizer_config.json and special_tokens_map.json, checked id for id against the source, plus the
chat template of the model's chat format (pipeline/core/chat.py)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.core import chat
from pipeline.core.bounded import read_bytes, read_json
from pipeline.core.errors import InputError, PipelineError, first_line

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
# Code Llama's infilling pieces (7B/13B: after the 32000 Llama pieces, ids 32007-32010), by role.
INFILL = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}
# Pad policy: no token is added (the embedding matrix is Meta's); padding uses a token that exists,
# is never EOS (so padding is not read as the end of a text) and carries no text of its own:
# <unk> (id 0) for SentencePiece, Llama 3's <|finetune_right_pad_id|> (its name from 3.1 on).
PAD = {"sentencepiece": "<unk>", "tiktoken": 4}  # a token, or an index in LLAMA3_SPECIAL

# Every family declares the generic class, which loads tokenizer.json as written in transformers
# 4.x and 5.x. transformers 5.x rebuilds LlamaTokenizer's and CodeLlamaTokenizer's pre-tokenizer
# on load (Metaspace, prepend "first"): SentencePiece's dummy prefix is then dropped before a
# leading space and after special tokens, so plain text and every chat turn after <s> would get
# other ids than Meta's. Infilling prompts are built from the ids instead (see the model card).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

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
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.model: 0.5 MB (SentencePiece) to 2.2 MB (tiktoken)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json")


def load_tokenizer(path: Path) -> Any:
    """A model directory's tokenizer through AutoTokenizer, as users will load it; its JSON
    files pass the input boundary first, so a hostile one is an InputError naming it."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise InputError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for name in TOKENIZER_JSON:
        if (path / name).exists() or (path / name).is_symlink():
            read_json(path / name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers and tokenizers raise many types for a broken file
        raise InputError(f"{path}: its tokenizer cannot be loaded ({first_line(e)})") from None


def tokenizer_kind(path: Path) -> str:
    """'tiktoken' (lines `base64 rank`) or 'sentencepiece' (a protobuf model); else InputError."""
    head = read_bytes(Path(path), MAX_TOKENIZER_BYTES, "tokenizer model")[:1 << 16].splitlines()[:-1] or [b""]
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
    except ValueError as e:  # binascii.Error (bad base64) is one
        raise InputError(f"{path}: not a valid tiktoken ranks file ({e})") from e
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):  # else tiktoken's Rust core panics or misreads
        raise InputError(f"{path}: the ranks of its {n} distinct tokens are not exactly 0..{n - 1} "
                         "(a rank repeated, skipped or out of range, or a token listed twice)")
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


def mark_special(backend: Any, tokens: tuple[str, ...]) -> None:
    """Make the chat format's tokens that the vocabulary has (CodeLlama 70B's `<step>`, a plain
    piece of its SentencePiece model) special, at their own ids: the template writes them as text,
    and the tokenizer must give their id, as Meta's code inserts it. One that is missing stays
    text."""
    from tokenizers import AddedToken

    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [t for t in tokens if t not in added and backend.token_to_id(t) is not None]
    if new:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])


def infill_ids(backend: Any, path: Path, source: SourceTokenizer,
               family: str) -> dict[str, int] | None:
    """Code Llama's infilling ids by role, or None when the vocabulary has no infilling pieces
    (34B, -Python, Llama); InputError for a Code Llama vocabulary (> 32000) missing some."""
    ids = {role: backend.token_to_id(piece) for role, piece in INFILL.items()}
    missing = [INFILL[role] for role, i in ids.items() if i is None]
    if not missing:
        return ids
    if family == "codellama" and source.vocab_size > 32000:
        raise InputError(f"{path}: {source.vocab_size} pieces but no infilling piece(s) {missing}")
    return None


def convert_tokenizer(path: Path, out: Path, family: str, max_positions: int,
                      chat_format: str = "none") -> dict[str, Any]:
    """Write tokenizer.model (copied), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and, with a chat format, chat_template.jinja into `out`; returns a
    summary (class, vocab size, special, pad, stop and infilling ids, chat format)."""
    fmt = chat.chat_format(chat_format)
    source = load_source(path, family)
    if fmt.tokenizer not in (None, source.kind):
        raise InputError(f"{path}: a {source.kind} tokenizer, but chat format {fmt.name!r} is "
                         f"written for a {fmt.tokenizer} one")
    if source.kind == "sentencepiece":
        backend = _sentencepiece_backend(path)
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "pad_token": PAD["sentencepiece"]}
    else:
        specials = LLAMA3_SPECIAL[family]
        special = {"bos_token": specials[0], "eos_token": specials[1],
                   "pad_token": specials[PAD["tiktoken"]]}
        backend = _tiktoken_backend(path, family, special["bos_token"])
    mark_special(backend, fmt.stop_tokens)
    (out / "tokenizer.json").write_text(backend.to_str(pretty=True), encoding="utf-8")
    check_ids(out / "tokenizer.json", source)
    shutil.copyfile(path, out / "tokenizer.model")

    config: dict[str, Any] = {
        "tokenizer_class": TOKENIZER_CLASS, **special,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions, "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": _added_tokens(backend),
    }
    if source.kind == "sentencepiece":
        config["legacy"] = True
    if fmt.template is not None:  # chat_template.jinja first; 4.x before it reads the config's
        config["chat_template"] = fmt.template
        (out / "chat_template.jinja").write_text(fmt.template, encoding="utf-8")
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    stop = [backend.token_to_id(t) for t in fmt.stop_tokens]
    return {"class": TOKENIZER_CLASS, "kind": source.kind, "vocab_size": source.vocab_size,
            "bos_token_id": source.bos_id, "eos_token_id": source.eos_id,
            "pad_token_id": backend.token_to_id(special["pad_token"]),
            "stop_ids": [source.eos_id, *(i for i in stop if i is not None)],
            "infill": infill_ids(backend, path, source, family), "chat_format": fmt.name}
