"""llama.cpp as verify's runtime for GGUF files (through llama-cpp-python): each file is loaded as
users will run it and scored on the evaluation windows inside llama.cpp, its logits at every
position beside the fp16 reference's; and its metadata is read back with gguf's GGUFReader and
compared with what the fp16 directory says.

Usage:
    model = GGUFModel(Path("m.Q4_K_M.gguf"), n_ctx=2048)   # threads=2
    scores = score(model, windows, fp16_logits)          # fp16_logits(b) -> [T, V] float32
    problems = metadata_problems(Path("m.Q4_K_M.gguf"), Path("fp16"), tokenizer, model, sample)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.bounded import check_gguf, gguf_reader, read_json
from pipeline.core.errors import InputError
from pipeline.core.llama import LlamaArgs
from pipeline.core.llamacpp_tools import bindings, llama_log
from verify.metrics import kl_top1, logits_parity
from verify.thresholds import GGUF_FLOAT_REL


class GGUFModel:
    """One GGUF file loaded in llama.cpp with a context of n_ctx tokens, logits kept for every
    position (what perplexity and KL need)."""

    def __init__(self, path: Path, n_ctx: int, threads: int = 2) -> None:
        Llama = bindings().Llama
        self.path = Path(path)
        check_gguf(self.path)  # llama.cpp reads only a header whose counts fit the file
        lines: list[str] = []
        try:
            with llama_log(lines.append):
                self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx,
                                 n_ubatch=n_ctx, logits_all=True, n_threads=threads,
                                 n_threads_batch=threads, verbose=False)
        except (ValueError, RuntimeError) as e:
            tail = " ".join("".join(lines).split())[-300:]
            raise InputError(f"{self.path}: llama.cpp cannot load it ({e}; {tail})") from None

    def logits(self, tokens: list[int]) -> torch.Tensor:
        """float32 logits [T, V] of one window, from an empty cache (positions 0..T-1)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[:len(tokens)], dtype=np.float32))

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's ids for text, BOS first (special tokens in the text not parsed)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def close(self) -> None:
        self.llm.close()


@dataclass
class Scores:
    """What one GGUF file gave on the evaluation windows, against the fp16 reference."""

    nll: torch.Tensor  # [N] summed NLL of tokens[:, 1:] per window (float64)
    kl: torch.Tensor  # [N, T-1] KL(fp16 || gguf) at the positions nll scores
    same: torch.Tensor  # [N, T-1] bool: same top token as fp16
    parity: dict[str, float]  # logits_parity over every position of every window


def score(model: GGUFModel, windows: torch.Tensor,
          fp16_logits: Callable[[int], torch.Tensor]) -> Scores:
    """Run every window [N, T] through llama.cpp; compare with fp16_logits(b) ([T, V] float32)."""
    N, T = windows.shape
    nll = torch.zeros(N, dtype=torch.float64)
    kl, same = torch.zeros(N, T - 1), torch.zeros(N, T - 1, dtype=torch.bool)
    worst, agree = 0.0, 0.0
    for b in tqdm(range(N), desc=f"{model.path.name} llama.cpp", unit="window", file=sys.stderr,
                  leave=False):
        ours, ref = model.logits(windows[b].tolist()), fp16_logits(b)
        if ours.shape != ref.shape:
            raise InputError(f"{model.path}: llama.cpp gives logits {tuple(ours.shape)}, the fp16 "
                             f"model {tuple(ref.shape)}: not a conversion of it")
        nll[b] = F.cross_entropy(ours[:-1], windows[b, 1:], reduction="sum").double()
        kl[b], same[b] = kl_top1(ref[:-1], ours[:-1])
        p = logits_parity(ours, ref)
        worst, agree = max(worst, p["max_rel_err"]), agree + p["top1_agreement"] / N
        if math.isnan(p["max_rel_err"]):
            worst = math.nan
    return Scores(nll, kl, same, {"max_rel_err": worst, "top1_agreement": agree})


def field(reader: Any, key: str) -> Any:
    """A GGUF metadata value as Python (None when absent)."""
    f = reader.get_field(key)
    return None if f is None else f.contents()


def metadata_problems(path: Path, fp16: Path, tokenizer: Any, model: GGUFModel,
                      sample: str) -> list[str]:
    """Where the GGUF's metadata (read back with GGUFReader) or llama.cpp's tokenisation of
    `sample` differs from the fp16 directory: hyper-parameters and θ from config.json, every
    token, the special ids and the chat template from its tokenizer."""
    cfg = read_json(fp16 / "config.json")
    a = LlamaArgs.from_hf_config(cfg)
    reader = gguf_reader(path)
    want: dict[str, Any] = {
        "general.architecture": "llama", "llama.context_length": a.max_seq_len,
        "llama.embedding_length": a.dim, "llama.block_count": a.n_layers,
        "llama.feed_forward_length": a.ffn_dim, "llama.attention.head_count": a.n_heads,
        "llama.attention.head_count_kv": a.n_kv_heads, "llama.rope.dimension_count": a.head_dim,
        "llama.rope.freq_base": a.rope_theta, "llama.attention.layer_norm_rms_epsilon": a.norm_eps,
        "llama.vocab_size": a.vocab_size,
        "tokenizer.ggml.bos_token_id": tokenizer.bos_token_id,
        "tokenizer.ggml.eos_token_id": tokenizer.eos_token_id,
        "tokenizer.ggml.padding_token_id": cfg.get("pad_token_id"),
        "tokenizer.chat_template": getattr(tokenizer, "chat_template", None),
    }
    problems = []
    for key, value in want.items():
        got = field(reader, key)
        close = (isinstance(value, float) and isinstance(got, float)
                 and math.isclose(got, value, rel_tol=GGUF_FLOAT_REL))  # stored as float32
        if got != value and not close:
            problems.append(f"{key} = {got!r}, the fp16 model has {value!r}")
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    wrong = [i for i in range(max(len(tokens), a.vocab_size))
             if i >= len(tokens) or tokens[i] != vocab.get(i)]
    if wrong:
        problems.append(f"{len(wrong)} token(s) differ from the fp16 tokenizer's (first: id "
                        f"{wrong[0]})")
    scaled = bool(a.rope_scaling) and a.rope_scaling.get("rope_type") == "llama3"
    has_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if scaled != has_freqs:
        problems.append(f"rope_freqs tensor {'missing' if scaled else 'present'}, but config.json "
                        f"has rope_scaling {a.rope_scaling!r}")
    ids, ref = model.tokenize(sample), tokenizer(sample)["input_ids"]
    if ids != ref:
        at = next((i for i, (x, y) in enumerate(zip(ids, ref, strict=False)) if x != y),
                  min(len(ids), len(ref)))
        problems.append(f"llama.cpp tokenises the evaluation text differently from the fp16 "
                        f"tokenizer from token {at} on ({ids[at:at + 5]} vs {ref[at:at + 5]})")
    return problems


def file_type(path: Path) -> int:
    """general.file_type of a GGUF file (llama.cpp's llama_ftype)."""
    value = field(gguf_reader(path), "general.file_type")
    if not isinstance(value, int):
        raise InputError(f"{path}: no general.file_type in its metadata")
    return value


IMATRIX_KEYS = {"file": "quantize.imatrix.file", "dataset": "quantize.imatrix.dataset",
                "entries": "quantize.imatrix.entries_count",
                "chunks": "quantize.imatrix.chunks_count"}


def imatrix_record(path: Path) -> dict[str, Any] | None:
    """What llama-quantize recorded in a GGUF file of the importance matrix it was made with
    (file name, dataset, entries, chunks); None for a file made without one."""
    reader = gguf_reader(path)
    record = {k: field(reader, key) for k, key in IMATRIX_KEYS.items()}
    return record if record["file"] is not None else None


def imatrix_problems(record: dict[str, Any], imatrix: Path) -> list[str]:
    """Where a GGUF file's record of its importance matrix disagrees with the file `imatrix`
    (name, entries, chunks, dataset)."""
    reader = gguf_reader(imatrix)
    entries = sum(t.name.endswith(".in_sum2") for t in reader.tensors)
    want = {"file": imatrix.name, "dataset": (field(reader, "imatrix.datasets") or [None])[-1],
            "entries": entries, "chunks": field(reader, "imatrix.chunk_count")}
    return [f"made with {k} {record[k]!r}, {imatrix} has {v!r}"
            for k, v in want.items() if record[k] != v]
