"""The gguf stage: the verified fp16 directory to one GGUF file for llama.cpp (and Ollama, LM
Studio), of one of the types TheBloke published. Conversion uses the `gguf` package (llama.cpp's
own writer and tensor names), streamed tensor by tensor; quantised types are made from that F16
file by llama.cpp's own quantiser (`llama_model_quantize` through llama-cpp-python).

What llama.cpp reads differently from Hugging Face: q/k rows in Meta's interleaved RoPE layout
(our fp16 holds HF's rotate-half layout, so the convert stage's permutation is undone here),
norms in F32, Llama 3.1's scaled RoPE as a `rope_freqs` tensor of per-frequency divisors, and the
tokenizer as token lists (SentencePiece: pieces, scores, types; Llama 3: byte-level BPE tokens and
merges, pre-tokenizer "llama-bpe").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import gguf
import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.core.bounded import GGUF_MAGIC, read_bytes, read_json
from pipeline.core.checkpoint import HFCheckpoint
from pipeline.core.errors import InputError, os_failure
from pipeline.core.gguf_types import TYPES, GGUFType
from pipeline.core.llama import ROTARY_HEADS, LlamaArgs, inv_freq
from pipeline.core.imatrix_format import check_imatrix_file
from pipeline.core.llamacpp_tools import quantize_file
from pipeline.core.output import staged_file
from pipeline.core.paths import PATH
from pipeline.core.tokenizer import INFILL, load_tokenizer, tokenizer_kind

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template: a few KB in practice
ARCH = gguf.MODEL_ARCH.LLAMA




def check_type(type_name: str) -> GGUFType:
    if type_name not in TYPES:
        raise InputError(f"--type {type_name!r}: choose one of {', '.join(TYPES)}")
    return TYPES[type_name]


def interleave_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k per head from HF's halves (x0,x2..|x1,x3..) back to Meta's interleaved pairs
    (x0,x1),(x2,x3)..: the inverse of pipeline.core.meta.permute_rotary, the layout llama.cpp rotates."""
    d1, d2 = w.shape
    half = d1 // n_heads // 2
    return w.view(n_heads, 2, half, d2).transpose(1, 2).reshape(d1, d2)


def rope_factors(args: LlamaArgs) -> np.ndarray | None:
    """Llama 3.1's scaled RoPE as llama.cpp's `rope_freqs` tensor: per frequency, the divisor
    applied to θ^(-2i/d) (1 for the high frequencies, the factor for the low ones); None without
    scaling."""
    if not args.rope_scaling or args.rope_scaling.get("rope_type", "default") == "default":
        return None
    plain = inv_freq(dataclasses.replace(args, rope_scaling=None)).double()
    return (plain / inv_freq(args).double()).float().numpy()


# ---------------------------------------------------------------- tokenizer metadata


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as llama.cpp reads it."""

    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    infill: dict[str, int] | None  # Code Llama's infilling pieces by role


def sentencepiece_vocab(path: Path, added: dict[str, Any]) -> Vocab:
    """Pieces, scores and types from tokenizer.model (as llama.cpp's converter reads them);
    tokenizer_config's special added tokens and Code Llama's infilling pieces, normal pieces to
    SentencePiece, are CONTROL (<unk> stays UNKNOWN, bytes BYTE)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else
                     gguf.TokenType.CONTROL if sp.is_control(i) else
                     gguf.TokenType.UNUSED if sp.is_unused(i) else
                     gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
    index = {t: i for i, t in enumerate(tokens)}
    infill = {role: index[piece] for role, piece in INFILL.items() if piece in index}
    infill = infill if len(infill) == len(INFILL) else None
    special = {int(i) for i, t in added.items() if t.get("special")} | set((infill or {}).values())
    for i in special:
        if i < len(types) and types[i] == gguf.TokenType.NORMAL:
            types[i] = gguf.TokenType.CONTROL
    return Vocab("llama", "default", tokens, [int(t) for t in types], scores, None, infill)


def pre_tokenizer(data: dict[str, Any], where: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer.json's pre-tokenizer: Llama 3's regex split
    ("llama-bpe"), GPT-2's own regex ("gpt-2"), or that after splitting digits one by one
    ("smollm"); anything else is refused rather than tokenised differently in llama.cpp."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps if isinstance(st, dict)]
    gpt2_regex = bool(steps) and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True)
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel" and not gpt2_regex:
        return "llama-bpe"
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and gpt2_regex:
        return "smollm"
    raise InputError(f"{where}: pre-tokenizer {kinds or pre!r} has no llama.cpp equivalent this "
                     "tool knows (Llama 3's split, GPT-2's byte-level regex, SmolLM's digits)")


def bpe_vocab(tokenizer_json: Path, vocab_size: int) -> Vocab:
    """A byte-level BPE tokenizer.json (Llama 3's, or an HF source's): every id's token (special
    added tokens CONTROL), the merges and llama.cpp's name for its pre-tokenizer."""
    data = read_json(tokenizer_json)
    try:
        model = data["model"]
        ids = {**model["vocab"], **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    except (KeyError, TypeError) as e:
        raise InputError(f"{tokenizer_json}: not a BPE tokenizer.json ({e!r} missing)") from None
    by_id = {i: t for t, i in ids.items()}
    missing = [i for i in range(vocab_size) if i not in by_id]
    if missing:
        raise InputError(f"{tokenizer_json}: no token for id(s) {missing[:5]} of {vocab_size}")
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
             for i in range(vocab_size)]
    return Vocab("gpt2", pre_tokenizer(data, tokenizer_json), [by_id[i] for i in range(vocab_size)],
                 types, None, merges, None)


def read_vocab(fp16: Path, vocab_size: int) -> Vocab:
    """The fp16 directory's tokenizer, vocab_size ids: tokenizer.model decides the kind (a
    conversion copies Meta's), or tokenizer.json alone is byte-level BPE (an HF source's)."""
    model = fp16 / "tokenizer.model"
    if not model.is_file() and not (fp16 / "tokenizer.json").is_file():
        raise InputError(f"{fp16}: no tokenizer.model or tokenizer.json")
    if model.is_file() and tokenizer_kind(model) == "sentencepiece":
        config = read_json(fp16 / "tokenizer_config.json") \
            if (fp16 / "tokenizer_config.json").is_file() else {}
        vocab = sentencepiece_vocab(model, config.get("added_tokens_decoder", {}))
    else:
        vocab = bpe_vocab(fp16 / "tokenizer.json", vocab_size)
    if len(vocab.tokens) != vocab_size:
        raise InputError(f"{fp16}: the tokenizer has {len(vocab.tokens)} tokens, but the embedding has "
                         f"{vocab_size} rows (config.json vocab_size)")
    return vocab


def chat_template(fp16: Path) -> str | None:
    """The chat template the fp16 tokenizer carries (chat_template.jinja, else tokenizer_config)."""
    jinja = fp16 / "chat_template.jinja"
    if jinja.is_file():
        try:
            return read_bytes(jinja, MAX_TEMPLATE_BYTES, "chat template").decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{jinja}: not UTF-8 text") from None
    config = fp16 / "tokenizer_config.json"
    return read_json(config).get("chat_template") if config.is_file() else None


def metadata(writer: gguf.GGUFWriter, ckpt: HFCheckpoint, vocab: Vocab, name: str) -> None:
    """Every key llama.cpp's Llama loader reads, from config.json and the tokenizer."""
    a, cfg = ckpt.args, ckpt.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(TYPES["F16"].ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(a.max_seq_len)
    writer.add_embedding_length(a.dim)
    writer.add_block_count(a.n_layers)
    writer.add_feed_forward_length(a.ffn_dim)
    writer.add_head_count(a.n_heads)
    writer.add_head_count_kv(a.n_kv_heads)
    writer.add_layer_norm_rms_eps(a.norm_eps)
    writer.add_rope_freq_base(a.rope_theta)
    writer.add_rope_dimension_count(a.head_dim)
    writer.add_vocab_size(a.vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])
    if vocab.model == "llama":
        writer.add_unk_token_id(0)
    if vocab.infill is not None:
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_PRE_ID, vocab.infill["prefix"])
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_SUF_ID, vocab.infill["suffix"])
        writer.add_uint32(gguf.Keys.Tokenizer.FIM_MID_ID, vocab.infill["middle"])
        writer.add_eot_token_id(vocab.infill["eot"])
    # whether BOS/EOS are added: what the HF tokenizer does, not what a config key may say
    tok = load_tokenizer(ckpt.path)
    ids = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tok.bos_token_id)
    writer.add_add_eos_token(bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id)
    template = chat_template(ckpt.path)
    if template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------- tensors


LAYER = re.compile(r"model\.layers\.\d+\.(.+)")


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, the HF tensor it comes from and how it is stored."""

    name: str
    source: str | None  # HF tensor name; None for rope_freqs
    dtype: np.dtype
    shape: tuple[int, ...]
    heads: int = 0  # q/k: heads to re-interleave

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def plan_tensors(ckpt: HFCheckpoint) -> list[Planned]:
    """The GGUF tensors in the fp16 file order: 2-D weights F16, norms F32 (as llama.cpp's
    converter writes them), rope_freqs F32 for scaled RoPE; a tied output is left out (llama.cpp
    then reuses token_embd)."""
    a = ckpt.args
    names = gguf.get_tensor_name_map(ARCH, a.n_layers)
    heads = {name: getattr(a, field) for name, field in ROTARY_HEADS.items()}
    plan = []
    if rope_factors(a) is not None:
        plan.append(Planned(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", None,
                            np.dtype(np.float32), (a.head_dim // 2,)))
    for name, _, shape in ckpt.expected():
        target = names.get_name(name, try_suffixes=(".weight",))
        if target is None:
            raise InputError(f"{ckpt.path}: tensor {name} has no GGUF name for a Llama model")
        m = LAYER.fullmatch(name)
        plan.append(Planned(target, name, np.dtype(np.float32 if len(shape) == 1 else np.float16),
                            tuple(shape), heads.get(m.group(1), 0) if m else 0))
    return plan


def tensors(ckpt: HFCheckpoint, plan: list[Planned]) -> Iterator[np.ndarray]:
    """Each planned tensor as GGUF stores it: q/k re-interleaved, cast; read one at a time and its
    memory map dropped after it, so memory stays near one tensor whatever the model's size. A
    cast that overflows (a bfloat16 source beyond fp16's range) is an InputError naming it."""
    for t in plan:
        if t.source is None:
            yield rope_factors(ckpt.args)
            continue
        w = ckpt.tensor(t.source)
        if t.heads:
            w = interleave_rotary(w, t.heads)
        out = w.to(torch.float16 if t.dtype == np.float16 else torch.float32)
        if out.dtype != w.dtype and not all(map(math.isfinite, map(float, torch.aminmax(out)))):
            raise InputError(f"{ckpt.path / ckpt.weight_map[t.source]}: tensor {t.source} holds "
                             "NaN, Inf or values beyond fp16's range")
        yield out.contiguous().numpy()
        del w, out
        ckpt.release()


def write_f16(ckpt: HFCheckpoint, path: Path, name: str) -> dict[str, Any]:
    """The F16 GGUF at `path`: header, metadata and tensor infos first, then each tensor read,
    converted and written on its own."""
    vocab = read_vocab(ckpt.path, ckpt.args.vocab_size)
    plan = plan_tensors(ckpt)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCH])
    metadata(writer, ckpt, vocab, name)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="gguf F16",
                  file=sys.stderr) as bar:
            for t, data in zip(plan, tensors(ckpt, plan), strict=True):
                writer.write_tensor_data(data)
                bar.update(t.nbytes)
    finally:
        writer.close()
    return described(vocab, plan)


def described(vocab: Vocab, plan: list[Planned]) -> dict[str, Any]:
    """What a GGUF file of the model holds, for the summary: tensors and tokenizer."""
    return {"tensors": len(plan), "tokenizer": vocab.model, "infill": vocab.infill}


def check_imatrix(t: GGUFType, imatrix: Path | None) -> Path | None:
    """The importance matrix a file of type `t` is quantised with: none for F16; required by the
    types that need one (InputError); an existing GGUF file when given."""
    if imatrix is None:
        if t.needs_imatrix:
            raise InputError(f"--type {t.name}: needs an importance matrix (--imatrix FILE, made "
                             "by `python -m pipeline imatrix`); without one it is unusable")
        return None
    if not t.uses_imatrix:
        raise InputError(f"--imatrix: {t.name} does not use an importance matrix ("
                         + ("F16 is not quantised" if t.name == "F16" else
                            "llama.cpp rounds it to nearest") + ")")
    return check_imatrix_file(Path(imatrix))


def check_f16(f16: Path, fp16: Path) -> None:
    """`f16` is an F16 GGUF file (the F16 task's output, or --f16): what quantised types are
    made from."""
    from verify.llamacpp import file_type

    if not f16.is_file():
        raise InputError(f"{f16}: F16 GGUF file missing (make it first: --type F16)")
    ftype = file_type(f16)
    if ftype != int(TYPES["F16"].ftype):
        raise InputError(f"{f16}: not an F16 GGUF file (general.file_type {ftype}); quantised "
                         f"types are made from the F16 file of {fp16}")


def write_gguf(fp16: Path, out: Path, *, type_name: str = "F16", name: str | None = None,
               force: bool = False, threads: int | None = None,
               f16: Path | None = None, imatrix: Path | None = None) -> dict[str, Any]:
    """Convert the fp16 directory `fp16` to the GGUF file `out` of type `type_name`; quantised
    types by llama.cpp from `f16`, the model's F16 GGUF file, or from one made first beside the
    output, guided by the importance matrix `imatrix` when given (pipeline/imatrix.py). Returns
    the summary."""
    t0 = time.perf_counter()
    fp16, out = Path(fp16), Path(out)
    t = check_type(type_name)
    ckpt = HFCheckpoint(fp16)
    if ckpt.quantization is not None:
        raise InputError(f"{fp16}: a quantised (GPTQ) model; convert the fp16 model instead")
    name = name or fp16.name
    threads = None if t.name == "F16" else threads or os.cpu_count() or 1  # F16: no quantiser
    f16 = None if t.name == "F16" or f16 is None else Path(f16)
    if f16 is not None:
        check_f16(f16, fp16)
    imatrix = check_imatrix(t, imatrix)
    inputs = [fp16, *(p for p in (f16, imatrix) if p is not None)]
    with staged_file(out, force, magic=GGUF_MAGIC, inputs=inputs) as tmp:
        try:
            if t.name == "F16":
                info = write_f16(ckpt, tmp, name)
            elif f16 is not None:
                info = described(read_vocab(ckpt.path, ckpt.args.vocab_size), plan_tensors(ckpt))
                quantize_file(f16, tmp, t, threads, imatrix)
            else:
                fd, f16 = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f16", dir=out.parent)
                os.close(fd)
                try:
                    info = write_f16(ckpt, Path(f16), name)
                    quantize_file(Path(f16), tmp, t, threads, imatrix)
                finally:
                    Path(f16).unlink(missing_ok=True)
        except OSError as e:
            raise os_failure(e, out) from e
        size = tmp.stat().st_size
    a = ckpt.args
    return {"tool": "llama-gptq-pipeline gguf", "tool_version": __version__, "type": t.name,
            "source": str(fp16.resolve()), "output": str(out.resolve()), "bytes": size,
            "parameters": sum(int(np.prod(s.shape)) for f in ckpt.headers.values()
                              for s in f.values()),
            "rope_theta": a.rope_theta, "context_length": a.max_seq_len, **info,
            "threads": threads, "seconds": round(time.perf_counter() - t0, 3)}


@click.command("gguf")
@click.argument("fp16", type=PATH)
@click.argument("out", type=PATH)
@click.option("--type", "type_name", type=click.Choice(list(TYPES)), default="F16",
              show_default=True, help="GGUF file type; quantised types by llama.cpp's quantiser.")
@click.option("--name", default=None, help="general.name [default: the fp16 directory's name].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Quantiser threads [default: all cores].")
@click.option("--imatrix", type=PATH, default=None,
              help="Importance matrix (GGUF, `python -m pipeline imatrix`) guiding the quantiser; "
                   "required by the IQ types.")
@click.option("--f16", type=PATH, default=None,
              help="Quantise this F16 GGUF file of FP16 (written before with --type F16) instead "
                   "of writing one first.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a GGUF file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def command(fp16: Path, out: Path, type_name: str, name: str | None, threads: int | None,
            imatrix: Path | None, f16: Path | None, force: bool, as_json: bool) -> None:
    """Convert the fp16 directory FP16 (the convert stage's output) to one GGUF file OUT for
    llama.cpp, streamed tensor by tensor."""
    s = write_gguf(fp16, out, type_name=type_name, name=name, force=force, threads=threads,
                   f16=f16, imatrix=imatrix)
    if as_json:
        click.echo(json.dumps(s))
    click.echo(f"wrote {out}: GGUF {s['type']}, {s['tensors']} tensors, "
               f"{s['bytes'] / 1e9:.3f} GB, tokenizer {s['tokenizer']}, "
               f"rope θ {s['rope_theta']:g}, context {s['context_length']}, {s['seconds']:.1f} s",
               err=as_json)
