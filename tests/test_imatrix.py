"""The imatrix stage (pipeline/imatrix.py) against transformers' own forward of the demo model:
Σx² per input channel of every decoder linear, on the same calibration windows, in llama.cpp's
GGUF imatrix layout."""

from __future__ import annotations

import glob
import json
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from demo_model import CALIBRATION, demo_fp16
from transformers import AutoModelForCausalLM, AutoTokenizer

from numpy_gptq import np_dequantize
from safetensors.numpy import load_file

from pipeline.core.calibration import load_calibration
from pipeline.core.imatrix_format import ACTIVATIONS
from pipeline.core.llama import LINEARS
from pipeline.imatrix import imatrix
from pipeline.methods import QuantSpec
from pipeline.quantize import quantize

pytestmark = pytest.mark.slow
NSAMPLES, SEQLEN, BITS = 8, 128, 3


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    fp16 = demo_fp16(d / "fp16")
    out = d / "demo.imatrix.gguf"
    summary = imatrix(fp16, out, calibration=CALIBRATION, nsamples=NSAMPLES, seqlen=SEQLEN,
                      device="cpu")
    return fp16, out, summary


def transformers_sums(fp16, quantized: Path | None = None) -> dict[str, np.ndarray]:
    """Σx² of each linear's input, hooked in transformers' LlamaForCausalLM (float32); with
    `quantized`, a GPTQ directory, its linears dequantised by the tests' numpy reader."""
    model = AutoModelForCausalLM.from_pretrained(fp16, dtype=torch.float32).eval()
    if quantized is not None:
        t = load_file(quantized / "model.safetensors")
        for name, module in model.named_modules():
            if name + ".qweight" in t:
                module.weight.data = torch.from_numpy(np_dequantize(t, name, BITS))
    tokens, _ = load_calibration(CALIBRATION, AutoTokenizer.from_pretrained(fp16), NSAMPLES,
                                 SEQLEN, 0)
    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return pre

    for i, layer in enumerate(model.model.layers):
        for n in LINEARS:
            layer.get_submodule(n).register_forward_pre_hook(hook(f"{i}.{n}"))
    with torch.no_grad():
        model(input_ids=tokens)
    return sums


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def test_imatrix_is_the_models_sum_of_squared_inputs_in_llama_cpps_layout(made):
    fp16, out, summary = made
    assert_matrix(out, transformers_sums(fp16), "the fp16 model")
    assert summary["tensors"] == 4 * 7


def test_the_gptq_pass_writes_the_matrix_of_the_model_it_quantises(made, tmp_path):
    """quantize --imatrix: Σx² of every linear's inputs as GPTQ saw them (true-sequential: the
    layers and linear groups before it already quantised), which are the inputs of the quantised
    model's own forward: transformers' LlamaForCausalLM with the saved linears dequantised."""
    fp16 = made[0]
    out, matrix = tmp_path / "gptq", tmp_path / "pass.imatrix.gguf"
    summary = quantize(fp16, out, QuantSpec(BITS, 64, True), calibration=CALIBRATION,
                       nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", imatrix=matrix)
    assert summary["imatrix"] == str(matrix)
    want = transformers_sums(fp16, out)
    assert_matrix(matrix, want, "the model in this pipeline's GPTQ pass (3-bit, group 64, "
                  "act-order), each layer fed by the layers before it already quantised")
    fp16_sums = transformers_sums(fp16)  # not the fp16 model's, past the first group
    k = "3.mlp.down_proj"
    assert not np.allclose(want[k], fp16_sums[k], rtol=1e-2), k
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def assert_matrix(path: Path, want: dict[str, np.ndarray], activations: str) -> None:
    """The file at `path` is llama.cpp's imatrix of the sums `want` (transformers_sums)."""
    r = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in r.fields.values()}
    assert fields["general.type"] == "imatrix"
    assert fields["imatrix.chunk_count"] == NSAMPLES and fields["imatrix.chunk_size"] == SEQLEN
    assert fields["imatrix.datasets"] == ["calib/*.py.txt"]  # no folder of this machine
    assert fields[ACTIVATIONS] == activations
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * len(want) == 2 * 4 * 7
    for key, s in want.items():
        i, n = key.split(".", 1)
        name = f"blk.{i}.{GGUF_NAMES[n]}.weight"
        sums, counts = tensors[f"{name}.in_sum2"], tensors[f"{name}.counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(sums.shape) == [s.size, 1] and list(counts.shape) == [1, 1]  # ggml's order
        assert float(counts.data.ravel()[0]) == NSAMPLES * SEQLEN
        np.testing.assert_allclose(np.asarray(sums.data).ravel(), s, rtol=2e-4)


def legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    """llama.cpp's legacy .dat imatrix (int32 entry count; per entry int32 name length, name,
    int32 ncall, int32 n, n float32 of mean(x²) × ncall): name → mean(x²)."""
    b, o = path.read_bytes(), 4
    out: dict[str, np.ndarray] = {}
    for _ in range(struct.unpack_from("<i", b)[0]):
        (n,) = struct.unpack_from("<i", b, o)
        name = b[o + 4:o + 4 + n].decode()
        ncall, size = struct.unpack_from("<ii", b, o + 4 + n)
        o += 12 + n
        out[name] = np.frombuffer(b, "<f4", size, o) / ncall
        o += 4 * size
    return out


@pytest.mark.parametrize("made_by", ["imatrix stage", "GPTQ pass"])
def test_llama_cpps_own_tools_read_it(made, made_by, tmp_path):
    """llama.cpp's llama-imatrix reads the file back and writes it in its legacy format (its
    mean x² per channel equals ours: in_sum2 / counts), and its quantiser takes it (every entry,
    the chunks), whichever pass made it. Its --show-statistics table is not used: that tool's
    logger may drop lines at exit (its singleton is never flushed), so parsing it would fail at
    random."""
    from pipeline.core.llamacpp_tools import run_tool
    from pipeline.gguf import write_gguf

    fp16, out, _ = made
    if made_by == "GPTQ pass":
        out = tmp_path / "pass.imatrix.gguf"
        quantize(fp16, tmp_path / "gptq", QuantSpec(4, 128, False), calibration=CALIBRATION,
                 nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", imatrix=out)
    f16 = write_gguf(fp16, tmp_path / "m.F16.gguf")["output"]
    lines: list[str] = []
    dat = tmp_path / "legacy.dat"
    run_tool("llama-imatrix", ["-m", f16, "--in-file", out, "-o", dat, "--output-format", "dat"],
             lines.append, "test")
    theirs = legacy_imatrix(dat)
    assert len(theirs) == 4 * 7
    r = gguf.GGUFReader(out)
    t = {x.name: np.asarray(x.data).ravel() for x in r.tensors}
    for name, mean in theirs.items():
        ours = t[f"{name}.in_sum2"] / t[f"{name}.counts"][0]
        np.testing.assert_allclose(mean, ours, rtol=1e-6, err_msg=name)
    lines.clear()
    run_tool("llama-quantize", ["--imatrix", out, f16, tmp_path / "m.IQ4_XS.gguf", "IQ4_XS", "2"],
             lines.append, "test")
    log = "".join(lines)
    assert f"loaded {4 * 7} importance matrix entries from {out} computed on {NSAMPLES} chunks" in log
    # what llama-quantize records of it in a file gguf --imatrix makes: its name, no folder
    write_gguf(fp16, tmp_path / "m.Q4_K_M.gguf", type_name="Q4_K_M", f16=f16, imatrix=out)
    q = gguf.GGUFReader(tmp_path / "m.Q4_K_M.gguf")
    assert q.get_field("quantize.imatrix.file").contents() == out.name
    assert q.get_field("quantize.imatrix.dataset").contents() == "calib/*.py.txt"


def test_the_imatrix_lowers_kl_on_a_real_model_and_verify_gates_a_wrong_one(tmp_path):
    """SmolLM2-135M (real pretrained weights), judged by verify inside llama.cpp on held-out
    text at the types' default thresholds: each type made with our importance matrix against the
    same type verify makes without it from the F16 file (the against_no_imatrix gate). Measured here (8 windows, 32 x 256
    calibration tokens), with / without: Q4_K_M 0.57, Q3_K_M 0.70, Q2_K 0.70, IQ4_XS 0.49 (against
    a uniform matrix); the bounds ask for a third of that gain at 3 and 2 bits, and none at 4.
    A matrix whose channels are shuffled within each tensor (the right statistics on the wrong
    channels) gives Q2_K 1.39: the gate fails it."""
    from real_model import smollm2_fp16

    from pipeline.core.imatrix_format import write_imatrix
    from pipeline.gguf import write_gguf
    from verify.stage import judge

    root = Path(__file__).resolve().parent.parent / "recipes" / "smollm2" / "text"
    fp16 = smollm2_fp16(tmp_path / "fp16")
    im = tmp_path / "m.imatrix.gguf"
    imatrix(fp16, im, calibration=str(root / "calib"), nsamples=32, seqlen=256, device="cpu")
    rng = np.random.default_rng(0)
    shuffled = {x.name.removesuffix(".in_sum2"): rng.permutation(np.asarray(x.data).ravel())
                for x in gguf.GGUFReader(im).tensors if x.name.endswith(".in_sum2")}
    wrong = tmp_path / "wrong.imatrix.gguf"
    write_imatrix(wrong, shuffled, 32 * 256, 32, 256, "calib/*.txt")
    f16 = tmp_path / "m.F16.gguf"
    write_gguf(fp16, f16)
    types = ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS")
    files = [f16, *(Path(write_gguf(fp16, tmp_path / f"m.{t}.gguf", type_name=t, f16=f16,
                                    imatrix=im)["output"]) for t in types),
             Path(write_gguf(fp16, tmp_path / "wrong.Q2_K.gguf", type_name="Q2_K", f16=f16,
                             imatrix=wrong)["output"])]
    # every file at its type's default thresholds (real weights must pass them), but Q2_K's
    # absolute bounds, which the wrong matrix's file also breaks (top-1 0.58 < 0.59)
    loose = {"tolerance": 100.0, "kl_mean": 100.0, "kl_p99": 1000.0, "top1": 0.0}
    report = judge(fp16=fp16, eval_text=str(root / "eval"), out=tmp_path / "v", seqlen=256,
                   max_windows=8, device="cpu", ggufs=files, imatrix=im,
                   gguf_thresholds={"Q2_K": loose})
    gate = {c.artifact: c for c in report.checks if c.check == "against_no_imatrix"}
    ratio = {t: gate[f"m.{t}.gguf"].metrics["kl_ratio"] for t in types}
    assert ratio["Q4_K_M"] <= 1.0 and ratio["Q3_K_M"] < 0.9 and ratio["Q2_K"] < 0.9, ratio
    assert ratio["IQ4_XS"] < 0.9, ratio
    assert all(gate[f"m.{t}.gguf"].passed for t in types)
    bad = gate["wrong.Q2_K.gguf"]
    assert not bad.passed and bad.metrics["kl_ratio"] > 1.2, bad
    # and it does not record the matrix verify was given: its metadata check names it
    meta = next(c for c in report.checks if c.check == "gguf_metadata"
                and c.artifact == "wrong.Q2_K.gguf")
    assert not meta.passed and "made with file 'wrong.imatrix.gguf'" in meta.reason
    assert not report.passed and report.failed() == ["gguf_metadata:wrong.Q2_K.gguf",
                                                     "against_no_imatrix:wrong.Q2_K.gguf"]


def test_the_job_makes_verifies_and_publishes_the_matrix(tmp_path):
    """A recipe with one quantised [[gguf]] type and no F16: the job takes the importance matrix
    from its GPTQ pass (main reads [calibration] as it is: no imatrix stage) and makes an F16
    file (verified, the baseline's source, not published); verify gates the file against its
    type made without the matrix; the GGUF repository's plan carries the matrix, its card the
    note and the baseline row; a matrix changed after verify is not published, and the next run
    makes it again (the GPTQ task's outputs include it)."""
    import demo_model
    from test_gguf import RECIPE

    from pipeline.core.errors import CheckFailed
    from pipeline.job import run_job
    from pipeline.publish import publish
    from pipeline.recipe import load_recipe
    from pipeline.workdir import WorkDir
    from verify.report import read_report

    text = RECIPE.replace('[[gguf]]\ntype = "F16"\n\n[[gguf]]\ntype = "Q8_0"\n\n', "")
    text = re.sub(r"imatrix = false.*\n", "", text)
    (tmp_path / "r.toml").write_text(text)
    recipe = load_recipe(tmp_path / "r.toml", allow_dirs=[demo_model.DEMO])
    assert [g.type for g in recipe.gguf] == ["Q4_K_M"] and recipe.gguf[0].imatrix
    w = tmp_path / "work"
    result = run_job(recipe, workdir=w, dry_run=True, device="cpu")
    stages = {r["stage"] for r in result["stages"]}
    assert {"quantize/main", "gguf/F16", "gguf/Q4_K_M"} <= stages and "imatrix" not in stages
    report = read_report(w / "verify")
    q4, f16, im = (f"tinycodellama-demo.{t}.gguf" for t in ("Q4_K_M", "F16", "imatrix"))
    records = json.loads((w / "job.json").read_text())["stages"]
    assert records["quantize/main"]["written"] == ["gptq/main", f"gguf/{im}"]
    pass_of = ("the model in this pipeline's GPTQ pass (4-bit, group 128), each layer fed by the "
               "layers before it already quantised")
    assert gguf.GGUFReader(w / "gguf" / im).get_field(ACTIVATIONS).contents() == pass_of
    made = (w / "gguf" / im).read_bytes()
    gate = next(c for c in report.checks if c.check == "against_no_imatrix")
    assert gate.artifact == q4 and gate.passed and gate.thresholds == {"imatrix_margin": 0.02}
    assert report.artifacts[im]["kind"] == "imatrix" and report.artifacts[f16]["type"] == "F16"
    assert report.artifacts[q4]["imatrix"]["file"] == im
    plan = json.loads((w / "publish-plan" / "plan.json").read_text())
    files = plan["repos"]["demo-org/Tiny-GGUF"]["branches"]["main"]["files"]
    assert sorted(f["path"] for f in files) == sorted([im, q4, "README.md"])  # no F16
    card = (w / "publish-plan" / "cards" / "demo-org--Tiny-GGUF" / "main" / "README.md").read_text()
    assert f"quantised with an importance matrix, [`{im}`]" in card
    assert f"the mean squared activation of {pass_of}\non `" in card
    assert "| `Q4_K_M` without the importance matrix |" in card and "| Q4_K_M, imatrix |" in card
    artifacts = WorkDir.of(recipe, w).artifacts(recipe, ("main",))
    # a report edited to say the file was made without a matrix (and so owes no gate): publish
    # reads the file's own record
    saved = (w / "verify" / "verify.json").read_text()
    edited = json.loads(saved)
    del edited["artifacts"][q4]["imatrix"]
    edited["checks"] = [c for c in edited["checks"] if c["check"] != "against_no_imatrix"]
    (w / "verify" / "verify.json").write_text(json.dumps(edited))
    with pytest.raises(CheckFailed, match=rf"{re.escape(q4)}: records the importance matrix"):
        publish(recipe, **artifacts, dry_run=True)
    (w / "verify" / "verify.json").write_text(saved)
    with (w / "gguf" / im).open("r+b") as f:  # one byte of the matrix, after verify
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(CheckFailed, match=rf"artifact '{re.escape(im)}' no longer matches"):
        publish(recipe, **artifacts, dry_run=True)
    rows = run_job(recipe, workdir=w, stage="gguf", device="cpu")["stages"]
    assert {r["stage"]: r["reason"] for r in rows if r["status"] == "ran"} == {
        "quantize/main": "output missing or modified", "gguf/Q4_K_M": "changed: upstream "
        "quantize/main"}
    assert (w / "gguf" / im).read_bytes() == made


def recipe_pass(recipe: Path, fp16: Path, out: Path, nsamples: int | None = None) -> Path:
    """The importance matrix the job would use for `recipe`: its main variant's GPTQ pass on
    its [calibration] (`nsamples` windows of them, when given), at `out`."""
    from pipeline.recipe import load_recipe

    main = load_recipe(recipe).variants[0]
    quantize(fp16, out.with_suffix(".gptq"), main, calibration=main.calibration,
             nsamples=nsamples or main.nsamples, seqlen=main.seqlen, device="cpu", imatrix=out)
    return out


def test_the_gptq_pass_matrix_lowers_kl_on_a_real_model(tmp_path):
    """SmolLM2-135M with the matrix the job publishes for its recipe: the one its 4-bit GPTQ
    pass writes, judged by verify's gate as above. Measured here (8 windows, 32 x 256
    calibration tokens), with / without: Q3_K_M 0.69, Q2_K 0.68; the bounds ask for a third of
    that gain."""
    from real_model import RECIPE, smollm2_fp16

    from pipeline.gguf import write_gguf
    from verify.stage import judge

    fp16 = smollm2_fp16(tmp_path / "fp16")
    im = recipe_pass(RECIPE, fp16, tmp_path / "pass.imatrix.gguf", nsamples=32)
    f16 = Path(write_gguf(fp16, tmp_path / "m.F16.gguf")["output"])
    types = ("Q3_K_M", "Q2_K")
    files = [f16, *(Path(write_gguf(fp16, tmp_path / f"m.{t}.gguf", type_name=t, f16=f16,
                                    imatrix=im)["output"]) for t in types)]
    report = judge(fp16=fp16, eval_text=str(RECIPE.parent / "smollm2" / "text" / "eval"),
                   out=tmp_path / "v", seqlen=256, max_windows=8, device="cpu", ggufs=files,
                   imatrix=im)
    gate = report.metrics("against_no_imatrix")
    ratio = {t: gate[f"m.{t}.gguf"]["kl_ratio"] for t in types}
    assert report.passed and ratio["Q3_K_M"] < 0.9 and ratio["Q2_K"] < 0.9, ratio


def test_on_the_demo_the_matrix_lowers_kl_on_the_weights_it_covers(tmp_path):
    """The demo model with the matrix its job uses (main's GPTQ pass on 128 x 256 calibration
    tokens), KL against its F16 file inside llama.cpp, as llama.cpp's own --kl-divergence
    scores it, on 64 held-out windows. Its token embedding (32000 x 256: 70% of its weights) is
    no matmul's input, so no imatrix covers it (llama.cpp's tool neither), and at 3 and 2 bits
    its rounding is most of the KL (Q2_K 0.0316; 0.0124 with the embedding at Q8_0). So
    llama.cpp's own mixtures gain little, with / without Q3_K_M 0.989, Q2_K 0.995 (bound:
    verify's margin, 1.02); with the embedding held at Q8_0 on both sides, where the matrix
    guides the rounding of what remains, Q3_K_M 0.978, Q2_K 0.968 (bound 0.99)."""
    from demo_model import DEMO, EVAL

    from pipeline.core.gguf_types import IMATRIX_MARGIN
    from pipeline.core.llamacpp_tools import run_tool
    from pipeline.gguf import write_gguf
    from verify.llamacpp import GGUFModel
    from verify.metrics import kl_top1

    fp16 = demo_fp16(tmp_path / "fp16")
    im = recipe_pass(DEMO.parent / "demo.toml", fp16, tmp_path / "pass.imatrix.gguf")
    f16 = Path(write_gguf(fp16, tmp_path / "m.F16.gguf")["output"])
    ref = GGUFModel(f16, 256)
    ids = ref.tokenize("".join(Path(p).read_text() for p in sorted(glob.glob(EVAL))))
    windows = torch.tensor(ids[:64 * 256]).view(64, 256).tolist()
    want = [ref.logits(w)[:-1] for w in windows]
    ref.close()

    def kl(type_name: str, *options: str | Path) -> float:
        """Mean KL of llama-quantize's file of the type, made with `options`."""
        out = tmp_path / "q.gguf"
        run_tool("llama-quantize", [*options, f16, out, type_name, "2"], lambda line: None, "test")
        m = GGUFModel(out, 256)
        k = torch.stack([kl_top1(r, m.logits(w)[:-1])[0] for r, w in zip(want, windows)])
        m.close()
        return float(k.mean())

    ratio = {}
    for t in ("Q3_K_M", "Q2_K"):
        for name, extra in (("mixture", []), ("embedding Q8_0", ["--token-embedding-type", "q8_0"])):
            ratio[t, name] = kl(t, "--imatrix", im, *extra) / kl(t, *extra)
    assert all(ratio[t, "mixture"] <= 1 + IMATRIX_MARGIN for t in ("Q3_K_M", "Q2_K")), ratio
    assert all(ratio[t, "embedding Q8_0"] < 0.99 for t in ("Q3_K_M", "Q2_K")), ratio
