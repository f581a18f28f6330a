"""Meta's original checkpoints: params.json, `consolidated.NN.pth` model-parallel shards (opened
memory-mapped), checklist.chk, family detection, fairscale's shard rules and the Meta -> HF map.

Usage (demo trainer, test fixtures) -- write a full, unsharded Meta-named state dict as Meta does:
    write_meta_checkpoint(Path("ckpt"), params, state, n_shards=2,
                          tokenizer_model=Path("tokenizer.model"))   # bf16 by default
    # -> ckpt/consolidated.00.pth, consolidated.01.pth, params.json, tokenizer.model, checklist.chk
Reading: `MetaCheckpoint(path)` (params, shard paths, tokenizer kind, family), `load_shard(path)`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import pickle
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.core import llama
from pipeline.core.bounded import read_bytes, read_json
from pipeline.core.errors import InputError
from pipeline.core.llama import LlamaArgs, check_heads, config_float, config_int
from pipeline.core.tokenizer import tokenizer_kind

PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
CHECKLIST = "checklist.chk"
SHARD_GLOB = "consolidated.*.pth"
NOT_WEIGHTS = frozenset({"rope.freqs"})  # precomputed RoPE frequencies in Llama 1/2 shards

# Every params.json key Meta's text models use; anything else (vision, MoE) is refused.
PARAMS_KEYS = frozenset({
    "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
    "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
    "max_batch_size", "max_seq_len",
})
REQUIRED_KEYS = ("dim", "n_layers", "n_heads", "norm_eps")
NULLABLE_KEYS = frozenset({"n_kv_heads", "ffn_dim_multiplier", "rope_scaling_factor",
                           "rope_high_freq_factor"})  # Optional in Meta's ModelArgs
MAX_PARAMS_BYTES = 1 << 20
MAX_CHECKLIST_BYTES = 1 << 20  # one md5 line per file: a few hundred bytes in practice


@dataclass(frozen=True)
class Family:
    """What a family fixes beyond params.json: tokenizer kind, context length, embedding split."""

    name: str
    tokenizer: str  # "sentencepiece" | "tiktoken"
    max_positions: int
    embedding_dim: int  # tok_embeddings concat axis: 1 ParallelEmbedding, 0 VocabParallelEmbedding


FAMILIES = {
    "llama1": Family("Llama 1", "sentencepiece", 2048, 1),
    "llama2": Family("Llama 2", "sentencepiece", 4096, 1),
    "codellama": Family("Code Llama", "sentencepiece", 16384, 1),
    "llama3": Family("Llama 3", "tiktoken", 8192, 0),
    "llama3.1": Family("Llama 3.1+", "tiktoken", 131072, 0),
}

# Shard rules (fairscale layer types), names without the `layers.{i}.` prefix: the dimension the
# model-parallel ranks are concatenated along; None = replicated on every rank.
SHARD_DIM: dict[str, int | None] = {
    "attention.wq.weight": 0,  # ColumnParallelLinear [out/MP, in]
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear [out, in/MP]
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "norm.weight": None,
    "output.weight": 0,
    "tok_embeddings.weight": None,  # per family: Family.embedding_dim
}

# Meta -> Hugging Face names (layer entries get `model.layers.{i}.` on both sides' prefixes).
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# q and k rows go from interleaved RoPE pairs to HF's rotate-half halves, per head.
ROTARY_HEADS = {meta: llama.ROTARY_HEADS[hf] for meta, hf in HF_LAYER_NAMES.items()
                if hf in llama.ROTARY_HEADS}

# Llama 3.2 1B/3B were trained with RoPE factor 32 (not 8); their params.json does not say so.
# They are the Llama 3 models with tied embeddings, by which a checkpoint is known too (a
# few-layer model of their layout, as the tests build, has neither shape).
ROPE_FACTOR_BY_SHAPE = {(2048, 16): 32.0, (3072, 28): 32.0}
ROPE_FACTOR_TIED = 32.0

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attention.wq.weight' -> (3, 'attention.wq.weight'); top-level -> (None, name)."""
    m = _LAYER.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def hf_name(name: str) -> str:
    """Meta tensor name -> Hugging Face LlamaForCausalLM name."""
    layer, short = split_name(name)
    if layer is None:
        return HF_NAMES[short]
    return f"model.layers.{layer}.{HF_LAYER_NAMES[short]}"


def meta_names(n_layers: int, tied: bool = False) -> list[str]:
    """Every weight of a Meta checkpoint, in HF's file order (embeddings, layers, norm, output)."""
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{n}" for i in range(n_layers) for n in HF_LAYER_NAMES]
    names += ["norm.weight"] + ([] if tied else ["output.weight"])
    return names


def shard_dim(name: str, embedding_dim: int) -> int | None:
    """Concatenation dim of a tensor across model-parallel ranks (None: replicated)."""
    short = split_name(name)[1]
    return embedding_dim if short == "tok_embeddings.weight" else SHARD_DIM[short]


def permute_rotary(w: torch.Tensor, n_heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of q/k per head from interleaved pairs (x0,x1),(x2,x3).. to halves (x0,x2..|x1,x3..);
    with `out`, copied (and cast) straight into it."""
    d1, d2 = w.shape
    half = d1 // n_heads // 2
    rows = w.view(n_heads, half, 2, d2).transpose(1, 2)  # [n_heads, 2, half, d2]
    if out is None:
        return rows.reshape(d1, d2)
    out.view(n_heads, 2, half, d2).copy_(rows)
    return out


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_scaling(params: dict[str, Any], tied: bool = False) -> dict[str, Any] | None:
    """HF `rope_scaling` for Llama 3.1+ (`use_scaled_rope`), else None; factor 32 for Llama 3.2
    1B/3B (by shape, or by their tied embeddings), else params.json's or Meta's 8."""
    if not params.get("use_scaled_rope"):
        return None
    factor = params.get("rope_scaling_factor") or (ROPE_FACTOR_TIED if tied else None) or \
        ROPE_FACTOR_BY_SHAPE.get((params["dim"], params["n_layers"]), 8.0)
    return {"rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
            "high_freq_factor": float(params.get("rope_high_freq_factor") or 4.0),
            "original_max_position_embeddings": 8192}


def detect_family(params: dict[str, Any], kind: str) -> str:
    """Family from the tokenizer kind and params: tiktoken = Llama 3 (3.1+ with scaled RoPE);
    SentencePiece with a non-default rope_theta = Code Llama; norm_eps 1e-6 = Llama 1."""
    if kind == "tiktoken":
        return "llama3.1" if params.get("use_scaled_rope") else "llama3"
    if float(params.get("rope_theta", 10000.0)) != 10000.0:
        return "codellama"
    return "llama1" if params["norm_eps"] == 1e-6 else "llama2"


def model_args(params: dict[str, Any], family: str, vocab_size: int | None = None,
               tied: bool = False) -> LlamaArgs:
    """Hyper-parameters from params.json (vocab_size from the argument when params has -1)."""
    p = params
    vocab = vocab_size if vocab_size is not None else p.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        raise ValueError("vocab_size is not in params.json; pass it")
    return LlamaArgs(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
        n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        ffn_dim=ffn_dim(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
        vocab_size=vocab, norm_eps=p["norm_eps"],
        rope_theta=float(p.get("rope_theta", 10000.0)), rope_scaling=rope_scaling(p, tied),
        max_seq_len=FAMILIES[family].max_positions, tie_word_embeddings=tied)


def check_params(p: dict[str, Any]) -> None:
    """Every value of Meta's ModelArgs type and a usable range (ValueError naming the key): sizes
    positive integers (not 4.0, "4" or true), vocab_size -1 or positive, numbers finite and
    positive, null only where ModelArgs allows None, heads that split dim into even halves."""
    for key in ("dim", "n_layers", "n_heads"):
        config_int(p, key)
    for key in ("n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
        config_int(p, key, None, nullable=key in NULLABLE_KEYS)
    if not (type(p.get("vocab_size")) is int and p["vocab_size"] == -1):
        config_int(p, "vocab_size", None)  # -1: as many as the tokenizer has
    config_float(p, "norm_eps", below=1.0)
    config_float(p, "rope_theta", None, above=1.0)
    for key in ("ffn_dim_multiplier", "rope_scaling_factor", "rope_high_freq_factor"):
        config_float(p, key, None, nullable=key in NULLABLE_KEYS)
    if not isinstance(p.get("use_scaled_rope", False), bool):
        raise ValueError(f"use_scaled_rope = {p['use_scaled_rope']!r}: must be true or false")
    check_heads(p["dim"], p["n_heads"], p.get("n_kv_heads") or p["n_heads"],
                ("dim", "n_heads", "n_kv_heads"))


def read_params(path: Path) -> dict[str, Any]:
    """params.json, unwrapped from `{"model": {...}}`; every key known, required ones present,
    every value checked (check_params)."""
    if not path.is_file():
        raise InputError(f"{path}: missing (every Meta checkpoint has params.json)")
    params = read_json(path, MAX_PARAMS_BYTES)
    if isinstance(params.get("model"), dict):
        params = params["model"]
    unknown = sorted(set(params) - PARAMS_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {unknown}: not a Llama text model this tool "
                         f"understands (known: {sorted(PARAMS_KEYS)})")
    missing = [k for k in REQUIRED_KEYS if k not in params]
    if missing:
        raise InputError(f"{path}: missing key(s) {missing}")
    try:
        check_params(params)
    except ValueError as e:
        raise InputError(f"{path}: {e}") from e
    return params


def shard_paths(src: Path) -> list[Path]:
    """consolidated.NN.pth sorted by rank number (not by string), ranks 0..N-1 all present."""
    found = {}
    for p in src.glob(SHARD_GLOB):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise InputError(f"{src}: no consolidated.NN.pth shards found")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise InputError(f"{src}: shard(s) {[f'consolidated.{r:02d}.pth' for r in missing]} "
                         f"missing (found ranks {sorted(found)})")
    return [found[r] for r in sorted(found)]


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One rank's state dict, memory-mapped: plain tensors only (`weights_only`), none read yet."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused: the pickle holds more than plain tensors "
                         f"(weights_only load failed: {str(e).splitlines()[0][:200]})") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: truncated, corrupt or not a torch zip checkpoint "
                         f"({str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


_MADV_WILLNEED, _MADV_PAGEOUT = 3, 21
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(t: torch.Tensor, advice: int) -> None:
    if _libc is None or t.device.type != "cpu" or t.nbytes == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    _libc.madvise(start, t.data_ptr() + t.nbytes - start, advice)


def prefetch(t: torch.Tensor) -> None:
    """Ask the kernel to start reading a memory-mapped tensor now (overlaps I/O with compute)."""
    _madvise(t, _MADV_WILLNEED)


def release(t: torch.Tensor) -> None:
    """Hand a memory-mapped tensor's pages back (MADV_PAGEOUT never loses data: clean file pages
    are re-read if touched again), so resident memory stays at one tensor, whatever the model."""
    _madvise(t, _MADV_PAGEOUT)


def read_checklist(path: Path) -> dict[str, str]:
    """checklist.chk (`md5  filename` per line, md5sum's format) -> {filename: md5}. It names
    files of its own directory: plain file names only, never a path."""
    try:
        text = read_bytes(path, MAX_CHECKLIST_BYTES, "checklist").decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (a binary file?); expected `md5  filename` "
                         "lines") from None
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32}) [ *](.+)", line.strip())
        if not m:
            raise InputError(f"{path}:{n}: not an `md5  filename` line: {line[:80]!r}")
        name = m.group(2).strip().removeprefix("./")
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise InputError(f"{path}:{n}: {name[:80]!r} is not a plain file name; a checklist "
                             "names files of its own directory only")
        sums[name] = m.group(1).lower()
    return sums


def md5_files(paths: list[Path], desc: str = "md5") -> dict[str, str]:
    """md5 of each file (threads: hashlib releases the GIL), with a byte progress bar."""
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        def one(p: Path) -> str:
            h = hashlib.md5()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 23):
                    h.update(chunk)
                    bar.update(len(chunk))
            return h.hexdigest()

        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip([p.name for p in paths], pool.map(one, paths), strict=True))


def verify_checksums(src: Path) -> dict[str, str]:
    """Check every file listed in checklist.chk; a missing file, one that is a link out of src, or
    a mismatch stops, naming it. Returns {filename: md5} of the files checked."""
    claimed = read_checklist(src / CHECKLIST)
    outside = [n for n in claimed if (src / n).resolve().parent != src.resolve()]
    if outside:
        raise InputError(f"{src / CHECKLIST} lists {outside}, links to files outside {src}; "
                         "a checklist names files of its own directory only")
    missing = [n for n in claimed if not (src / n).is_file()]
    if missing:
        raise InputError(f"{src / CHECKLIST} lists {missing} but they are not in {src}")
    actual = md5_files([src / n for n in claimed], desc="checksums")
    for name, md5 in claimed.items():
        if actual[name] != md5:
            raise InputError(f"{src / name}: md5 {actual[name]} does not match {CHECKLIST} "
                             f"({md5}): the file is corrupt or incomplete; download it again")
    return actual


class MetaCheckpoint:
    """A Meta download directory: params, shard paths, tokenizer kind, family (nothing loaded)."""

    def __init__(self, path: Path | str, family: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory")
        self.params = read_params(self.path / PARAMS)
        self.tokenizer = self.path / TOKENIZER
        if not self.tokenizer.is_file():
            raise InputError(f"{self.tokenizer}: missing (the tokenizer ships with the weights)")
        self.shards = shard_paths(self.path)
        if family is not None and family not in FAMILIES:
            raise InputError(f"unknown family {family!r} (known: {sorted(FAMILIES)})")
        self._family = family

    @cached_property
    def tokenizer_kind(self) -> str:
        return tokenizer_kind(self.tokenizer)

    @cached_property
    def family(self) -> str:
        return self._family or detect_family(self.params, self.tokenizer_kind)


def write_meta_checkpoint(directory: Path, params: dict[str, Any], state: dict[str, torch.Tensor],
                          n_shards: int, tokenizer_model: Path, *,
                          dtype: torch.dtype = torch.bfloat16) -> None:
    """Split a full Meta-named state dict over `n_shards` model-parallel ranks by SHARD_DIM and
    write Meta's on-disk layout (shards, params.json, tokenizer.model, checklist.chk)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    kind = tokenizer_kind(Path(tokenizer_model))
    family = FAMILIES[detect_family(params, kind)]
    n_layers = params["n_layers"]
    tied = "output.weight" not in state  # Llama 3.2 1B/3B as shipped without output.weight
    expected = set(meta_names(n_layers, tied))
    if set(state) - NOT_WEIGHTS != expected:
        diff = sorted(expected ^ (set(state) - NOT_WEIGHTS))
        raise ValueError(f"state dict does not match params (n_layers={n_layers}): {diff[:6]}")
    head_dim = params["dim"] // params["n_heads"]
    for name in expected:
        dim = shard_dim(name, family.embedding_dim)
        if dim is not None and state[name].shape[dim] % n_shards:
            raise ValueError(f"{name} {tuple(state[name].shape)}: dim {dim} does not split "
                             f"into {n_shards} shards")
    for key in ("n_heads", "n_kv_heads"):
        if (params.get(key) or params["n_heads"]) % n_shards:
            raise ValueError(f"{key} does not split into {n_shards} shards")
    extra = {}
    if kind == "sentencepiece":  # Meta's Llama 1/2 shards carry precomputed RoPE frequencies
        theta = float(params.get("rope_theta", 10000.0))
        extra["rope.freqs"] = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    for r in range(n_shards):
        shard = {}
        for name in meta_names(n_layers, tied):
            w = state[name].detach().to(dtype)
            dim = shard_dim(name, family.embedding_dim)
            shard[name] = (w if dim is None else w.chunk(n_shards, dim)[r]).clone()
        shard.update({k: v.to(dtype) for k, v in extra.items()})
        torch.save(shard, directory / f"consolidated.{r:02d}.pth")
        del shard
    (directory / PARAMS).write_text(json.dumps(params) + "\n")
    if Path(tokenizer_model).resolve() != (directory / TOKENIZER).resolve():
        shutil.copyfile(tokenizer_model, directory / TOKENIZER)
    files = [directory / f"consolidated.{r:02d}.pth" for r in range(n_shards)]
    files += [directory / PARAMS, directory / TOKENIZER]
    sums = md5_files(files)
    (directory / CHECKLIST).write_text("".join(f"{sums[p.name]}  {p.name}\n" for p in files))
