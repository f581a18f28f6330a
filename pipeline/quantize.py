"""The quantize stage: an HF Llama directory -> a GPTQ v1 directory, one decoder layer at a time.

Calibration activations pass through layer i (layers before it already quantised), layer i is
quantised in true-sequential order, and its outputs feed layer i+1. Each finished layer is written
to the partial directory, so memory does not grow with depth and `--resume` continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from pipeline import __version__
from pipeline.core.bounded import (DEFAULT_SHARD_SIZE, GGUF_MAGIC, loads_json, parse_size,
                                   read_json)
from pipeline.core.calibration import NSAMPLES, SEED, SEQLEN, load_calibration, local_files
from pipeline.core.checkpoint import INDEX_NAME, HFCheckpoint
from pipeline.core.errors import InputError, PipelineError, os_failure
from pipeline.core.gptq_format import dequantize, pack, packable, packed_shapes, write_configs
from pipeline.core.gptq_layout import BITS, PACK_RUN, SUFFIXES, n_groups, ragged
from pipeline.core.grid import QuantResult
from pipeline.core.llama import (LAYER_NORMS, LINEAR_GROUPS, LINEARS, DecoderLayer, LlamaArgs,
                                 chunks, compute_dtype, fits_in_memory, load_layer, pick_device,
                                 rotary)
from pipeline.core.output import check_target, overlap, partial_path, staged_dir, staged_file
from pipeline.core.paths import PATH
from pipeline.core.safetensors_stream import ShardedWriter, TensorSpec, header_bytes, read_header
from pipeline.core.tokenizer import load_tokenizer
from pipeline.methods import METHODS, QUANT_LOG, QuantSpec
from verify.runtimes import RAGGED_REFUSED_BY

COPY_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
LAYERS_DIR, RUN_FILE = "layers", "run.json"  # resume state inside the partial directory
SUM2 = "in_sum2"  # a layer file's Σx² per input column of each linear (what --imatrix writes)
DEFAULT = QuantSpec(bits=4)  # the CLI's defaults: QuantSpec's, at 4 bits


def check_model(ck: HFCheckpoint, spec: QuantSpec) -> list[str]:
    """Refuse what this stage cannot quantise correctly, before any work is done (HFCheckpoint
    has checked the config, the headers and every tensor's dtype and shape). Returns the linears
    whose last group is partial (ceil(in/group) groups): quantised, though RAGGED_REFUSED_BY
    refuse them."""
    cfg = ck.path / "config.json"
    if ck.quantization:
        raise InputError(f"{cfg}: the model is already quantised ({ck.quantization}); "
                         "quantise the fp16 model instead")
    shapes = ck.args.linear_shapes()
    for name, (n_out, n_in) in shapes.items():
        if not (packable(n_in) and packable(n_out)):
            raise InputError(f"{cfg}: {name} is [{n_out}, {n_in}]; GPTQ packing needs both "
                             f"dimensions to be multiples of {PACK_RUN}")
    return [name for name, (_, n_in) in shapes.items()
            if ragged(n_in, spec.group_size)]


def activation_device(dev: torch.device, nbytes: int) -> torch.device:
    """Keep a layer's inputs and outputs on the device when both fit in half its free memory;
    otherwise in host memory, moved over one sample at a time."""
    if dev.type != "cuda" or fits_in_memory(2 * nbytes, dev):
        return dev
    return torch.device("cpu")


def run_layer(layer: DecoderLayer, X: torch.Tensor, Y: torch.Tensor, dev: torch.device,
              cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Y = layer(X) for the calibration samples X [n, T, dim], a chunk at a time on `dev`."""
    with torch.no_grad():
        for c in chunks(X):
            Y[c].copy_(layer(X[c].to(dev, non_blocking=True), cos, sin))


def hessian(inputs: Callable[[slice], torch.Tensor], parts: list[slice], where: str) -> torch.Tensor:
    """H = 2/n Σ x xᵀ (float32 [in, in]) over the rows x of inputs(c) for every chunk c."""
    H, n = None, 0
    for c in parts:
        x = inputs(c)
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        H = torch.zeros(x.shape[1], x.shape[1], device=x.device) if H is None else H
        H.addmm_(x.t(), x)
        n += x.shape[0]
    if not bool(torch.isfinite(H).all()):
        raise InputError(f"{where}: NaN/inf in the calibration activations entering it "
                         "(the weights contain NaN/inf, or fp16 overflowed: try --device cpu)")
    return H.mul_(2 / n)


def quantize_layer(layer: DecoderLayer, state: dict[str, torch.Tensor], spec: QuantSpec,
                   X: torch.Tensor | None, Y: torch.Tensor | None, dev: torch.device,
                   cos: torch.Tensor, sin: torch.Tensor,
                   prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Quantise the layer's linears in place (weights become the fake-quantised ones) and set
    Y = layer(X) with them; returns the packed tensors (and each linear's Σx² of its inputs,
    `.in_sum2`, when calibrated) and the per-module log.

    One chunked pass per linear group, in forward order, each from the intermediate the last one
    left in Y (attention's core, then the residual): true-sequential groups see the inputs of the
    groups already quantised, as the model will compute them."""
    tensors: dict[str, torch.Tensor] = {}
    log: dict[str, Any] = {}

    algorithm = METHODS[spec.method].algorithm()

    def quantise(group: tuple[str, ...], H: torch.Tensor | None) -> None:
        # linears of a group share their input, so one H (and what the method makes of it, GPTQ's
        # inverse) serves the group
        prepared = algorithm.prepare(H, spec)
        for name in group:
            t0 = time.perf_counter()
            W = state[f"{name}.weight"].to(dev, torch.float32)
            if not bool(torch.isfinite(W).all()):
                raise InputError(f"{prefix}{name}.weight: contains NaN/inf")
            r: QuantResult = algorithm.quantize(W, prepared, spec)
            layer.get_submodule(name).weight.data = r.Q.to(layer.get_submodule(name).weight.dtype)
            packed = pack(r.ints(spec.bits), r.zeros.to(torch.int32), r.scales, r.g_idx, spec.bits)
            tensors.update({f"{prefix}{name}.{k}": v.cpu() for k, v in packed.items()})
            log[f"{prefix}{name}"] = {"loss": r.loss, "damp": r.damp, "damp_failed": r.damp_retries,
                                      "seconds": round(time.perf_counter() - t0, 4)}
            if r.damp_retries:
                tqdm.write(f"{prefix}{name}: Cholesky failed with damp {r.damp_retries}, "
                           f"used {r.damp}", file=sys.stderr)

    if X is None or Y is None:  # a method without calibration: no forward
        for group in LINEAR_GROUPS:
            quantise(group, None)
        return tensors, log
    attn, mlp = layer.self_attn, layer.mlp
    norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
    parts = chunks(X)

    def x(c: slice) -> torch.Tensor:
        return X[c].to(dev, non_blocking=True)

    def y(c: slice) -> torch.Tensor:
        return Y[c].to(dev, non_blocking=True)

    def keep(c: slice, t: torch.Tensor) -> torch.Tensor:
        Y[c].copy_(t)
        return t

    # down_proj's inputs, kept (when they fit) for the layer's outputs: gate and up not run twice
    shape = (*X.shape[:2], mlp.up_proj.weight.shape[0])
    A = torch.empty(shape, dtype=X.dtype, device=X.device) if spec.true_sequential and \
        fits_in_memory(math.prod(shape) * X.dtype.itemsize, X.device) else None

    def act(c: slice) -> torch.Tensor:
        a = mlp.act(norm2(y(c)))
        if A is not None:
            A[c].copy_(a)
        return a

    qkv, o, gate_up, down = LINEAR_GROUPS
    inputs = (  # each group's input per chunk; Y holds attention's core, then the residual
        (qkv, lambda c: norm1(x(c))),
        (o, lambda c: keep(c, attn.core(norm1(x(c)), cos, sin))),
        (gate_up, lambda c: norm2(keep(c, x(c) + attn.o_proj(y(c))))),
        (down, act),
    )
    rows = X.shape[0] * X.shape[1]
    with torch.no_grad():
        H = {}
        for group, fn in inputs:
            H[group] = hessian(fn, parts, prefix + group[0])
            for name in group:  # Σx² = diag(H)·n/2: the importance matrix, before damping
                tensors[f"{prefix}{name}.{SUM2}"] = (H[group].diagonal() * (rows / 2)).cpu()
            if spec.true_sequential:
                quantise(group, H[group])
        if not spec.true_sequential:  # every H from the fp16 layer; then the whole layer again
            for group in LINEAR_GROUPS:
                quantise(group, H[group])
            run_layer(layer, X, Y, dev, cos, sin)
        else:
            for c in parts:
                r = y(c)
                a = A[c].to(dev, non_blocking=True) if A is not None else mlp.act(norm2(r))
                Y[c].copy_(r + mlp.down_proj(a))
    return tensors, log


def restore_layer(layer: DecoderLayer, file: Path, bits: int, prefix: str, dev: torch.device) -> None:
    """Give the layer the fake-quantised weights saved in `file` (bit-identical to the run)."""
    with safe_open(file, framework="pt") as f:
        for name in LINEARS:
            t = [f.get_tensor(f"{prefix}{name}.{k}").to(dev) for k in SUFFIXES]
            mod = layer.get_submodule(name)
            mod.weight.data = dequantize(*t, bits, name=prefix + name).to(mod.weight.dtype)


def output_plan(ck: HFCheckpoint, spec: QuantSpec) -> list[TensorSpec]:
    """Every output tensor in file order: fp16 embeddings/norms/lm_head, packed linears."""
    a, bits = ck.args, spec.bits
    plan = [TensorSpec("model.embed_tokens.weight", torch.float16, (a.vocab_size, a.dim))]
    for i in range(a.n_layers):
        p = f"model.layers.{i}."
        for norm in LAYER_NORMS:
            plan.append(TensorSpec(p + norm, torch.float16, (a.dim,)))
        for name, (n_out, n_in) in a.linear_shapes().items():
            packed = packed_shapes(n_out, n_in, bits, n_groups(n_in, spec.group_size))
            plan += [TensorSpec(f"{p}{name}.{k}", dtype, shape) for k, (dtype, shape) in packed.items()]
    plan.append(TensorSpec("model.norm.weight", torch.float16, (a.dim,)))
    if "lm_head.weight" in ck:
        plan.append(TensorSpec("lm_head.weight", torch.float16, (a.vocab_size, a.dim)))
    return plan


def write_model(ck: HFCheckpoint, tmp: Path, spec: QuantSpec, max_shard_bytes: int) -> list[str]:
    """Stream the final shards: fp16 tensors from the input, packed ones from the layer files."""
    plan = output_plan(ck, spec)
    layer_file: dict[int, Any] = {}  # the one open layer file
    writer = ShardedWriter(tmp, plan, max_shard_bytes, metadata={"quantization": METHODS[spec.method].format})
    for s in plan:
        if s.name in ck:  # shapes checked against config.json when the checkpoint was opened
            writer.write(s.name, ck.tensor(s.name).to(torch.float16))
            continue
        i = int(s.name.split(".")[2])
        if i not in layer_file:
            layer_file = {i: safe_open(tmp / LAYERS_DIR / f"{i:05d}.safetensors", framework="pt")}
        writer.write(s.name, layer_file[i].get_tensor(s.name))
    return writer.close()


def finished_layers(layers: Path, n_layers: int) -> int:
    """How many layers, from 0, have a whole result file. Each is written atomically, but a
    machine crash or a damaged disk can still leave one short: the first that does not read
    back (header against its size, its log) is removed, and that layer is done again."""
    done = 0
    while done < n_layers and (file := layers / f"{done:05d}.safetensors").is_file():
        try:
            read_header(file)
            with safe_open(file, framework="pt") as f:
                loads_json(f.metadata()["log"], f"{file}: log")
        except (InputError, SafetensorError, KeyError, TypeError):
            tqdm.write(f"resume: {file} is damaged; layer {done} is quantised again", file=sys.stderr)
            file.unlink()
            break
        done += 1
    return done


def calibration_tokens(model: Path, a: LlamaArgs, spec: QuantSpec, calibration: str | None,
                       nsamples: int, seqlen: int, seed: int) -> tuple[torch.Tensor | None, dict | None]:
    """Token windows [nsamples, seqlen] and their record; (None, None) for a method that reads
    none (RTN)."""
    if not METHODS[spec.method].calibrated:
        return None, None
    if not calibration:
        raise InputError(f"{spec.method.upper()} needs calibration text: pass "
                         "--calibration GLOB|DIR|FILE|hf:…")
    if seqlen > a.max_seq_len:
        raise InputError(f"--seqlen {seqlen} exceeds the model's max_position_embeddings "
                         f"{a.max_seq_len} ({model / 'config.json'})")
    tokens, info = load_calibration(calibration, load_tokenizer(model), nsamples, seqlen, seed)
    if int(tokens.max()) >= a.vocab_size:
        raise InputError(f"{model}: the tokenizer produces id {int(tokens.max())} beyond "
                         f"vocab_size {a.vocab_size} in config.json")
    return tokens, info


def quantize_layers(ck: HFCheckpoint, spec: QuantSpec, tokens: torch.Tensor | None,
                    layers_dir: Path, dev: torch.device) -> tuple[dict[str, Any], int, str]:
    """Quantise decoder layers in order into layers_dir/NNNNN.safetensors, replaying the layers
    already there (resume); returns the per-module log, layers replayed, where activations lived."""
    a, dtype = ck.args, compute_dtype(dev)
    done = finished_layers(layers_dir, a.n_layers)
    X = Y = None
    store = dev
    if tokens is not None:
        store = activation_device(dev, tokens.numel() * a.dim * dtype.itemsize)
        X = ck.embedded(tokens, dtype).to(store)  # [n, T, dim]
        Y = torch.empty_like(X)
    cos, sin = rotary(a, tokens.shape[1] if tokens is not None else 1, dev, dtype)
    modules: dict[str, Any] = {}
    replay = X is not None and done < a.n_layers  # finished layers rebuild the activations
    for i in tqdm(range(a.n_layers), desc=f"{spec.method} {spec.bits}-bit", unit="layer", file=sys.stderr):
        prefix, file = f"model.layers.{i}.", layers_dir / f"{i:05d}.safetensors"
        if i < done:
            with safe_open(file, framework="pt") as f:
                modules.update(loads_json(f.metadata()["log"], f"{file}: log"))
            if not replay:
                continue
        state = ck.layer_state(i)
        layer = load_layer(a, {k: v.to(dev, dtype) for k, v in state.items()},
                           f"{ck.path}: decoder layer {i}")
        if i < done:
            restore_layer(layer, file, spec.bits, prefix, dev)
        else:
            tensors, log = quantize_layer(layer, state, spec, X, Y, dev, cos, sin, prefix)
            # serialised here, written by Python: a full disk is an OSError like any other write
            file.with_suffix(".tmp").write_bytes(save(tensors, metadata={"log": json.dumps(log)}))
            file.with_suffix(".tmp").replace(file)
            modules.update(log)
        if X is not None and i < done:  # a restored layer's outputs
            run_layer(layer, X, Y, dev, cos, sin)
        if X is not None:  # the next layer's inputs
            X, Y = Y, X
        del layer, state
    return modules, done, store.type


def quantize(model: Path, out: Path, spec: QuantSpec, *, calibration: str | None = None,
             nsamples: int = NSAMPLES, seqlen: int = SEQLEN, seed: int = SEED, device: str = "auto",
             resume: bool = False, force: bool = False,
             max_shard_size: str = DEFAULT_SHARD_SIZE, imatrix: Path | None = None) -> dict:
    """Quantise the HF Llama directory `model` into the GPTQ directory `out`; returns the summary.
    `calibration` (glob, directory, file or hf:…) is required for GPTQ, unused by RTN. `imatrix`:
    also write llama.cpp's importance matrix of the same pass there (Σx² = diag(H)·n/2 of every
    linear's Hessian, summed over the activations GPTQ quantised it on)."""
    t_start = time.perf_counter()
    model, out = Path(model), Path(out)
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise InputError(f"--max-shard-size: {e}") from e
    inputs = [model, *calibration_files(spec, calibration)]
    check_target(out, force, manifest=QUANT_LOG, inputs=inputs)
    if imatrix is not None:
        imatrix = Path(imatrix)
        if not METHODS[spec.method].calibrated:
            raise InputError(f"--imatrix {imatrix}: {spec.method.upper()} passes no calibration "
                             "activations to sum; use `python -m pipeline imatrix`")
        for target in (out, partial_path(out)):
            if overlap(imatrix, target):
                raise InputError(f"--imatrix {imatrix}: {overlap(imatrix, target)} the output "
                                 f"{out}; choose a path outside it")
        check_target(imatrix, force, magic=GGUF_MAGIC, inputs=inputs)
    ck = HFCheckpoint(model)
    partial_groups = check_model(ck, spec)
    if partial_groups:
        tqdm.write(f"{', '.join(partial_groups)}: input width not a multiple of group "
                   f"{spec.group_size}, quantised with a partial last group; "
                   f"{', '.join(RAGGED_REFUSED_BY)} refuse such layers", file=sys.stderr)
    dev = pick_device(device)
    tokens, cal_info = calibration_tokens(model, ck.args, spec, calibration, nsamples, seqlen, seed)
    run = {"model": str(model.resolve()), "input": model_identity(ck), "spec": spec.as_dict(),
           "calibration": cal_info, "device": dev.type, "threads": torch.get_num_threads(),
           "tool_version": __version__}  # float sums follow the thread count: part of the identity

    def reuse(partial: Path) -> bool:
        """Continue `partial` only with --resume and when the same run made it."""
        why = resume_mismatch(partial / RUN_FILE, run) if resume else "no --resume"
        if why and resume:
            tqdm.write(f"resume: {partial} was made by another run ({why}); starting over",
                       file=sys.stderr)
        return why is None

    with staged_dir(out, force, True, manifest=QUANT_LOG, inputs=inputs, reuse=reuse) as tmp:
        (tmp / LAYERS_DIR).mkdir(exist_ok=True)
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2))
        modules, done, store = quantize_layers(ck, spec, tokens, tmp / LAYERS_DIR, dev)
        if imatrix is not None:
            write_pass_imatrix(imatrix, tmp / LAYERS_DIR, ck, spec, tokens, cal_info, force, inputs)
        files = write_model(ck, tmp, spec, shard_bytes)
        for name in COPY_FILES:
            if (model / name).is_file():
                shutil.copy2(model / name, tmp / name)
                files.append(name)
        write_configs(tmp, ck.config, spec)
        seconds = time.perf_counter() - t_start
        log = {"method": spec.method, "spec": spec.as_dict(), "calibration": cal_info,
               "modules": modules, "seconds": round(seconds, 3), "resumed_layers": done,
               "partial_groups": {"linears": partial_groups,
                                  "refused_by": list(RAGGED_REFUSED_BY) if partial_groups else []},
               "device": dev.type, "threads": run["threads"], "activations": store,
               "tool_version": __version__}
        (tmp / QUANT_LOG).write_text(json.dumps(log, indent=2) + "\n")
        shutil.rmtree(tmp / LAYERS_DIR)
        (tmp / RUN_FILE).unlink()
    n = ck.args.n_layers
    return {"out": str(out), "imatrix": str(imatrix) if imatrix else None, "method": spec.method,
            "bits": spec.bits, "group_size": spec.group_size, "act_order": spec.act_order, "layers": n, "resumed_layers": done, "device": dev.type,
            "seconds": round(seconds, 3), "seconds_per_layer": round(seconds / n, 3),
            "files": sorted(files + ["config.json", "quantize_config.json", QUANT_LOG]),
            "calibration": cal_info}


def write_pass_imatrix(path: Path, layers: Path, ck: HFCheckpoint, spec: QuantSpec,
                       tokens: torch.Tensor, cal_info: dict[str, Any], force: bool,
                       inputs: list[Path]) -> None:
    """The importance matrix of the pass from the layer files' Σx² (resumed layers' included)."""
    from pipeline.core.imatrix_format import write_model_imatrix  # the gguf library: slow import

    sums = {}
    for i in range(ck.args.n_layers):
        with safe_open(layers / f"{i:05d}.safetensors", framework="pt") as f:
            sums.update({k.removesuffix(SUM2) + "weight": f.get_tensor(k).double().numpy()
                         for k in f.keys() if k.endswith("." + SUM2)})
    if len(sums) != ck.args.n_layers * len(LINEARS):
        raise PipelineError(f"{layers}: {len(sums)} of {ck.args.n_layers * len(LINEARS)} linears "
                            "have their Σx²; quantise again without --resume")
    what = (f"the model in this pipeline's GPTQ pass ({spec.bits}-bit, group {spec.group_size}"
            f"{', act-order' if spec.act_order else ''}), each layer fed by the layers before it "
            "already quantised")
    n, T = tokens.shape
    with staged_file(path, force, magic=GGUF_MAGIC, inputs=inputs) as tmp:
        try:
            write_model_imatrix(tmp, sums, ck.args.n_layers, tokens.numel(), n, T,
                                cal_info["source"], what)
        except OSError as e:
            raise os_failure(e, path) from e


def calibration_files(spec: QuantSpec, calibration: str | None) -> list[Path]:
    """The local calibration files the method will read (none for RTN or a hf: dataset)."""
    if not METHODS[spec.method].calibrated or not calibration or calibration.startswith("hf:"):
        return []
    return local_files(calibration)


def model_identity(ck: HFCheckpoint) -> dict[str, Any]:
    """What identifies the input model for --resume, cheaply but soundly: small files (config,
    index, tokenizer) by sha256; each safetensors file by the sha256 of its header (names, dtypes,
    shapes, offsets) and its size, mtime, ctime and inode, without reading the weights. Writing
    or replacing a file changes its ctime (set by the kernel on every change, not settable from
    user space) or inode, so an equal record means the same bytes; a spurious difference (chmod,
    a copied directory) only makes the resume start over."""
    ident: dict[str, Any] = {}
    for name in ("config.json", INDEX_NAME, *COPY_FILES):
        if (ck.path / name).is_file():
            ident[name] = hashlib.sha256((ck.path / name).read_bytes()).hexdigest()
    for name in sorted(ck.headers):
        path = ck.path / name
        st = path.stat()
        header, _ = header_bytes(path)
        ident[name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                       "inode": st.st_ino, "header_sha256": hashlib.sha256(header).hexdigest()}
    return ident


def resume_mismatch(run_file: Path, run: dict) -> str | None:
    """None when the partial output was made by this same run (model files, spec, calibration,
    device, tool version), else what differs."""
    try:
        old = read_json(run_file)
    except InputError:
        return f"no readable {RUN_FILE}"
    new = json.loads(json.dumps(run))
    changed = [k for k in new if not isinstance(old, dict) or old.get(k) != new[k]]
    return f"{', '.join(changed)} changed" if changed else None


@click.command("quantize")
@click.argument("model", type=PATH)
@click.argument("out", type=PATH)
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default=str(DEFAULT.bits),
              show_default=True)
@click.option("--group-size", type=int, default=DEFAULT.group_size, show_default=True,
              help="columns per group (any positive width; a partial last group is recorded); "
                   "-1: one group per row")
@click.option("--act-order/--no-act-order", default=DEFAULT.act_order, show_default=True,
              help="quantise columns by descending Hessian diagonal (desc_act)")
@click.option("--sym/--asym", default=DEFAULT.sym, show_default=True,
              help="symmetric or asymmetric grid")
@click.option("--damp", type=float, default=DEFAULT.damp, show_default=True,
              help="fraction of mean diag(H)")
@click.option("--static-groups", is_flag=True, default=DEFAULT.static_groups,
              help="fit every group's grid up front")
@click.option("--true-sequential/--no-true-sequential", default=DEFAULT.true_sequential,
              show_default=True)
@click.option("--mse/--no-mse", default=DEFAULT.mse, show_default=True,
              help="search shrunk ranges for the least-error grid (--no-mse: min-max)")
@click.option("--blocksize", type=int, default=DEFAULT.blocksize, show_default=True)
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT.method, show_default=True)
@click.option("--calibration", help="glob, directory, file, or hf:DATASET[:CONFIG]:SPLIT:FIELD")
@click.option("--nsamples", type=int, default=NSAMPLES, show_default=True)
@click.option("--seqlen", type=int, default=SEQLEN, show_default=True)
@click.option("--seed", type=int, default=SEED, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto|cpu|cuda[:N]")
@click.option("--max-shard-size", default=DEFAULT_SHARD_SIZE, show_default=True)
@click.option("--imatrix", type=PATH, default=None,
              help="also write llama.cpp's importance matrix (GGUF) of this pass there, for "
                   "`gguf --imatrix`")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last finished layer")
@click.option("--force", is_flag=True, help="replace an existing output")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object")
def command(model: Path, out: Path, bits: str, group_size: int, act_order: bool, sym: bool,
            damp: float, static_groups: bool, true_sequential: bool, mse: bool, blocksize: int,
            method: str, calibration: str | None, nsamples: int, seqlen: int, seed: int,
            device: str, max_shard_size: str, imatrix: Path | None, resume: bool, force: bool,
            as_json: bool) -> None:
    """Quantise an HF Llama directory MODEL to GPTQ (v1 format) in OUT, layer by layer."""
    spec = QuantSpec(int(bits), group_size, act_order, sym=sym, damp=damp, static_groups=static_groups,
                     true_sequential=true_sequential, mse=mse, blocksize=blocksize, method=method)
    s = quantize(model, out, spec, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                 seed=seed, device=device, resume=resume, force=force, max_shard_size=max_shard_size,
                 imatrix=imatrix)
    line = (f"quantized {s['layers']} layers ({s['method']}, {s['bits']}-bit, group {s['group_size']}, "
            f"act-order {s['act_order']}) to {s['out']} in {s['seconds']:.1f}s "
            f"({s['seconds_per_layer']:.2f}s/layer, {s['resumed_layers']} resumed)")
    if s["imatrix"]:
        line += f"; importance matrix of the pass: {s['imatrix']}"
    if as_json:
        click.echo(json.dumps(s))
    click.echo(line, err=as_json)
