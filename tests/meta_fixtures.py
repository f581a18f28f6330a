"""Test fixtures for Meta checkpoints: tokenizers trained here (SentencePiece with Llama's
normaliser settings; a byte-level BPE ranks file for Llama 3) and tiny random-weight models of
every family, written in Meta's on-disk layout. Tokenizers are built once per test session."""

from __future__ import annotations

import atexit
import base64
import functools
import inspect
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.meta import write_meta_checkpoint

UNICODE_LINES = (
    "Größe naïve café — façade, señor, smörgåsbord",
    "日本語のテキストと中文的文本",
    "한국어 텍스트, русский текст, ελληνικά",
    "emoji 🦙🚀✨ and math ∑∫√≈≠",
)


@functools.cache
def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="meta-fixtures-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def corpus() -> str:
    """Training text: Python standard-library source plus unicode lines."""
    import argparse
    import json.decoder
    import json.encoder
    import string
    import textwrap

    code = "\n".join(inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap, string,
                                                     argparse))
    return code + "\n" + "\n".join(UNICODE_LINES * 20) + "\n"


@functools.cache
def sentencepiece_model() -> Path:
    """A BPE SentencePiece model trained with Llama's settings (identity normalisation, whitespace
    kept, byte fallback, digits split, <unk>=0 <s>=1 </s>=2)."""
    import sentencepiece as spm

    d = _workdir()
    (d / "corpus.txt").write_text(corpus())
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=1000, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 20, num_threads=1, minloglevel=2)
    return d / "sp.model"


# Code Llama 7B/13B: 16 pieces after the 32000 Llama pieces, the infilling ones at Meta's ids.
CODELLAMA_INFILL = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}


@functools.cache
def padded_sentencepiece_model(size: int) -> Path:
    """The trained model padded with never-produced pieces to `size` (32000 or 32016); a 32016
    model carries Code Llama's infilling pieces at ids 32007-32010."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sentencepiece_model().read_bytes())
    while len(m.pieces) < size:
        i = len(m.pieces)
        piece = m.pieces.add()
        piece.piece = CODELLAMA_INFILL.get(i, f"<unused{i}>")
        piece.score = -1e9
        piece.type = pb.ModelProto.SentencePiece.NORMAL if i in CODELLAMA_INFILL else \
            pb.ModelProto.SentencePiece.UNUSED
    path = _workdir() / f"sp{size}.model"
    path.write_bytes(m.SerializeToString())
    return path


STEP_ID = 32015  # where the fixtures put CodeLlama 70B's <step> (the code needs no particular id)


@functools.cache
def step_sentencepiece_model(with_step: bool = True) -> Path:
    """Code Llama's 32016-piece layout with CodeLlama 70B's `<step>` as a plain piece (one
    SentencePiece never produces from text; Meta's code inserts its id), or without it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(padded_sentencepiece_model(32016).read_bytes())
    if with_step:
        piece = m.pieces[STEP_ID]
        piece.piece, piece.type = "<step>", pb.ModelProto.SentencePiece.NORMAL
    path = _workdir() / ("step.model" if with_step else "nostep.model")
    path.write_bytes(m.SerializeToString())
    return path


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@functools.cache
def tiktoken_model(n_merges: int = 256) -> Path:
    """A byte-level BPE ranks file (tiktoken format: base64 token, rank) trained here with
    Llama 3's pre-tokenisation pattern: 256 byte tokens, then `n_merges` merges."""
    import regex

    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in
                    regex.findall(LLAMA3_PATTERN, corpus()[:30000] + "\n".join(UNICODE_LINES)))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    path = _workdir() / f"tiktoken{n_merges}.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


@dataclass(frozen=True)
class Spec:
    """A tiny model of one family: params.json as Meta writes it, the true FFN width and vocab."""

    params: dict[str, Any]
    ffn: int
    vocab: int
    tokenizer: str  # "sp", "sp32000", "sp32016", "sp32016step", "tiktoken"
    family: str  # what detection must find
    max_positions: int
    extra: dict[str, Any] = field(default_factory=dict)
    output: str = "own"  # output.weight: "own" weights, "none" (tied, absent), "copy" (tied, stored)


SPECS = {
    "llama1": Spec(dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, norm_eps=1e-6,
                        vocab_size=-1), ffn=192, vocab=1000, tokenizer="sp", family="llama1",
                   max_positions=2048),
    "llama2": Spec(dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, ffn_dim_multiplier=1.3,
                        norm_eps=1e-5, vocab_size=-1), ffn=224, vocab=1000, tokenizer="sp",
                   family="llama2", max_positions=4096),
    "codellama-7b": Spec(dict(dim=64, n_layers=2, n_heads=4, multiple_of=32,
                              ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6,
                              vocab_size=32016), ffn=192, vocab=32016, tokenizer="sp32016",
                         family="codellama", max_positions=16384),
    "codellama-34b": Spec(dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, multiple_of=32,
                               ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6,
                               vocab_size=-1), ffn=192, vocab=32000, tokenizer="sp32000",
                          family="codellama", max_positions=16384),
    "llama3": Spec(dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=768, multiple_of=32,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0),
                   ffn=224, vocab=768, tokenizer="tiktoken", family="llama3", max_positions=8192),
    "llama3.1": Spec(dict(dim=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=768,
                          multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                          rope_theta=500000.0, use_scaled_rope=True),
                     ffn=448, vocab=768, tokenizer="tiktoken", family="llama3.1",
                     max_positions=131072),
    # The real layouts with fewer layers and narrower heads (the real params.json otherwise):
    # CodeLlama 70B (Llama 2 70B's params, θ 1e6, 32016 pieces; 8 shards), its Python/Instruct
    # (θ left at Llama 2's 10000, as released), Llama 3.2 1B/3B (tied embeddings, factor 32) and
    # Llama 3.3 70B (3.1's params at 70B: multiple_of 4096, factor 8).
    "codellama-70b": Spec(dict(dim=256, n_layers=2, n_heads=64, n_kv_heads=8, multiple_of=4096,
                               ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=1000000,
                               vocab_size=32016), ffn=4096, vocab=32016, tokenizer="sp32016",
                          family="codellama", max_positions=16384),
    "codellama-70b-instruct": Spec(dict(dim=256, n_layers=2, n_heads=64, n_kv_heads=8,
                                        multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                                        vocab_size=32016), ffn=4096, vocab=32016,
                                   tokenizer="sp32016step", family="llama2", max_positions=4096),
    "llama3.2": Spec(dict(dim=128, n_layers=2, n_heads=16, n_kv_heads=4, vocab_size=768,
                          multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5,
                          rope_theta=500000.0, use_scaled_rope=True),
                     ffn=512, vocab=768, tokenizer="tiktoken", family="llama3.1",
                     max_positions=131072, output="none"),
    "llama3.2-output": Spec(dict(dim=128, n_layers=2, n_heads=16, n_kv_heads=4, vocab_size=768,
                                 multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5,
                                 rope_theta=500000.0, use_scaled_rope=True),
                            ffn=512, vocab=768, tokenizer="tiktoken", family="llama3.1",
                            max_positions=131072, output="copy"),
    "llama3.3": Spec(dict(dim=256, n_layers=2, n_heads=64, n_kv_heads=8, vocab_size=768,
                          multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                          rope_theta=500000.0, use_scaled_rope=True),
                     ffn=4096, vocab=768, tokenizer="tiktoken", family="llama3.1",
                     max_positions=131072),
}


def tokenizer_for(spec: Spec) -> Path:
    return {"sp": sentencepiece_model, "sp32000": lambda: padded_sentencepiece_model(32000),
            "sp32016": lambda: padded_sentencepiece_model(32016),
            "sp32016step": step_sentencepiece_model,
            "tiktoken": tiktoken_model}[spec.tokenizer]()


def random_state(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) Meta-named weights, written out here shape by shape. Scales give O(1)
    activations and peaked attention, so a wrong rotary layout changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    p = spec.params
    dim, n_heads = p["dim"], p["n_heads"]
    hd = dim // n_heads
    kv = (p.get("n_kv_heads") or n_heads) * hd

    def w(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    def norm() -> torch.Tensor:
        return 1.0 + w(dim, scale=0.1)

    state = {"tok_embeddings.weight": w(spec.vocab, dim, scale=1.0)}
    for i in range(p["n_layers"]):
        state |= {
            f"layers.{i}.attention.wq.weight": w(n_heads * hd, dim, scale=2.0 / dim ** 0.5),
            f"layers.{i}.attention.wk.weight": w(kv, dim, scale=2.0 / dim ** 0.5),
            f"layers.{i}.attention.wv.weight": w(kv, dim, scale=1.0 / dim ** 0.5),
            f"layers.{i}.attention.wo.weight": w(dim, n_heads * hd, scale=1.0 / dim ** 0.5),
            f"layers.{i}.feed_forward.w1.weight": w(spec.ffn, dim, scale=1.0 / dim ** 0.5),
            f"layers.{i}.feed_forward.w2.weight": w(dim, spec.ffn, scale=1.0 / spec.ffn ** 0.5),
            f"layers.{i}.feed_forward.w3.weight": w(spec.ffn, dim, scale=1.0 / dim ** 0.5),
            f"layers.{i}.attention_norm.weight": norm(),
            f"layers.{i}.ffn_norm.weight": norm(),
        }
    state |= {"norm.weight": norm(), "output.weight": w(spec.vocab, dim, scale=1.0 / dim ** 0.5)}
    if spec.output != "own":  # tied: the head is the embedding matrix (scaled down to it)
        state["tok_embeddings.weight"] = state["tok_embeddings.weight"] / dim ** 0.5
        state["output.weight"] = state["tok_embeddings.weight"].clone()
        if spec.output == "none":
            del state["output.weight"]
    return state


def build_checkpoint(directory: Path, name: str, n_shards: int, seed: int = 0,
                     wrap_params: bool = False) -> Path:
    """A Meta checkpoint of family `name` split over `n_shards` ranks in `directory`."""
    spec = SPECS[name]
    write_meta_checkpoint(directory, spec.params, random_state(spec, seed), n_shards,
                          tokenizer_for(spec))
    if wrap_params:  # some releases wrap params.json as {"model": {...}}
        params = json.loads((directory / "params.json").read_text())
        (directory / "params.json").write_text(json.dumps({"model": params}))
        refresh_checklist(directory)
    return directory


def refresh_checklist(directory: Path) -> None:
    """Rewrite checklist.chk after a test edited a file (so only the edit under test is wrong)."""
    import hashlib

    lines = []
    for line in (directory / "checklist.chk").read_text().splitlines():
        name = line.split()[1]
        lines.append(f"{hashlib.md5((directory / name).read_bytes()).hexdigest()}  {name}\n")
    (directory / "checklist.chk").write_text("".join(lines))


def edit_shard(directory: Path, rank: int, edit) -> None:
    """Load one shard fully, let `edit(state)` change it, save it back, refresh the checklist."""
    path = directory / f"consolidated.{rank:02d}.pth"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    refresh_checklist(directory)
