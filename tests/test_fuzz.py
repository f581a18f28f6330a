"""Seeded, bounded fuzzing of what the stages parse: params.json (convert), and config.json and
safetensors headers (quantize, whose reader verify shares). Every mutant must give exit 0 with an
output that loads (transformers' AutoConfig, our checkpoint reader) and runs a finite forward
pass, or exit 2 with a message; never a traceback, never exit 0 with a broken output.

Bounds: MUTANTS per kind and a wall-clock budget for all of them (a slow machine runs fewer).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from meta_fixtures import build_checkpoint, refresh_checklist

from pipeline.convert import convert
from pipeline.core.meta import PARAMS_KEYS

SEED = 20261201
MUTANTS = 30  # per kind: params.json, config.json, safetensors header
BUDGET_S = 60.0  # all kinds together
MIN_MUTANTS = 15  # however slow the machine, at least this many run
VALUES = [0, -1, 1, 2, 3, 4, 7, 64, 4.0, 0.5, 1e-5, -1e-5, 1e30, 10**12, "8", "abc", "", None,
          True, False, math.nan, math.inf, -math.inf, [], {}, [64], {"rope_type": "llama3"}]
CONFIG_EXTRA_KEYS = ["head_dim", "rope_scaling", "rope_parameters", "quantization_config",
                     "hidden_act", "attention_bias", "unknown_key"]
DTYPES = ["F16", "BF16", "F32", "F64", "I16", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X"]


def mutate_json(d: dict, keys: list[str], rng: random.Random) -> str:
    """1-2 random edits of d in place (set a key to a hostile, scaled or unchanged value, delete
    one); returns what was done."""
    done = []
    for _ in range(rng.randint(1, 2)):
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.1 and key in d:
            del d[key]
            done.append(f"del {key}")
            continue
        old = d.get(key)
        if op < 0.55 and type(old) in (int, float):
            value = rng.choice([old * 2, old // 2 if type(old) is int else old / 2, old + 1, -old,
                                old, old, old * 10 if type(old) is float else old])
        else:
            value = rng.choice(VALUES)
        d[key] = value
        done.append(f"{key}={value!r}")
    return ", ".join(done)


def mutate_header(path: Path, rng: random.Random) -> str:
    """One random corruption of a safetensors file's header (or of its framing)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "add", "metadata",
                     "flip", "truncate", "length", "same"])
    if op == "dtype":
        entry["dtype"] = rng.choice(DTYPES)
    elif op == "shape":
        shape = entry["shape"]
        entry["shape"] = rng.choice([shape[::-1], shape[:-1], shape + [1], [s + 1 for s in shape],
                                     [-s for s in shape], [], ["64"] * len(shape)])
    elif op == "offsets":
        b, e = entry["data_offsets"]
        k = rng.choice([1, 2, 8, 1 << 40])
        entry["data_offsets"] = rng.choice([[b + k, e + k], [b - k, e - k], [e, b], [b, e + k],
                                            [b], [str(b), e]])
    elif op == "delete":
        del header[name]
    elif op == "rename":
        header[name + ".x" if rng.random() < 0.5 else name.replace("0", "7")] = header.pop(name)
    elif op == "add":
        header["model.layers.0.extra"] = {"dtype": "F16", "shape": [0], "data_offsets": [0, 0]}
    elif op == "metadata":
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"format": "pt"}])
    raw = json.dumps(header).encode()
    if op == "flip":
        raw = bytearray(data[8:8 + n])
        raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        raw = bytes(raw)
    out = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    if op == "truncate":
        out = out[:rng.randrange(len(out))]
    elif op == "length":
        out = struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, 2**40, 2**64 - 1])) + out[8:]
    path.write_bytes(out)
    return f"{op} {name}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz")
    build_checkpoint(d / "meta", "llama2", n_shards=2)
    convert(d / "meta", d / "fp16")
    return {"meta": d / "meta", "fp16": d / "fp16"}


TOKENS = torch.tensor([[1, 15, 200, 7, 99, 3, 42, 512]])


def check_fp16_output(out: Path) -> None:
    """transformers loads it and its forward pass is finite."""
    from transformers import AutoConfig, LlamaForCausalLM

    AutoConfig.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(TOKENS).logits).all()


def check_gptq_output(out: Path) -> None:
    """transformers reads its config, our reader opens it, its dequantised forward is finite."""
    from transformers import AutoConfig

    from verify.forward import LayerwiseModel

    AutoConfig.from_pretrained(out)
    model = LayerwiseModel(out, "cpu", torch.float32, progress=False)
    (h,) = model.hidden([TOKENS])
    assert torch.isfinite(model.logits(h)).all()


def test_fuzz_parsed_inputs(sources, tmp_path, monkeypatch, capsys):
    rng = random.Random(SEED)
    t0 = time.monotonic()
    outcomes: dict[str, list[int]] = {"params": [], "config": [], "header": []}
    for i in range(MUTANTS):
        for kind in outcomes:
            if time.monotonic() - t0 > BUDGET_S and sum(map(len, outcomes.values())) >= MIN_MUTANTS:
                break
            case = tmp_path / f"{kind}{i}"
            if kind == "params":
                src = shutil.copytree(sources["meta"], case / "meta")
                params = json.loads((src / "params.json").read_text())
                what = mutate_json(params, sorted(PARAMS_KEYS) + ["model", "extra"], rng)
                (src / "params.json").write_text(json.dumps(params))
                refresh_checklist(src)
                argv = ["convert", src, case / "out"]
            else:
                src = shutil.copytree(sources["fp16"], case / "fp16")
                if kind == "config":
                    cfg = json.loads((src / "config.json").read_text())
                    what = mutate_json(cfg, sorted(cfg) + CONFIG_EXTRA_KEYS, rng)
                    (src / "config.json").write_text(json.dumps(cfg))
                else:
                    what = mutate_header(src / "model.safetensors", rng)
                argv = ["quantize", src, case / "out", "--method", "rtn", "--bits", "4",
                        "--group-size", "32", "--device", "cpu"]
            code, out, err = run_cli(argv, monkeypatch, capsys)
            text = out + err
            where = f"{kind} mutant {i} ({what}): exit {code}\n{text[-2000:]}"
            assert "Traceback" not in text and code in (0, 2), where
            if code == 0:
                (check_fp16_output if kind == "params" else check_gptq_output)(case / "out")
            else:
                assert "error: " in text, where
                assert not (case / "out").exists(), where
            outcomes[kind].append(code)
            shutil.rmtree(case)
    ran = sum(map(len, outcomes.values()))
    assert ran >= MIN_MUTANTS, outcomes
    print(f"fuzz: {ran} mutants in {time.monotonic() - t0:.1f} s: "
          + ", ".join(f"{k} {v.count(0)} ok / {v.count(2)} refused" for k, v in outcomes.items()))
