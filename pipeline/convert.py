"""The convert stage: a Meta checkpoint (Llama 1/2, Code Llama, Llama 3.x; 1-16 model-parallel
shards) to a Hugging Face Llama directory. Streams: shards are memory-mapped, one merged tensor
exists at a time and is written while the next one is merged, so memory stays near two tensors
whatever the model's size."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.core.bounded import DEFAULT_SHARD_SIZE, parse_size
from pipeline.core.chat import FORMATS
from pipeline.core.dtypes import DEFAULT_DTYPE, STORAGE_DTYPES
from pipeline.core.errors import InputError, os_failure
from pipeline.core.llama import LAYER_NORMS, LlamaArgs
from pipeline.core.meta import (CHECKLIST, FAMILIES, HF_LAYER_NAMES, NOT_WEIGHTS, PARAMS,
                                ROTARY_HEADS, MetaCheckpoint, hf_name, load_shard, md5_files,
                                meta_names, model_args, permute_rotary, prefetch, release,
                                shard_dim, split_name, verify_checksums)
from pipeline.core.output import check_target, staged_dir
from pipeline.core.paths import PATH
from pipeline.core.safetensors_stream import ShardedWriter, TensorSpec
from pipeline.core.tokenizer import convert_tokenizer, load_source

DTYPES = {name: getattr(torch, name) for name in STORAGE_DTYPES}
MANIFEST = "conversion.json"
EMBEDDING_SPLIT = {0: "VocabParallelEmbedding (vocab split, dim 0)",
                   1: "ParallelEmbedding (width split, dim 1)"}


@dataclass(frozen=True)
class Layout:
    """What the shards hold, checked against params.json and the tokenizer."""

    args: LlamaArgs
    n_shards: int
    embedding_dim: int
    shapes: dict[str, tuple[int, ...]]  # merged shape per Meta name, in output order


def expected_shapes(a: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """Merged shape of every Meta tensor implied by the hyper-parameters, in output order: that of
    the HF tensor it becomes (the q/k permutation keeps shapes)."""
    hf = {f"{name}.weight": shape for name, shape in a.linear_shapes().items()}
    hf.update(dict.fromkeys(LAYER_NORMS, (a.dim,)))
    layer = {meta: hf[name] for meta, name in HF_LAYER_NAMES.items()}
    top = {"tok_embeddings.weight": (a.vocab_size, a.dim), "norm.weight": (a.dim,),
           "output.weight": (a.vocab_size, a.dim)}
    return {n: layer[s] if i is not None else top[s]
            for n in meta_names(a.n_layers, a.tie_word_embeddings) for i, s in [split_name(n)]}


def check_consistent(ckpt: MetaCheckpoint, shards: list[dict[str, torch.Tensor]]) -> set[str]:
    """Every rank holds the same float tensors with the same shapes, and exactly the layers
    params.json announces; returns the weight names (rope.freqs left out)."""
    p, paths = ckpt.params, ckpt.shards
    names = set(shards[0]) - NOT_WEIGHTS
    for path, s in zip(paths[1:], shards[1:], strict=True):
        if set(s) - NOT_WEIGHTS != names:
            diff = sorted(names ^ (set(s) - NOT_WEIGHTS))
            raise InputError(f"{path}: holds different tensors than {paths[0].name}: {diff[:6]}")
    if p["n_layers"] > len(names):  # before listing n_layers' names: it may be absurd
        raise InputError(f"{ckpt.path / PARAMS}: n_layers={p['n_layers']}, but the shards hold "
                         f"only {len(names)} tensors")
    expected = set(meta_names(p["n_layers"], tied="output.weight" not in names))
    if names != expected:
        layers = sorted({i for n in names for i, _ in [split_name(n)] if i is not None})
        raise InputError(f"{paths[0]}: tensors do not match params.json (n_layers={p['n_layers']}, "
                         f"shards hold layers {layers[:1]}..{layers[-1:]}): missing "
                         f"{sorted(expected - names)[:4]}, "
                         f"unexpected {sorted(names - expected)[:4]}")
    for name in sorted(names):
        shape = shards[0][name].shape
        for path, s in zip(paths[1:], shards[1:], strict=True):
            if s[name].shape != shape:
                raise InputError(f"{path}: tensor {name} has shape {tuple(s[name].shape)}, "
                                 f"{paths[0].name} has {tuple(shape)}")
        if not shards[0][name].is_floating_point():
            raise InputError(f"{paths[0]}: tensor {name} has dtype {shards[0][name].dtype}")
    return names


def read_layout(ckpt: MetaCheckpoint, shards: list[dict[str, torch.Tensor]],
                tokenizer_vocab: int) -> Layout:
    """Detect vocab, FFN width, kv heads, tied output and the embedding split from the shapes;
    every disagreement with params.json, the tokenizer or between shards is an InputError."""
    names = check_consistent(ckpt, shards)
    p, paths, MP = ckpt.params, ckpt.shards, len(shards)
    family = FAMILIES[ckpt.family]
    if family.tokenizer != ckpt.tokenizer_kind:
        raise InputError(f"{ckpt.tokenizer}: a {ckpt.tokenizer_kind} tokenizer, but {family.name} "
                         f"uses {family.tokenizer}")
    dim = p["dim"]
    if shards[0]["norm.weight"].shape != (dim,):
        raise InputError(f"{paths[0]}: norm.weight has shape "
                         f"{tuple(shards[0]['norm.weight'].shape)} but params.json says dim={dim}")
    e = shards[0]["tok_embeddings.weight"].shape
    if MP == 1:
        axis, vocab = family.embedding_dim, e[0]
    elif e[1] == dim:
        axis, vocab = 0, e[0] * MP
    elif e[1] * MP == dim:
        axis, vocab = 1, e[0]
    else:
        raise InputError(f"{paths[0]}: tok_embeddings.weight {tuple(e)} is neither a vocab nor a "
                         f"width split of dim={dim} over {MP} shards")
    if axis != family.embedding_dim:
        raise InputError(f"{paths[0]}: tok_embeddings is a {EMBEDDING_SPLIT[axis]}, but the "
                         f"tokenizer ({ckpt.tokenizer_kind}) says {family.name}, which uses "
                         f"{EMBEDDING_SPLIT[family.embedding_dim]}")
    if p.get("vocab_size", -1) > 0 and p["vocab_size"] != vocab:
        raise InputError(f"{ckpt.path / PARAMS}: vocab_size={p['vocab_size']} but "
                         f"tok_embeddings holds {vocab} rows")
    if tokenizer_vocab != vocab:
        raise InputError(f"{ckpt.tokenizer}: {tokenizer_vocab} tokens, but tok_embeddings holds "
                         f"{vocab} rows: wrong tokenizer for these weights?")
    if dim % p["n_heads"]:
        raise InputError(f"{ckpt.path / PARAMS}: dim={dim} is not divisible by "
                         f"n_heads={p['n_heads']}")
    tied = "output.weight" not in names or output_is_embedding(shards, axis)
    args = model_args(p, ckpt.family, vocab, tied=tied)
    hd = args.head_dim
    wk_rows = shards[0]["layers.0.attention.wk.weight"].shape[0] * MP
    if wk_rows != args.kv_dim:
        raise InputError(f"{paths[0]}: attention.wk holds {wk_rows / hd:g} kv heads of {hd}, "
                         f"params.json says n_kv_heads={args.n_kv_heads}")
    if args.n_heads % MP or args.n_kv_heads % MP:
        raise InputError(f"{ckpt.path}: {args.n_heads} heads / {args.n_kv_heads} kv heads do not "
                         f"split into {MP} shards")
    w1_rows = shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * MP
    if w1_rows != args.ffn_dim:
        raise InputError(f"{paths[0]}: feed_forward.w1 has {w1_rows} rows, params.json "
                         f"(multiple_of, ffn_dim_multiplier) gives FFN width {args.ffn_dim}")
    shapes = expected_shapes(args)
    for name, want in shapes.items():
        d = shard_dim(name, axis)
        got = list(shards[0][name].shape)
        if d is not None:
            got[d] *= MP
        if tuple(got) != want:
            raise InputError(f"{paths[0]}: tensor {name} merges to {tuple(got)}, expected {want} "
                             f"from params.json")
    return Layout(args, MP, axis, shapes)


def infill_trained(tok: dict, a: LlamaArgs) -> dict:
    """The tokenizer summary with `infill` kept only for a model Meta trained to fill in the
    middle: Code Llama 7B and 13B (codellama's README lists no other; its model card's "7B, 13B
    and 70B" is contradicted by the README and by Meta's examples). They are the Code Llamas
    without grouped-query attention: 34B and 70B, whose vocabulary may hold the pieces, are not
    offered infilling on their cards."""
    if tok["infill"] is None or a.n_kv_heads == a.n_heads:
        return tok
    return {**tok, "infill": None, "infill_pieces": tok["infill"]}


TIE_BLOCK = 4096  # rows compared at a time


def output_is_embedding(shards: list[dict[str, torch.Tensor]], axis: int) -> bool:
    """Whether output.weight is tok_embeddings (merged [vocab, dim] both): Meta ships the tied Llama
    3.2 1B/3B with or without it, and a tied head is written once (lm_head absent,
    tie_word_embeddings). Compared a block of rows at a time: an untied model differs at once."""
    out = [s["output.weight"] for s in shards]  # column-parallel: rows (vocab) split
    emb = [s["tok_embeddings.weight"] for s in shards]
    vocab = sum(t.shape[0] for t in out)
    if vocab != (sum(t.shape[0] for t in emb) if axis == 0 else emb[0].shape[0]):
        return False
    return all(torch.equal(merged_rows(out, 0, i, i + TIE_BLOCK),
                           merged_rows(emb, axis, i, i + TIE_BLOCK))
               for i in range(0, vocab, TIE_BLOCK))


def merged_rows(parts: list[torch.Tensor], axis: int, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of the tensor the ranks' parts merge to along `axis`."""
    if axis == 1:
        return torch.cat([p[start:stop] for p in parts], dim=1)
    rows, offset = [], 0
    for p in parts:
        lo, hi = max(start - offset, 0), min(stop - offset, p.shape[0])
        if lo < hi:
            rows.append(p[lo:hi])
        offset += p.shape[0]
    return torch.cat(rows)


def check_values(name: str, out: torch.Tensor, parts: list[torch.Tensor],
                 paths: list[Path]) -> None:
    """One fast reduction over the merged tensor (aminmax propagates NaN): NaN/Inf from the source,
    or values the output dtype cannot hold (cast to Inf), stop the conversion naming the tensor."""
    lo, hi = (float(v) for v in torch.aminmax(out))
    if math.isfinite(lo) and math.isfinite(hi):
        return
    for path, t in zip(paths, parts, strict=True):
        lo, hi = (float(v) for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise InputError(f"{path}: tensor {name} contains NaN or Inf")
        if max(-lo, hi) > torch.finfo(out.dtype).max:
            raise InputError(f"{path}: tensor {name}: values up to {max(-lo, hi):g} exceed "
                             f"{out.dtype}'s range (max {torch.finfo(out.dtype).max:g}); "
                             "convert with --dtype bfloat16")


def merge(out: torch.Tensor, name: str, parts: list[torch.Tensor], paths: list[Path],
          layout: Layout) -> torch.Tensor:
    """Fill `out` (the HF tensor) from the ranks' parts: concatenated along the shard dim (q/k
    rows permuted per head, rank by rank: heads never straddle ranks), or the replicated copy,
    checked equal on every rank; cast on the way."""
    d = shard_dim(name, layout.embedding_dim)
    if d is None:
        for path, t in zip(paths[1:], parts[1:], strict=True):
            if not torch.equal(t, parts[0]):
                raise InputError(f"{path}: replicated tensor {name} differs from {paths[0].name}")
        out.copy_(parts[0])
    else:
        heads = ROTARY_HEADS.get(split_name(name)[1])
        n_local = getattr(layout.args, heads) // layout.n_shards if heads else 0
        offset = 0
        for t in parts:
            dst = out.narrow(d, offset, t.shape[d])
            if heads:
                permute_rotary(t, n_local, out=dst)
            else:
                dst.copy_(t)
            offset += t.shape[d]
    check_values(name, out, parts, paths)
    return out


def hf_config(a: LlamaArgs, dtype: str, tok: dict[str, Any]) -> dict[str, Any]:
    """config.json as a plain dict: top-level rope_theta/rope_scaling read the same by
    transformers 4.x and 5.x; dtype and torch_dtype name the tensors actually written."""
    import transformers

    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": a.dim, "intermediate_size": a.ffn_dim, "num_hidden_layers": a.n_layers,
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
        "rope_scaling": a.rope_scaling, "max_position_embeddings": a.max_seq_len,
        "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"],
        "pad_token_id": tok["pad_token_id"],
        "tie_word_embeddings": a.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
        "dtype": dtype, "torch_dtype": dtype, "transformers_version": transformers.__version__,
    }


def source_hashes(ckpt: MetaCheckpoint, skip_checksums: bool) -> dict[str, Any]:
    """conversion.json's record of the source files: md5 of each (none when skipped), and which
    were checked against checklist.chk ("verified" only when every one was) and which were not
    (no checklist, or one that omits them: their md5 is computed, not checked)."""
    files = [*ckpt.shards, ckpt.path / PARAMS, ckpt.tokenizer]
    chk = ckpt.path / CHECKLIST
    has_checklist = chk.exists() or chk.is_symlink()  # present but unreadable: read_checklist says why
    checked = verify_checksums(ckpt.path) if has_checklist and not skip_checksums else {}
    unchecked = [p for p in files if p.name not in checked]
    sums = checked if skip_checksums else {**checked, **md5_files(unchecked, desc="md5")}
    status = ("skipped" if skip_checksums else f"no {CHECKLIST}" if not has_checklist
              else "partial" if unchecked else "verified")
    return {"checksums": status,
            "md5_checked": [p.name for p in files if p.name in checked],
            "md5_unchecked": [p.name for p in unchecked],
            "files": {p.name: {"bytes": p.stat().st_size, "md5": sums.get(p.name)} for p in files}}


def write_tensors(tmp: Path, shards: list[dict[str, torch.Tensor]], paths: list[Path],
                  layout: Layout, specs: list[TensorSpec], shard_bytes: int,
                  pool: ThreadPoolExecutor, side_job: Future) -> list[str]:
    """Stream every tensor into safetensors: tensor k is merged into one of two reused buffers
    while k-1 is written from the other (fresh memory per tensor costs page faults and zeroing);
    the next tensor's shard bytes are prefetched, the used ones handed back."""
    names = list(layout.shapes)
    buffers = [torch.empty(max(s.nbytes for s in specs), dtype=torch.uint8)
               for _ in range(min(2, len(specs)))]
    with ShardedWriter(tmp, specs, shard_bytes, {"source": "meta"}) as writer, \
            tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True,
                 desc="convert") as bar:
        pending: Future | None = None
        for k, (name, spec) in enumerate(zip(names, specs, strict=True)):
            parts = [s[name] for s in shards]
            for t in (s[names[k + 1]] for s in shards) if k + 1 < len(names) else ():
                prefetch(t)
            out = buffers[k % 2][:spec.nbytes].view(spec.dtype).view(spec.shape)
            merge(out, name, parts, paths, layout)
            for t in parts:
                release(t)
            if pending is not None:
                pending.result()
            if side_job.done():
                side_job.result()  # a failed side job stops the conversion now
            pending = pool.submit(writer.write, spec.name, out)
            pending.add_done_callback(lambda _, n=spec.nbytes: bar.update(n))
        if pending is not None:
            pending.result()
        return writer.close()


def convert(src: Path, out: Path, *, dtype: str = DEFAULT_DTYPE,
            max_shard_size: str = DEFAULT_SHARD_SIZE,
            skip_checksums: bool = False, force: bool = False, family: str | None = None,
            chat_format: str = "none") -> dict:
    """Convert the Meta checkpoint in `src` to a Hugging Face directory `out` (its tokenizer with
    the chat template of `chat_format`); returns the summary also written to out/conversion.json."""
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if chat_format not in FORMATS:
        raise InputError(f"--chat-format {chat_format!r}: choose one of {', '.join(FORMATS)}")
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise InputError(f"--max-shard-size: {e}") from e
    check_target(out, force, manifest=MANIFEST, inputs=[src])
    ckpt = MetaCheckpoint(src, family)
    hashes = source_hashes(ckpt, skip_checksums)
    shards = [load_shard(p) for p in ckpt.shards]
    layout = read_layout(ckpt, shards, load_source(ckpt.tokenizer, ckpt.family).vocab_size)
    specs = [TensorSpec(hf_name(n), DTYPES[dtype], shape) for n, shape in layout.shapes.items()]
    total = sum(s.nbytes for s in specs)

    with staged_dir(out, force, manifest=MANIFEST, inputs=[src]) as tmp:
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:  # tokenizer | tensor writes
                tok_job = pool.submit(convert_tokenizer, ckpt.tokenizer, tmp, ckpt.family,
                                      layout.args.max_seq_len, chat_format)
                written = write_tensors(tmp, shards, ckpt.shards, layout, specs, shard_bytes,
                                        pool, tok_job)
                tok = infill_trained(tok_job.result(), layout.args)
            config = hf_config(layout.args, dtype, tok)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            generation = {"bos_token_id": tok["bos_token_id"], "eos_token_id": tok["stop_ids"],
                          "pad_token_id": tok["pad_token_id"],
                          "transformers_version": config["transformers_version"]}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            summary = {
                "tool": "llama-gptq-pipeline convert", "tool_version": __version__,
                "source": {"path": str(src.resolve()), "family": ckpt.family,
                           "family_name": FAMILIES[ckpt.family].name, "n_shards": layout.n_shards,
                           **hashes},
                "params": ckpt.params,
                "detected": {**asdict(layout.args),
                             "embedding_split": EMBEDDING_SPLIT[layout.embedding_dim]},
                "tokenizer": tok, "output": {"path": str(out.resolve()), "dtype": dtype,
                                             "bytes": total, "files": written},
                "seconds": round(time.perf_counter() - t0, 3),
            }
            (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as e:
            raise os_failure(e, out) from e
    return summary


@click.command("convert")
@click.argument("src", type=PATH)
@click.argument("out", type=PATH)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=DEFAULT_DTYPE, show_default=True,
              help="Tensor dtype written (bf16 sources outside fp16's range are refused).")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
              help="Largest safetensors file (e.g. 5GB, 500MB).")
@click.option("--skip-checksums", is_flag=True, help="Do not verify checklist.chk's md5 sums.")
@click.option("--chat-format", type=click.Choice(FORMATS), default="none", show_default=True,
              help="Chat template written with the tokenizer (llama2: Llama 2-Chat and "
                   "CodeLlama-Instruct; llama3: Llama 3.x Instruct).")
@click.option("--family", type=click.Choice(sorted(FAMILIES)), default=None,
              help="Override the detected model family.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def command(src: Path, out: Path, dtype: str, max_shard_size: str, skip_checksums: bool,
            chat_format: str, family: str | None, force: bool, as_json: bool) -> None:
    """Convert Meta's original checkpoint SRC (consolidated.*.pth + params.json + tokenizer.model)
    into a Hugging Face Llama directory OUT, streamed tensor by tensor."""
    s = convert(src, out, dtype=dtype, max_shard_size=max_shard_size,
                skip_checksums=skip_checksums, force=force, family=family,
                chat_format=chat_format)
    if as_json:
        click.echo(json.dumps(s))
    a, o = s["detected"], s["output"]
    click.echo(f"converted {s['source']['family_name']} ({s['source']['n_shards']} shards, "
               f"{a['n_layers']} layers, vocab {a['vocab_size']}) to {out}: "
               f"{o['bytes'] / 1e9:.2f} GB {o['dtype']} in {len(o['files'])} files, "
               f"{s['seconds']:.1f} s "
               f"({o['bytes'] / 1e9 / max(s['seconds'], 1e-9):.2f} GB/s); {checksum_note(s['source'])}",
               err=as_json)


def checksum_note(source: dict[str, Any]) -> str:
    """Which source files checklist.chk vouched for, for the summary line."""
    unchecked = source["md5_unchecked"]
    if not unchecked:
        return f"md5 of all {len(source['md5_checked'])} source files verified against {CHECKLIST}"
    return (f"md5 NOT checked against {CHECKLIST} ({source['checksums']}) for: {', '.join(unchecked)}"
            + (f"; verified: {', '.join(source['md5_checked'])}" if source["md5_checked"] else ""))
