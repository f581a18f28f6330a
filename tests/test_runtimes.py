"""GPTQ variants of the shipped demo model loaded in the runtimes users run them in: GPTQModel's own
loader and torch kernel, and transformers' from_pretrained (through optimum, which takes
GPTQModel's CPU kernels). Each is an independent unpacker and kernel, so each must give our
dequantised forward's perplexity (verify/forward.py) on the held-out windows. A model with a
ragged FFN (704 inputs, group 128) quantises and loads in GPTQModel; vLLM reports "needs CUDA".

Margin: on this model the runtimes, computing in fp16, were measured within 4.2e-4 of our float32
perplexity (the largest: transformers' int4 kernel on 4-bit act-order); the bound PPL_MATCH is
5e-3, so CPU and kernel rounding differences have 12x room."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from demo_model import CALIBRATION, EVAL, RAGGED_FFN, demo_fp16, ragged_model
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pipeline.methods import QuantSpec
from pipeline.quantize import quantize
from verify import runtimes
from verify.forward import LayerwiseModel
from verify.metrics import eval_tokens, perplexity, windows
from verify.runtimes import RAGGED_REFUSED_BY, RUNTIMES, Runtime, run_runtime
from verify.thresholds import PPL_MATCH

pytestmark = pytest.mark.slow  # variants loaded in GPTQModel and transformers

CAL = {"nsamples": 16, "seqlen": 128, "device": "cpu"}  # as tests/test_quantize.py
SEQLEN, MAX_WINDOWS = 256, 4  # fp16 matmuls on the CPU are slow (~1.5 s per window here)
VARIANTS = {"4bit-128g": QuantSpec(4, 128, False), "4bit-32g-actorder": QuantSpec(4, 32, True),
            "8bit-128g": QuantSpec(8, 128, False), "3bit-128g": QuantSpec(3, 128, False)}
CPU_RUNTIMES = ("gptqmodel", "transformers")


@pytest.fixture(scope="module")
def eval_windows(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    fp16 = demo_fp16(tmp_path_factory.mktemp("runtimes") / "fp16")
    texts = [Path(f).read_text() for f in sorted(glob.glob(EVAL))]
    return fp16, windows(eval_tokens(AutoTokenizer.from_pretrained(fp16), texts), SEQLEN, MAX_WINDOWS)


@pytest.fixture(scope="module")
def reference(eval_windows):
    """fp16's logits per window (float32 forward), for KL / top-1."""
    fp16, W = eval_windows
    base = LayerwiseModel(fp16, "cpu", torch.float32, progress=False)
    (h,) = base.hidden([W])
    return lambda b: base.project(h[b, :-1])


def ours(variant: Path, W: torch.Tensor) -> float:
    """Perplexity of our dequantised float32 forward: the value every runtime must reproduce."""
    m = LayerwiseModel(variant, "cpu", torch.float32, progress=False)
    (h,) = m.hidden([W])
    return perplexity(m.nll(h, W), W.shape[1])


@pytest.fixture(scope="module")
def variants(eval_windows, tmp_path_factory) -> dict[str, tuple[Path, float]]:
    fp16, W = eval_windows
    tmp = tmp_path_factory.mktemp("variants")
    out = {}
    for name, spec in VARIANTS.items():
        quantize(fp16, tmp / name, spec, calibration=CALIBRATION, **CAL)
        out[name] = (tmp / name, ours(tmp / name, W))
    return out


def assert_matches(r: dict, ppl_ours: float) -> None:
    assert r["checked"], f"{r['runtime']}: {r['reason']}"
    assert r["loaded"] and r["error"] is None, r["error"]
    assert r["kernels"], "no quantised linear found in the loaded model"
    assert abs(r["ppl"] / ppl_ours - 1) <= PPL_MATCH, (r["ppl"], ppl_ours)
    assert r["passed"] is True and r["ratio"] == pytest.approx(r["ppl"] / ppl_ours - 1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("runtime", CPU_RUNTIMES)
def test_runtime_matches_our_dequantised_forward(runtime, variant, variants, eval_windows, reference):
    path, ppl_ours = variants[variant]
    r = run_runtime(runtime, path, eval_windows[1], ppl_ours=ppl_ours, reference=reference,
                    device="cpu")
    assert_matches(r, ppl_ours)
    assert r["variant"] == variant and r["device"] == "cpu" and r["version"]
    # against fp16: a real distance, not a copy of it, and no broken (`!!!!`) output
    assert 0 < r["kl_mean"] <= r["kl_p99"] and 0.5 < r["top1"] <= 1


def test_vllm_is_reported_not_checked_without_cuda(variants, eval_windows):
    path, ppl_ours = variants["4bit-128g"]
    r = run_runtime("vllm", path, eval_windows[1], ppl_ours=ppl_ours, device="cpu")
    assert r["reason"] == "not checked: needs CUDA"
    assert not r["checked"] and not r["loaded"] and r["passed"] is None and r["ppl"] is None


def test_missing_package_and_unknown_runtime(variants, eval_windows, monkeypatch):
    def never(path, device):
        raise AssertionError("a runtime that is not installed must not be loaded")

    absent = Runtime("Absent", ("no_such_runtime_package",), False, never)
    monkeypatch.setitem(RUNTIMES, "absent", absent)
    r = run_runtime("absent", variants["4bit-128g"][0], eval_windows[1], device="cpu")
    assert r["reason"].startswith("not checked: no_such_runtime_package not installed")
    assert r["passed"] is None and not r["checked"]
    with pytest.raises(ValueError, match="unknown runtime 'nope'"):
        run_runtime("nope", variants["4bit-128g"][0], eval_windows[1], device="cpu")


def test_a_config_mixup_fails_in_the_runtime(variants, eval_windows, tmp_path):
    """A 4-bit checkpoint whose configs claim 8 bits: GPTQModel must refuse it or score it far
    off, and the result says it failed (never passed)."""
    src, ppl_ours = variants["4bit-128g"]
    bad = shutil.copytree(src, tmp_path / "mislabelled")
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((bad / name).read_text())
        (cfg.get("quantization_config") or cfg)["bits"] = 8
        (bad / name).write_text(json.dumps(cfg))
    r = run_runtime("gptqmodel", bad, eval_windows[1], ppl_ours=ppl_ours, device="cpu")
    assert r["checked"] and r["passed"] is False
    assert r["error"] or abs(r["ratio"]) > PPL_MATCH


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_groups_quantise_and_load_in_gptqmodel(act_order, eval_windows, tmp_path, capsys):
    fp16, W = eval_windows
    model = ragged_model(fp16, tmp_path / "ffn704", RAGGED_FFN)
    out = tmp_path / "q"
    quantize(model, out, QuantSpec(4, 128, act_order), calibration=CALIBRATION, **CAL)
    assert "mlp.down_proj: input width not a multiple of group 128" in capsys.readouterr().err
    log = json.loads((out / "quant_log.json").read_text())
    assert log["partial_groups"] == {"linears": ["mlp.down_proj"], "refused_by": list(RAGGED_REFUSED_BY)}
    tensors = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(f))
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape == (6, 256)  # ceil(704 / 128)
    assert tensors["model.layers.0.mlp.down_proj.g_idx"].max() == 5
    ppl_ours = ours(out, W)
    assert_matches(run_runtime("gptqmodel", out, W, ppl_ours=ppl_ours, device="cpu"), ppl_ours)
    if not act_order:  # transformers' CPU kernels refuse the layer, as its RUNTIMES entry says
        r = run_runtime("transformers", out, W, ppl_ours=ppl_ours, device="cpu")
        assert RUNTIMES["transformers"].refuses_ragged
        assert r["checked"] and r["passed"] is False and "divisible" in r["error"]


def test_runtime_output_stays_off_stdout(variants, eval_windows, capfd):
    """GPTQModel logs to stdout; run_runtime sends it to stderr so `--json` stays one object."""
    run_runtime("gptqmodel", variants["8bit-128g"][0], eval_windows[1][:1], device="cpu")
    assert capfd.readouterr().out == ""
    assert runtimes.not_checked("gptqmodel", torch.device("cpu")) is None


def test_a_tied_model_loads_in_every_cpu_runtime(tmp_path):
    """Llama 3.2's layout (tied embeddings, shipped with output.weight as Meta does): its GPTQ
    variant carries the head once (as the embedding: no lm_head.weight, tie_word_embeddings) and
    loads in GPTQModel and transformers at our perplexity; loaders have failed on checkpoints that
    carry both (KeyError: lm_head.weight)."""
    from meta_fixtures import build_checkpoint

    from pipeline.convert import convert

    convert(build_checkpoint(tmp_path / "meta", "llama3.2-output", 2), tmp_path / "fp16")
    q = tmp_path / "q"
    quantize(tmp_path / "fp16", q, QuantSpec(4, 32, True), calibration=CALIBRATION,
             nsamples=8, seqlen=64, device="cpu")
    assert json.loads((q / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(q / "model.safetensors")
    W = torch.randint(3, 768, (2, 64), generator=torch.Generator().manual_seed(0))
    ppl = ours(q, W)
    for runtime in CPU_RUNTIMES:
        assert_matches(run_runtime(runtime, q, W, ppl_ours=ppl, device="cpu"), ppl)
