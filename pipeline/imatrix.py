"""The imatrix stage: llama.cpp's importance matrix from our calibration text. For every decoder
linear, Σx² per input channel of the fp16 model's own activations over the calibration windows,
and the token count, written in llama.cpp's GGUF imatrix format, which its quantiser reads
(`gguf --imatrix`).

The format: pipeline/core/imatrix_format.py. Covered: the seven linears of every block
(`blk.N.*`), as llama.cpp's tool covers them; `output.weight` only with its --process-output, so
not here. q/k are permuted for RoPE along their output rows only: the input columns, which the
imatrix describes, keep their order.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from pipeline import __version__
from pipeline.core.calibration import NSAMPLES, SEED, SEQLEN, load_calibration
from pipeline.core.bounded import GGUF_MAGIC
from pipeline.core.checkpoint import HFCheckpoint
from pipeline.core.errors import InputError, os_failure
from pipeline.core.imatrix_format import FP16_ACTIVATIONS, write_model_imatrix
from pipeline.core.llama import LINEARS, chunks, compute_dtype, load_layer, pick_device, rotary
from pipeline.core.output import staged_file
from pipeline.core.paths import PATH
from pipeline.core.tokenizer import load_tokenizer


def collect(ck: HFCheckpoint, tokens: torch.Tensor, dev: torch.device) -> dict[str, np.ndarray]:
    """HF weight name -> Σx² [n_in] (float64) of each decoder linear's input, over the token
    windows [n, T], layer by layer through the fp16 model."""
    a, dtype = ck.args, compute_dtype(dev)
    X = ck.embedded(tokens, dtype)  # [n, T, dim], on the host
    cos, sin = rotary(a, tokens.shape[1], dev, dtype)
    sums: dict[str, np.ndarray] = {}
    for i in tqdm(range(a.n_layers), desc="imatrix", unit="layer", file=sys.stderr):
        state = {k: v.to(dev, dtype) for k, v in ck.layer_state(i).items()}
        layer = load_layer(a, state, f"{ck.path}: decoder layer {i}")
        acc: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def pre(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                acc[name] = acc[name] + (x * x).sum(0) if name in acc else (x * x).sum(0)
            return pre

        handles = [layer.get_submodule(n).register_forward_pre_hook(hook(n)) for n in LINEARS]
        with torch.no_grad():
            for c in chunks(X):
                X[c] = layer(X[c].to(dev), cos, sin).to(X.device)
        for h in handles:
            h.remove()
        for n in LINEARS:
            s = acc[n].cpu().numpy()
            if not np.isfinite(s).all():
                raise InputError(f"{ck.path}: model.layers.{i}.{n}: NaN/inf in its calibration "
                                 "activations (fp16 overflow: try --device cpu)")
            sums[f"model.layers.{i}.{n}.weight"] = s
        del layer, state
    return sums


def imatrix(fp16: Path, out: Path, *, calibration: str, nsamples: int = NSAMPLES,
            seqlen: int = SEQLEN, seed: int = SEED, device: str = "auto",
            force: bool = False) -> dict[str, Any]:
    """The importance matrix of the fp16 model `fp16` on `calibration` (the windows GPTQ reads:
    same source, count, length and seed give the same tokens) into the GGUF file `out`."""
    t0 = time.perf_counter()
    fp16, out = Path(fp16), Path(out)
    ck = HFCheckpoint(fp16)
    if ck.quantization is not None:
        raise InputError(f"{fp16}: a quantised (GPTQ) model; give the fp16 model")
    if seqlen > ck.args.max_seq_len:
        raise InputError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings "
                         f"{ck.args.max_seq_len} ({fp16 / 'config.json'})")
    tokens, info = load_calibration(calibration, load_tokenizer(fp16), nsamples, seqlen, seed)
    dev = pick_device(device)
    with staged_file(out, force, magic=GGUF_MAGIC, inputs=[fp16]) as tmp:
        sums = collect(ck, tokens, dev)
        try:
            write_model_imatrix(tmp, sums, ck.args.n_layers, tokens.numel(), nsamples, seqlen,
                                calibration, FP16_ACTIVATIONS)
        except OSError as e:
            raise os_failure(e, out) from e
    return {"tool": "llama-gptq-pipeline imatrix", "tool_version": __version__,
            "output": str(out.resolve()), "source": str(fp16.resolve()), "tensors": len(sums),
            "chunks": nsamples, "chunk_size": seqlen, "tokens": tokens.numel(),
            "calibration": info, "device": dev.type,
            "seconds": round(time.perf_counter() - t0, 3)}


@click.command("imatrix")
@click.argument("fp16", type=PATH)
@click.argument("out", type=PATH)
@click.option("--calibration", required=True,
              help="Calibration text: glob, directory, file or hf:DATASET[:CONFIG]:SPLIT:FIELD.")
@click.option("--nsamples", type=click.IntRange(min=1), default=NSAMPLES, show_default=True,
              help="Windows (llama.cpp's chunks).")
@click.option("--seqlen", type=click.IntRange(min=2), default=SEQLEN, show_default=True,
              help="Tokens per window (llama.cpp's chunk size).")
@click.option("--seed", type=click.IntRange(min=0), default=SEED, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace OUT if it is a GGUF file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def command(fp16: Path, out: Path, calibration: str, nsamples: int, seqlen: int, seed: int,
            device: str, force: bool, as_json: bool) -> None:
    """The importance matrix (llama.cpp's imatrix, GGUF) of the fp16 directory FP16 on
    calibration text, into OUT, for `gguf --imatrix`."""
    s = imatrix(fp16, out, calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                device=device, force=force)
    if as_json:
        click.echo(json.dumps(s))
    click.echo(f"wrote {out}: imatrix of {s['tensors']} tensors, {s['chunks']} chunks × "
               f"{s['chunk_size']} tokens, {s['seconds']:.1f} s", err=as_json)
