"""The verify stage end to end. fp16 against Meta: a good conversion passes; k not permuted, a wrong
rope_theta and a cut vocabulary fail conversion_parity. GPTQ variants of the shipped demo model
against fp16: good ones pass every check; 2-bit fails KL (GPTQ keeps its perplexity), moved zero
points and any one randomised tensor (qweight, qzeros, scales, g_idx) of one module fail
module_integrity naming the module, a muted final norm fails generation; a prompt that makes fp16
repeat itself fails nothing. Exit code 3 on a failed check; thresholds per bit width from the CLI
and the recipe; reports are reproducible and hash every file; bad inputs are refused."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import shutil
from pathlib import Path

import cli_runner
import pytest
import torch
import torch.nn.functional as F
from demo_model import CALIBRATION, EVAL, demo_fp16
from meta_fixtures import build_checkpoint, corpus
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForCausalLM

from pipeline.convert import convert
from pipeline.core.errors import CheckFailed, InputError, OutputExistsError
from pipeline.core.gptq_format import dequantize
from pipeline.methods import QuantSpec
from pipeline.quantize import quantize
from pipeline.recipe import load_recipe
from verify.forward import LayerwiseModel
from verify.metrics import eval_tokens, windows
from verify.report import Check, Report, check_integrity, read_report
from verify.stage import judge

pytestmark = pytest.mark.slow  # verify runs on quantised variants

SEQLEN, WINDOWS = 64, 4


def verify_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m pipeline verify ARGS` in-process: (exit code, stdout, stderr)."""
    return cli_runner.run_cli(["verify", *args], monkeypatch, capsys)


def checks(report: Report) -> dict[tuple[str, str], bool]:
    return {(c.check, c.artifact): c.passed for c in report.checks}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path | str]:
    """A random 2-shard Llama 2 Meta checkpoint, its conversion, and evaluation text."""
    d = tmp_path_factory.mktemp("meta")
    meta = build_checkpoint(d / "meta", "llama2", n_shards=2)
    convert(meta, d / "fp16")
    (d / "eval").mkdir()
    (d / "eval" / "a.py").write_text(corpus()[:8000])
    (d / "eval" / "b.txt").write_text(corpus()[-4000:])
    return {"meta": meta, "fp16": d / "fp16", "eval": str(d / "eval" / "*")}


def meta_args(c: dict, out: Path) -> dict:
    return dict(meta=c["meta"], fp16=c["fp16"], eval_text=c["eval"], out=out, seqlen=SEQLEN,
                max_windows=WINDOWS, prompts=["def main():"])


def broken_copy(c: dict, tmp_path: Path, edit) -> Path:
    d = tmp_path / "fp16-broken"
    shutil.copytree(c["fp16"], d)
    edit(d)
    return d


def test_good_conversion_passes(converted, tmp_path, monkeypatch, capsys):
    code, out, err = verify_cli(monkeypatch, capsys, "--meta", str(converted["meta"]), "--fp16",
                             str(converted["fp16"]), "--eval", converted["eval"], "--out",
                             str(tmp_path / "v"), "--seqlen", str(SEQLEN), "--max-windows",
                             str(WINDOWS), "--prompt", "def main():", "--json")
    assert code == 0, err
    report = Report.from_dict(json.loads(out), "stdout")
    assert report == read_report(tmp_path / "v")
    assert report.passed and all(checks(report).values())
    parity = next(c for c in report.checks if c.check == "conversion_parity")
    assert parity.metrics["top1_agreement"] == 1.0
    assert parity.metrics["max_rel_err"] < 1e-5
    assert report.eval["windows"] == WINDOWS and report.eval["tokens"] == WINDOWS * SEQLEN
    assert report.eval["files"] == sorted(glob.glob(converted["eval"]))
    files = report.artifacts["fp16"]["files"]
    on_disk = sorted(p.name for p in Path(converted["fp16"]).iterdir())
    assert sorted(files) == on_disk
    for name, digest in files.items():
        assert digest == hashlib.sha256((Path(converted["fp16"]) / name).read_bytes()).hexdigest()
    assert report.tokens_per_second > 0
    assert "tokens/s" in err.splitlines()[-1] and "PASSED" in err.splitlines()[-1]
    table = (tmp_path / "v" / "verify.txt").read_text()
    assert "conversion_parity" in table and "def main():" in table


def test_report_numbers_reproducible(converted, tmp_path):
    a = judge(**meta_args(converted, tmp_path / "a"))
    b = judge(**meta_args(converted, tmp_path / "b"))
    assert dataclasses.replace(a, tokens_per_second=0) == dataclasses.replace(b, tokens_per_second=0)


def test_transformers_reads_the_converted_dir_as_we_do(converted):
    x = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    model = LlamaForCausalLM.from_pretrained(converted["fp16"], dtype=torch.float32)
    with torch.no_grad():
        ref = model(x).logits
    m = LayerwiseModel(converted["fp16"], progress=False)
    (h,) = m.hidden([x])
    torch.testing.assert_close(m.logits(h), ref, rtol=1e-5, atol=1e-5)


def unpermute_k(d: Path) -> None:
    """Undo the rotate-half permutation of k_proj: the Meta (interleaved) layout, copied as is."""
    cfg = json.loads((d / "config.json").read_text())
    n = cfg["num_key_value_heads"]
    t = load_file(d / "model.safetensors")
    for name, w in t.items():
        if name.endswith("k_proj.weight"):
            d1, d2 = w.shape
            t[name] = w.view(n, 2, d1 // n // 2, d2).transpose(1, 2).reshape(d1, d2).contiguous()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def wrong_rope_theta(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_theta"] = 1e6  # the checkpoint is Llama 2: 10000
    (d / "config.json").write_text(json.dumps(cfg))


def cut_vocabulary(d: Path) -> None:
    """The last token dropped consistently (config, embeddings, head): Meta's logits show it."""
    t = load_file(d / "model.safetensors")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        t[name] = t[name][:-1].contiguous()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] -= 1
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit", [unpermute_k, wrong_rope_theta, cut_vocabulary])
def test_broken_conversion_fails_parity(converted, tmp_path, monkeypatch, capsys, edit):
    fp16 = broken_copy(converted, tmp_path, edit)
    code, _, err = verify_cli(monkeypatch, capsys, "--meta", str(converted["meta"]), "--fp16",
                           str(fp16), "--eval", converted["eval"], "--out", str(tmp_path / "v"),
                           "--seqlen", str(SEQLEN), "--max-windows", str(WINDOWS))
    assert code == 3
    assert "conversion_parity:fp16" in err
    report = read_report(tmp_path / "v")
    assert not report.passed
    assert checks(report)[("conversion_parity", "fp16")] is False
    parity = next(c for c in report.checks if c.check == "conversion_parity")
    assert parity.metrics["max_rel_err"] > 1e-2


def test_integrity_detects_changed_missing_and_new_files(converted, tmp_path):
    fp16 = broken_copy(converted, tmp_path, lambda d: None)
    report = judge(**{**meta_args(converted, tmp_path / "v"), "fp16": fp16, "meta": None})
    assert "conversion_parity" not in {c.check for c in report.checks}
    check_integrity(tmp_path / "v", "fp16")
    (fp16 / "generation_config.json").write_text("{}")
    with pytest.raises(CheckFailed, match="generation_config.json: changed"):
        check_integrity(report, "fp16")
    (fp16 / "generation_config.json").unlink()
    (fp16 / "extra.bin").write_bytes(b"x")
    with pytest.raises(CheckFailed, match=r"generation_config.json: missing.*extra.bin: not "
                                          "verified"):
        check_integrity(report, "fp16")
    with pytest.raises(CheckFailed, match="'gptq-4bit' is not in the verify report"):
        check_integrity(report, "gptq-4bit")


def test_bad_inputs(converted, tmp_path, monkeypatch, capsys):
    base = meta_args(converted, tmp_path / "v")
    code, _, err = verify_cli(monkeypatch, capsys, "--fp16", str(converted["fp16"]), "--eval",
                           converted["eval"], "--out", str(tmp_path / "v"), "--tolerance", "4:0.05")
    assert code == 2 and "expected BITS=VALUE" in err
    with pytest.raises(InputError, match="--seqlen 5000: longer than .*4096"):
        judge(**{**base, "seqlen": 5000})
    with pytest.raises(InputError, match=r"missing-dir/config.json: missing"):
        judge(**{**base, "fp16": tmp_path / "missing-dir"})
    with pytest.raises(InputError, match="no evaluation text files found"):
        judge(**{**base, "eval_text": str(tmp_path / "nothing" / "*.py")})
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    with pytest.raises(InputError, match=r"short.txt: \d+ tokens, shorter than one window of 64"):
        judge(**{**base, "eval_text": str(tmp_path / "short.txt")})
    with pytest.raises(InputError, match="Meta checkpoint directory missing"):
        judge(**{**base, "meta": tmp_path / "no-meta"})
    with pytest.raises(InputError, match="not a GPTQ model"):
        judge(**{**base, "quants": [converted["fp16"]]})
    (tmp_path / "v").mkdir()
    with pytest.raises(OutputExistsError):
        judge(**base)


# ------------------------------------------------ GPTQ variants of the shipped demo model vs fp16

SEQ, NWIN = 256, 16  # windows of the demo model's training length
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef "]
REPEATING = "0" * 30  # the demo model continues it with one token repeated
V_PROJ = "model.layers.1.self_attn.v_proj"
# a 2-bit variant is held to the demo recipe's 4-bit bar: far too coarse to meet it
DEMO_4BIT = {kind: table[4] for kind, table in
             load_recipe(Path(EVAL).parents[3] / "demo.toml").verify.thresholds().items()}
TWO_BIT = {kind: {2: value} for kind, value in DEMO_4BIT.items()}
GOOD = ["gptq-4bit-128g", "gptq-4bit-32g", "gptq-8bit-128g", "rtn-4bit-32g"]
BROKEN = ["gptq-2bit--1g", "gptq-4bit-zeros-moved", "gptq-4bit-mute"]
SPECS = {"gptq-4bit-128g": QuantSpec(bits=4, group_size=128, act_order=False, damp=0.1),
         "gptq-4bit-32g": QuantSpec(bits=4, group_size=32, act_order=True, damp=0.1),
         "gptq-8bit-128g": QuantSpec(bits=8, group_size=128, act_order=True, damp=0.1),
         "rtn-4bit-32g": QuantSpec(bits=4, group_size=32, act_order=False, mse=False, method="rtn"),
         "gptq-2bit--1g": QuantSpec(bits=2, group_size=-1, act_order=False, damp=0.1)}


def int32_noise(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Every bit random: each packed value uniform over the grid."""
    return torch.randint(-2**31, 2**31 - 1, t.shape, generator=g, dtype=torch.int32)


# one tensor of one linear replaced by random values of its kind (seeded)
RANDOMISE = {
    "qweight": int32_noise,
    "qzeros": int32_noise,
    "scales": lambda t, g: (torch.rand(t.shape, generator=g) * 2 * t.float().mean()).half(),
    "g_idx": lambda t, g: torch.randint(0, int(t.max()) + 1, t.shape, generator=g,
                                        dtype=torch.int32),
}
# subtle corruptions of one act-order linear: the structure holds (every group keeps its column
# count, the scales stay plausible), so only what the module computes shows it
SUBTLE = {
    "g_idx-permuted": lambda t, g: t[torch.randperm(t.numel(), generator=g)],
    "scales-scaled": lambda t, g: (t.float() * 1.25).half(),
}


def edited_copy(src: Path, dst: Path, key: str, edit) -> Path:
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    t[key] = edit(t[key])
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The shipped demo model in fp16 and variants: good ones (GPTQ 4-bit 128g and 32g act-order,
    8-bit, RTN 4-bit), 2-bit per-channel GPTQ (far too coarse), the 4-bit 128g one with every zero
    point of one linear moved by 2-6 levels, one with a zeroed final norm (repeats one token), and
    one per tensor kind with that tensor of V_PROJ randomised."""
    d = tmp_path_factory.mktemp("demo")
    dirs = {"fp16": demo_fp16(d / "fp16")}
    for name, spec in SPECS.items():
        dirs[name] = d / name
        quantize(dirs["fp16"], dirs[name], spec, calibration=CALIBRATION, nsamples=16, seqlen=SEQ,
                 device="cpu")
    base = dirs["gptq-4bit-128g"]
    dirs["gptq-4bit-zeros-moved"] = edited_copy(base, d / "gptq-4bit-zeros-moved",
                                                "model.layers.0.mlp.down_proj.qzeros",
                                                lambda z: z ^ 0x66666666)
    dirs["gptq-4bit-mute"] = edited_copy(base, d / "gptq-4bit-mute", "model.norm.weight",
                                         torch.zeros_like)
    for kind, fn in RANDOMISE.items():
        g = torch.Generator().manual_seed(0)
        dirs[f"gptq-4bit-{kind}"] = edited_copy(base, d / f"gptq-4bit-{kind}", f"{V_PROJ}.{kind}",
                                                lambda t, fn=fn, g=g: fn(t, g))
    for kind, fn in SUBTLE.items():
        g = torch.Generator().manual_seed(0)
        tensor = kind.split("-")[0]
        dirs[kind] = edited_copy(dirs["gptq-4bit-32g"], d / kind, f"{V_PROJ}.{tensor}",
                                 lambda t, fn=fn, g=g: fn(t, g))
    return dirs


def demo_verify(demo: dict[str, Path], names: list[str], out: Path, **kw) -> Report:
    return judge(**{"fp16": demo["fp16"], "quants": [demo[n] for n in names], "eval_text": EVAL,
                     "out": out, "seqlen": SEQ, "max_windows": NWIN, "prompts": PROMPTS, **kw})


@pytest.fixture(scope="module")
def judged_run(demo, tmp_path_factory) -> tuple[Report, Path]:
    """One verify run over every good and broken variant, with the RTN baseline: the report and
    its directory."""
    out = tmp_path_factory.mktemp("judged") / "v"
    return demo_verify(demo, GOOD + BROKEN, out, thresholds=TWO_BIT, baseline_rtn=True), out


@pytest.fixture(scope="module")
def judged(judged_run) -> Report:
    return judged_run[0]


def entry(report: Report, check: str, artifact: str) -> Check:
    (c,) = [c for c in report.checks if c.check == check and c.artifact == artifact]
    return c


def test_good_variants_pass_every_check_against_fp16(judged):
    ok = checks(judged)
    assert {k: v for k, v in ok.items() if k[1] == "fp16"} == {("perplexity", "fp16"): True,
                                                             ("generation", "fp16"): True}
    for name in GOOD:
        assert {c: ok[(c, name)] for c in ("perplexity", "kl_divergence", "generation",
                                           "module_integrity")} == dict.fromkeys(
            ("perplexity", "kl_divergence", "generation", "module_integrity"), True), name
        kl = entry(judged, "kl_divergence", name).metrics
        assert kl["kl_mean"] > 0 and kl["kl_p99"] >= kl["kl_mean"] and kl["top1"] < 1
        mi = entry(judged, "module_integrity", name)
        assert mi.metrics["modules"] == 4 * 7 == len(mi.per_module)
    # 8-bit steps are 16x finer than 4-bit ones: KL (quadratic in the error) far below
    kl = {n: entry(judged, "kl_divergence", n).metrics["kl_mean"] for n in GOOD}
    assert kl["gptq-8bit-128g"] < kl["gptq-4bit-128g"] / 10
    gen = entry(judged, "generation", "gptq-8bit-128g")
    assert [s["text_fp16"] for s in gen.samples] == [
        s["text"] for s in entry(judged, "generation", "fp16").samples]
    # the in-memory RTN baseline equals the RTN artifact quantised, packed and dequantised
    ppl = judged.perplexity
    assert ppl["gptq-4bit-32g:rtn"] == pytest.approx(ppl["rtn-4bit-32g"], rel=1e-6)
    entry_ = judged.artifacts["gptq-4bit-32g"]
    assert [entry_[k] for k in ("kind", "bits", "group_size", "desc_act")] == ["gptq", 4, 32, True]
    # each variant is judged by the checks of the method that made it (its quant_log.json)
    assert [judged.artifacts[n]["method"] for n in ("gptq-4bit-32g", "rtn-4bit-32g")] == ["gptq", "rtn"]
    assert ok[("against_rtn", "gptq-4bit-32g")] and ("against_rtn", "rtn-4bit-32g") not in ok


def test_broken_variants_fail_by_the_named_check(judged, judged_run):
    ok = checks(judged)
    assert not judged.passed
    assert all(passed for (_, artifact), passed in ok.items() if artifact == "fp16")  # the reference
    # GPTQ keeps this model's perplexity at 2 bits (measured -0.5%); KL and top-1 show the loss
    # (measured mean 0.013, p99 0.11, top-1 0.88: 2.6x, 2.2x and 7 points past the bar)
    kl = entry(judged, "kl_divergence", "gptq-2bit--1g")
    assert not kl.passed and kl.thresholds == {k: DEMO_4BIT[k] for k in kl.thresholds}
    m, t = kl.metrics, kl.thresholds
    assert m["kl_mean"] > t["kl_mean"] and m["kl_p99"] > t["kl_p99"] and m["top1"] < t["top1"]
    moved = entry(judged, "module_integrity", "gptq-4bit-zeros-moved")
    assert not moved.passed and "model.layers.0.mlp.down_proj" in moved.reason
    assert moved.metrics["worst_module"] == "model.layers.0.mlp.down_proj"
    mute = entry(judged, "generation", "gptq-4bit-mute")
    assert not mute.passed and "where fp16's is not degenerate" in mute.reason
    assert all(s["degenerate"] and not s["degenerate_fp16"] for s in mute.samples)
    table = (judged_run[1] / "verify.txt").read_text()
    for text in ("gptq-4bit-zeros-moved", "degenerate: one token repeated", "KL mean",
                 "model.layers.0.mlp.down_proj", "agree "):
        assert text in table


def test_kl_and_top1_equal_transformers_logits(judged, demo):
    """Independent computation: transformers' logits for fp16 and for the variant's weights
    (dequantised into the same model), torch's kl_div over full log-softmaxes."""
    name = "gptq-4bit-32g"
    tok = AutoTokenizer.from_pretrained(demo["fp16"])
    texts = [Path(p).read_text() for p in sorted(glob.glob(EVAL))]
    win = windows(eval_tokens(tok, texts), SEQ, NWIN)
    fp16 = LlamaForCausalLM.from_pretrained(demo["fp16"], dtype=torch.float32)
    quant = LlamaForCausalLM.from_pretrained(demo["fp16"], dtype=torch.float32)
    tensors = load_file(demo[name] / "model.safetensors")
    with torch.no_grad():
        for module, linear in quant.named_modules():
            if f"{module}.qweight" in tensors:
                parts = [tensors[f"{module}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx")]
                linear.weight.copy_(dequantize(*parts, 4))
        p = F.log_softmax(fp16(win).logits[:, :-1].double(), -1)
        q = F.log_softmax(quant(win).logits[:, :-1].double(), -1)
    kl = F.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    got = entry(judged, "kl_divergence", name).metrics
    # float32 forwards that differ by summation order only (logits ~1e-6 apart)
    assert got["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-3)
    assert got["kl_p99"] == pytest.approx(float(torch.quantile(kl.flatten(), 0.99)), rel=1e-3)
    top1 = float((p.argmax(-1) == q.argmax(-1)).double().mean())
    assert got["top1"] == pytest.approx(top1, abs=3 / kl.numel())  # a near-tie may flip


def test_one_randomised_tensor_of_one_module_fails_module_integrity(demo, tmp_path, monkeypatch,
                                                                    capsys):
    names = [f"gptq-4bit-{kind}" for kind in RANDOMISE]
    args = ["--fp16", str(demo["fp16"]), "--eval", EVAL, "--out", str(tmp_path / "v"),
            "--seqlen", str(SEQ), "--max-windows", str(NWIN), "--prompt", PROMPTS[0]]
    code, _, err = verify_cli(monkeypatch, capsys, *args,
                           *(a for n in names for a in ("--quant", str(demo[n]))))
    assert code == 3
    report = read_report(tmp_path / "v")
    for name in names:
        assert f"module_integrity:{name}" in err
        c = entry(report, "module_integrity", name)
        assert not c.passed and V_PROJ in c.reason
        # no other module is named: the failure points at the corrupted one
        assert c.reason.count("model.layers.") == 1
        others = {k: v for k, v in c.per_module.items() if k != V_PROJ}
        assert len(others) == 27 and all(v["error"] <= 3 * v["rtn_error"] for v in others.values())


@pytest.mark.parametrize("kind", SUBTLE)
def test_a_subtle_corruption_of_one_module_fails_by_its_output_error(demo, tmp_path, kind):
    """A permuted g_idx in an act-order module (every group keeps its size, so g_idx's structure
    passes) or its scales times 1.25: the module's output error on evaluation activations rises
    far above RTN's on the same grid (GPTQ's own modules sit at 0.2-0.7x), and only that module
    is named; the 27 others stay below RTN's."""
    report = demo_verify(demo, [kind], tmp_path / "v")
    c = entry(report, "module_integrity", kind)
    assert not c.passed and c.reason.count("model.layers.") == 1
    assert c.reason.startswith(f"{V_PROJ}: ") and "output error" in c.reason
    assert c.metrics["worst_output_module"] == V_PROJ and c.metrics["output_ratio"] > 3
    others = {k: v for k, v in c.per_module.items() if k != V_PROJ}
    assert len(others) == 27
    assert all(v["output_error"] < v["rtn_output_error"] for v in others.values())  # GPTQ: below RTN


def test_fp16_repeating_itself_does_not_fail_verify(demo, tmp_path):
    report = demo_verify(demo, ["gptq-8bit-128g", "gptq-4bit-128g"], tmp_path / "v",
                         prompts=[REPEATING])
    (fp16,) = entry(report, "generation", "fp16").samples
    assert fp16["degenerate"]  # the prompt does make fp16 repeat itself
    assert report.passed, report.failed()
    eight = entry(report, "generation", "gptq-8bit-128g").samples[0]
    assert eight["degenerate"] and eight["agreement"] == 1.0  # equally degenerate: passes


def test_two_bits_are_judged_against_rtn_with_no_absolute_bound(demo, tmp_path):
    report = demo_verify(demo, ["gptq-2bit--1g"], tmp_path / "v")
    rel = entry(report, "against_rtn", "gptq-2bit--1g")
    assert rel.passed and rel.thresholds == {"rtn_margin": 0.1}
    assert rel.metrics["ppl"] <= rel.metrics["ppl_rtn"] * 1.1  # recomputed from the numbers
    assert entry(report, "perplexity", "gptq-2bit--1g").thresholds == {}
    assert entry(report, "kl_divergence", "gptq-2bit--1g").thresholds == {}


def test_variant_with_another_tokenizer_is_refused(demo, converted, tmp_path):
    q = tmp_path / "gptq-other-tokenizer"
    shutil.copytree(demo["gptq-4bit-32g"], q)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(Path(converted["fp16"]) / f, q / f)
    with pytest.raises(InputError, match=r"gptq-other-tokenizer: tokenizer differs .*vocabulary"):
        demo_verify(demo, [], tmp_path / "v", quants=[q], max_windows=2)
    (q / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"gptq-other-tokenizer: no model.safetensors"):
        demo_verify(demo, [], tmp_path / "v", quants=[q], max_windows=2)





def test_act_order_g_idx_must_follow_falling_input_energy():
    """GPTQ's act-order fills groups in order of falling Σx²: that order passes, the same group
    sizes shuffled fail, static groups (i // group_size) pass, and too few inputs are not judged."""
    from verify.integrity import ACT_ORDER_MIN_IN, g_idx_problem

    g = torch.Generator().manual_seed(0)
    n, group = 512, 64
    energy = torch.rand(n, generator=g) ** 4  # a few strong channels, as in trained models
    order = torch.argsort(energy, descending=True)
    g_idx = torch.empty(n, dtype=torch.int32)
    g_idx[order] = (torch.arange(n) // group).int()
    noisy = energy * (1 + 0.5 * torch.rand(n, generator=g))  # other text: the order roughly kept
    assert g_idx_problem(g_idx, group, True, noisy) is None
    shuffled = g_idx[torch.randperm(n, generator=g)]
    assert "does not follow act-order" in g_idx_problem(shuffled, group, True, noisy)
    assert g_idx_problem((torch.arange(n) // group).int(), group, True, noisy) is None  # static
    small = ACT_ORDER_MIN_IN // 2
    few = (torch.arange(small) // 32)[torch.randperm(small, generator=g)].int()
    assert g_idx_problem(few, 32, True, noisy[:small]) is None
