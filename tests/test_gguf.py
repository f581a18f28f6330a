"""GGUF files: built from the shipped demo model and from tiny checkpoints of each family, loaded in
llama.cpp (llama-cpp-python, built from source by `make install`), compared with our fp16 model
and Meta's reference forward; metadata read back with gguf's GGUFReader against the Meta source;
verify's gates; the job, its dry-run plan and the GGUF repository on a local Hub."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import demo_model
import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, TokenType
from hub_server import HubServer
from huggingface_hub import constants, snapshot_download
from meta_fixtures import CODELLAMA_INFILL, SPECS, build_checkpoint, corpus

from pipeline.convert import convert
from pipeline.core import chat
from pipeline.core.gguf_types import TYPES
from pipeline.core.meta import permute_rotary
from pipeline.core.tokenizer import PROBES, load_source
from pipeline.gguf import write_gguf
from pipeline.job import run_job
from pipeline.publish import publish
from pipeline.recipe import load_recipe
from verify import thresholds as th
from verify.report import Check, Report, read_report
from verify.forward import LayerwiseModel
from verify.llamacpp import GGUFModel
from verify.meta_reference import apply_scaling, meta_logits
from verify.metrics import eval_tokens, logits_parity, windows
from verify.stage import eval_documents, judge, load_tokenizer

pytestmark = pytest.mark.slow  # llama.cpp converts, quantises and runs models

TOKEN = "hf_TESTwriteTOKENneverLEAK0123456789"
SEQLEN = 256
RECIPE = f"""
[model]
name = "TinyCodeLlama-demo"
creator = "llama-gptq-pipeline"
license = "other"
chat_format = "llama2"

[source]
path = "{demo_model.META}"

[calibration]
source = "{demo_model.DEMO / 'text' / 'calib'}"
nsamples = 8  # the GGUF side is under test here: a quick GPTQ variant
seqlen = {SEQLEN}

[[variants]]
branch = "main"
bits = 4
group_size = 128
damp = 0.1

[verify]
eval = "{demo_model.DEMO / 'text' / 'eval'}"
seqlen = {SEQLEN}
max_windows = 16

[[gguf]]
type = "F16"

[[gguf]]
type = "Q8_0"

[[gguf]]
type = "Q4_K_M"
description = "medium, balanced quality"
imatrix = false  # the tolerance gate below is measured on the file made without one

[publish]
fp16_repo = "demo-org/Tiny-fp16"
gptq_repo = "demo-org/Tiny-GPTQ"
gguf_repo = "demo-org/Tiny-GGUF"
"""


def field(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The whole job on the demo model (one RTN variant, F16/Q8_0/Q4_K_M GGUF files), dry run."""
    root = tmp_path_factory.mktemp("gguf-job")
    (root / "demo.toml").write_text(RECIPE)
    recipe = load_recipe(root / "demo.toml", allow_dirs=[demo_model.DEMO])
    result = run_job(recipe, workdir=root / "work", dry_run=True, device="cpu")
    report = read_report(root / "work" / "verify")
    return {"root": root, "recipe": recipe, "work": root / "work", "result": result,
            "report": report, "gguf": {g.type: root / "work" / "gguf" /
                                       f"tinycodellama-demo.{g.type}.gguf" for g in recipe.gguf}}


def eval_windows(fp16: Path, n: int) -> torch.Tensor:
    _, texts = eval_documents(demo_model.EVAL)
    return windows(eval_tokens(load_tokenizer(fp16), texts), SEQLEN, n)


def llama_cpp_logits(path: Path, win: torch.Tensor) -> torch.Tensor:
    model = GGUFModel(path, n_ctx=win.shape[1])
    try:
        return torch.stack([model.logits(w.tolist()) for w in win])
    finally:
        model.close()


def check(report: Report, name: str, artifact: str) -> Check:
    (c,) = [c for c in report.checks if c.check == name and c.artifact == artifact]
    return c


# ---------------------------------------------------------------- conversion parity


def test_f16_logits_equal_ours_and_metas_within_fp16_round_off(job):
    """The F16 file holds our fp16 weights exactly (q/k back in Meta's interleaved layout); in
    llama.cpp, whose F16 kernels round activations to fp16, its logits equal our float32 forward's
    and Meta's reference forward's to fp16 round-off: measured max relative error 5e-3 over these
    8 windows (2.2e-2 over 64), bound 0.1 (GGUF_PARITY); a wrong θ or q/k layout gives 0.8-1.0."""
    fp16 = job["work"] / "fp16"
    win = eval_windows(fp16, 8)
    ours = llama_cpp_logits(job["gguf"]["F16"], win)
    base = LayerwiseModel(fp16, progress=False)
    (h,) = base.hidden([win], progress=False)
    for ref in (base.logits(h), meta_logits(demo_model.META, win)):
        p = logits_parity(ours, ref)
        assert p["max_rel_err"] <= th.GGUF_PARITY["max_rel_err"], p
        assert p["top1_agreement"] >= th.GGUF_PARITY["top1_agreement"], p
    c = check(job["report"], "gguf_parity", job["gguf"]["F16"].name)
    assert c.passed and c.thresholds == th.GGUF_PARITY


@pytest.mark.parametrize("family", ["codellama-7b", "codellama-34b", "llama3.1", "codellama-70b",
                                    "llama3.2", "llama3.2-output", "llama3.3"])
def test_families_match_metas_forward_in_llama_cpp(family, tmp_path):
    """Code Llama 7B (θ 1e6, 32016 pieces with infilling), 34B (grouped kv heads), Llama 3.1
    (byte-level BPE, scaled RoPE through rope_freqs), and CodeLlama 70B, Llama 3.2 (tied
    embeddings: no output tensor, llama.cpp reuses token_embd; factor 32) and 3.3 layouts, on
    random weights: llama.cpp's logits on the F16 file against Meta's reference forward on the
    original shards, within GGUF_PARITY (measured max relative error ~2e-3 for each, bound 0.1)."""
    meta = build_checkpoint(tmp_path / "meta", family, 2)
    convert(meta, tmp_path / "fp16")
    write_gguf(tmp_path / "fp16", tmp_path / "m.gguf")
    tied = SPECS[family].output != "own"
    names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert ("output.weight" in names) is not tied and "token_embd.weight" in names
    tokens = torch.randint(3, SPECS[family].vocab if SPECS[family].tokenizer == "tiktoken"
                           else 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    p = logits_parity(llama_cpp_logits(tmp_path / "m.gguf", tokens), meta_logits(meta, tokens))
    assert p["max_rel_err"] <= th.GGUF_PARITY["max_rel_err"], p
    assert p["top1_agreement"] >= th.GGUF_PARITY["top1_agreement"], p
    if tied:  # llama.cpp's quantiser keeps the one matrix, and the file loads and runs
        write_gguf(tmp_path / "fp16", tmp_path / "q8.gguf", type_name="Q8_0")
        q8 = llama_cpp_logits(tmp_path / "q8.gguf", tokens)
        assert "output.weight" not in {t.name for t in GGUFReader(tmp_path / "q8.gguf").tensors}
        assert logits_parity(q8, llama_cpp_logits(tmp_path / "m.gguf", tokens))["top1_agreement"] > 0.9


# ---------------------------------------------------------------- metadata, read back


def test_codellama_metadata_read_back_equals_the_source(tmp_path):
    """GGUFReader's reading of the file against params.json and sentencepiece's reading of
    tokenizer.model: θ 1e6 (the seed's bug must not return), heads, kv heads, eps, FFN, vocab,
    every piece with its score, special ids, infilling pieces as CONTROL with llama.cpp's FIM
    keys, and the chat template of the chat format."""
    meta = build_checkpoint(tmp_path / "meta", "codellama-7b", 1)
    convert(meta, tmp_path / "fp16", chat_format="llama2")
    write_gguf(tmp_path / "fp16", tmp_path / "m.gguf")
    params = json.loads((meta / "params.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(meta / "tokenizer.model"))
    r = GGUFReader(tmp_path / "m.gguf")
    assert field(r, "general.architecture") == "llama"
    assert field(r, "llama.rope.freq_base") == params["rope_theta"] == 1e6
    assert field(r, "llama.attention.head_count") == params["n_heads"]
    assert field(r, "llama.attention.head_count_kv") == params["n_heads"]  # no n_kv_heads: MHA
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(params["norm_eps"])
    assert field(r, "llama.embedding_length") == params["dim"]
    assert field(r, "llama.block_count") == params["n_layers"]
    assert field(r, "llama.feed_forward_length") == SPECS["codellama-7b"].ffn
    assert field(r, "llama.context_length") == 16384
    assert field(r, "llama.vocab_size") == params["vocab_size"] == sp.get_piece_size()
    assert field(r, "tokenizer.ggml.model") == "llama"
    assert field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.allclose(field(r, "tokenizer.ggml.scores"),
                       [sp.get_score(i) for i in range(sp.get_piece_size())])
    assert (field(r, "tokenizer.ggml.bos_token_id"), field(r, "tokenizer.ggml.eos_token_id")) == \
        (sp.bos_id(), sp.eos_id())
    types = field(r, "tokenizer.ggml.token_type")
    assert [types[i] for i in CODELLAMA_INFILL] == [TokenType.CONTROL] * 4
    assert types[sp.bos_id()] == TokenType.CONTROL and types[0] == TokenType.UNKNOWN
    assert [field(r, f"tokenizer.ggml.{k}_token_id") for k in ("fim_pre", "fim_suf", "fim_mid", "eot")] \
        == list(CODELLAMA_INFILL)
    assert field(r, "tokenizer.chat_template") == chat.LLAMA2_TEMPLATE
    assert field(r, "general.file_type") == LlamaFileType.MOSTLY_F16
    # q/k rows back in Meta's interleaved order: the tensor equals the original wq, bit for bit
    shard = torch.load(meta / "consolidated.00.pth", weights_only=True)
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert torch.equal(torch.from_numpy(np.array(q.data)).view(torch.float16),
                       shard["layers.0.attention.wq.weight"].to(torch.float16))


def test_llama31_vocab_and_rope_freqs_read_back(tmp_path):
    """Llama 3.1: byte-level BPE ("gpt2", "llama-bpe") with its merges and 256 special tokens
    CONTROL, θ 5e5, and rope_freqs equal to Meta's apply_scaling's divisors."""
    meta = build_checkpoint(tmp_path / "meta", "llama3.1", 1)
    convert(meta, tmp_path / "fp16", chat_format="llama3")
    write_gguf(tmp_path / "fp16", tmp_path / "m.gguf")
    params = json.loads((meta / "params.json").read_text())
    r = GGUFReader(tmp_path / "m.gguf")
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "llama-bpe"
    n_ranks = params["vocab_size"] - 256
    types = field(r, "tokenizer.ggml.token_type")
    assert set(types[n_ranks:]) == {TokenType.CONTROL} and set(types[:n_ranks]) == {TokenType.NORMAL}
    assert field(r, "tokenizer.ggml.bos_token_id") == n_ranks
    assert field(r, "llama.rope.freq_base") == params["rope_theta"]
    assert field(r, "tokenizer.chat_template") == chat.LLAMA3_TEMPLATE
    head_dim = params["dim"] // params["n_heads"]
    freqs = 1.0 / params["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    (t,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]  # Meta's factor 8, high 4
    assert np.allclose(np.array(t.data), (freqs / apply_scaling(freqs, 8.0, 4.0)).numpy(), rtol=1e-5)
    # llama.cpp's own BPE over these tokens, merges and pre-tokenizer gives tiktoken's ids
    source = load_source(meta / "tokenizer.model", "llama3.1")
    model = GGUFModel(tmp_path / "m.gguf", n_ctx=64)
    for text in [*PROBES, corpus()[:4000]]:
        assert model.tokenize(text) == [source.bos_id, *source.encode(text)], text
    model.close()


# ---------------------------------------------------------------- quantised types


def test_quantised_types_are_llama_cpps_k_quants_and_load(job):
    """llama.cpp's quantiser wrote each type (file type read back), every weight in the type's own
    blocks (dim 256 / FFN 768: no fallback), norms in F32; each file loads in llama.cpp."""
    allowed = {"Q8_0": {GGMLQuantizationType.Q8_0},
               "Q4_K_M": {GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K}}
    for type_name, kinds in allowed.items():
        r = GGUFReader(job["gguf"][type_name])
        assert field(r, "general.file_type") == TYPES[type_name].ftype
        for t in r.tensors:
            want = {GGMLQuantizationType.F32} if len(t.shape) == 1 else kinds
            assert t.tensor_type in want, (type_name, t.name, t.tensor_type)
        assert job["gguf"][type_name].stat().st_size < job["gguf"]["F16"].stat().st_size
        llama_cpp_logits(job["gguf"][type_name], torch.tensor([[1, 2, 3]]))


def test_verify_reports_and_gates_each_file(job, tmp_path):
    """verify scored every file in llama.cpp: metadata, perplexity (the Q4_K_M rise reported), KL,
    top-1, and F16's parity, at the type's thresholds; a tolerance below the measured rise fails
    the Q4_K_M file."""
    report = job["report"]
    assert report.passed, [c for c in report.checks if not c.passed]
    for type_name, path in job["gguf"].items():
        assert report.artifacts[path.name]["type"] == type_name
        for name in ("gguf_metadata", "perplexity", "kl_divergence"):
            assert check(report, name, path.name).passed
        kl = check(report, "kl_divergence", path.name)
        assert kl.thresholds == {k: TYPES[type_name].thresholds[k] for k in ("kl_mean", "kl_p99", "top1")}
    q4 = check(report, "perplexity", job["gguf"]["Q4_K_M"].name)
    assert q4.thresholds == {"tolerance": TYPES["Q4_K_M"].thresholds["tolerance"]}
    rise = q4.metrics["ratio"] - 1
    assert rise > 0, q4  # measured +0.1% on 64 windows; positive on these 16 as well
    gated = judge(fp16=job["work"] / "fp16", eval_text=demo_model.EVAL, out=tmp_path / "v",
                   seqlen=SEQLEN, max_windows=16, device="cpu", ggufs=[job["gguf"]["Q4_K_M"]],
                   gguf_thresholds={"Q4_K_M": {"tolerance": rise / 2}})
    c = check(gated, "perplexity", job["gguf"]["Q4_K_M"].name)
    assert not gated.passed and not c.passed
    assert c.metrics["ratio"] == pytest.approx(q4.metrics["ratio"], rel=1e-9)


def broken(source: Path, dest: Path, edit: str) -> Path:
    """A copy of the F16 file converted wrongly: θ 10000 (the seed's bug) or q/k left in HF's
    rotate-half layout (the permutation not undone), edited in place through GGUFReader."""
    shutil.copyfile(source, dest)
    r = GGUFReader(dest, "r+")
    if edit == "theta":
        f = r.get_field("llama.rope.freq_base")
        f.parts[f.data[0]][0] = 10000.0
    else:
        heads = {"attn_q": field(r, "llama.attention.head_count"),
                 "attn_k": field(r, "llama.attention.head_count_kv")}
        for t in r.tensors:
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if kind in heads:
                t.data[...] = permute_rotary(torch.from_numpy(np.array(t.data)), heads[kind]).numpy()
    r.data.flush()
    del r
    return dest


def test_a_broken_conversion_fails_gguf_parity(job, tmp_path):
    files = [broken(job["gguf"]["F16"], tmp_path / f"broken-{e}.F16.gguf", e) for e in ("theta", "qk")]
    report = judge(fp16=job["work"] / "fp16", eval_text=demo_model.EVAL, out=tmp_path / "v",
                    seqlen=SEQLEN, max_windows=4, device="cpu", ggufs=files)
    for f in files:
        c = check(report, "gguf_parity", f.name)
        assert not c.passed and c.metrics["max_rel_err"] > 5 * th.GGUF_PARITY["max_rel_err"], c
    assert "llama.rope.freq_base = 10000.0" in check(report, "gguf_metadata", files[0].name).reason
    assert check(report, "gguf_metadata", files[1].name).passed  # only the logits show it


# ---------------------------------------------------------------- bad input


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "gguf", *args], capture_output=True,
                          text=True)


def test_bad_input_exits_2_naming_the_file(job, tmp_path):
    fp16 = job["work"] / "fp16"
    out = tmp_path / "m.gguf"
    other = tmp_path / "notes.gguf"
    other.write_text("not a model")
    before = {p.name: p.stat().st_mtime_ns for p in fp16.iterdir()}
    cases = [
        (["/nonexistent/fp16", str(out)], "/nonexistent/fp16"),
        ([str(fp16), str(fp16 / "m.gguf")], "lies inside the input"),
        ([str(fp16), str(other)], "already exists"),
        ([str(fp16), str(other), "--force"], "not an output of this tool"),
        ([str(job["work"] / "gptq" / "main"), str(out)], "quantised"),
    ]
    for args, message in cases:
        p = run_cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith("error: ") and message in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr
    assert run_cli(str(fp16), str(out), "--type", "IQ1_S").returncode == 2  # a type not offered
    assert other.read_text() == "not a model" and not out.exists()
    assert {p.name: p.stat().st_mtime_ns for p in fp16.iterdir()} == before


def test_cli_json_summary_and_force(job, tmp_path):
    out = tmp_path / "m.gguf"
    p = run_cli(str(job["work"] / "fp16"), str(out), "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["type"] == "F16" and summary["bytes"] == out.stat().st_size
    assert run_cli(str(job["work"] / "fp16"), str(out), "--type", "Q8_0", "--force").returncode == 0
    assert field(GGUFReader(out), "general.file_type") == LlamaFileType.MOSTLY_Q8_0
    assert not list(tmp_path.glob(".*"))  # no partial or intermediate F16 file left behind


# ---------------------------------------------------------------- job and publish


def test_job_plans_the_gguf_repository(job):
    plan = json.loads((job["work"] / "publish-plan" / "plan.json").read_text())
    files = plan["repos"]["demo-org/Tiny-GGUF"]["branches"]["main"]["files"]
    names = sorted(f["path"] for f in files)
    assert names == sorted([*(p.name for p in job["gguf"].values()), "README.md"])
    for f in files:
        if f["path"] != "README.md":
            data = (job["work"] / "gguf" / f["path"]).read_bytes()
            assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["size"] == len(data)
    card = (job["work"] / "publish-plan" / "cards" / "demo-org--Tiny-GGUF" / "main" /
            "README.md").read_text()
    assert "llama-cli -m tinycodellama-demo.Q4_K_M.gguf" in card  # a chat model: llama-cli
    assert "| medium, balanced quality |" in card  # the recipe's description
    stages = {r["stage"]: r["status"] for r in job["result"]["stages"]}
    assert {stages[f"gguf/{t}"] for t in job["gguf"]} == {"ran"}
    again = run_job(job["recipe"], workdir=job["work"], dry_run=True, device="cpu")
    assert {r["stage"]: r["status"] for r in again["stages"]}["gguf/Q4_K_M"] == "reused"


def test_publish_uploads_the_verified_files_then_nothing(job, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    w, r = job["work"], job["recipe"]
    kwargs = dict(fp16=w / "fp16", variants={"main": w / "gptq" / "main"}, ggufs=job["gguf"],
                  report=w / "verify" / "verify.json", plan_dir=tmp_path / "plan")
    with HubServer(tmp_path / "hub", {TOKEN: "write"}) as hub:
        first = publish(r, endpoint=hub.url, **kwargs)
        assert first["commits"] == 3
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        local = Path(snapshot_download("demo-org/Tiny-GGUF", endpoint=hub.url, token=TOKEN,
                                       local_dir=tmp_path / "dl", cache_dir=tmp_path / "cache"))
        got = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
        for path in job["gguf"].values():
            assert got.pop(path.name) == path.read_bytes()
        assert sorted(got) == [".gitattributes", "README.md"]
        second = publish(r, endpoint=hub.url, **kwargs)
        assert second["uploaded_files"] == 0 and second["commits"] == 0


# ---------------------------------------------------------------- the card

CARD_RECIPE = """
[model]
name = "CodeLlama-7B-Instruct"
creator = "Meta"
license = "llama2"
base_model = "codellama/CodeLlama-7b-Instruct-hf"
chat_format = "llama2"
description = "Meta's CodeLlama 7B-Instruct, an instruction-following code assistant."

[source]
env = "CODELLAMA_7B_INSTRUCT"

[calibration]
source = "hf:nickrosh/Evol-Instruct-Code-80k-v1:train:output"

[[variants]]
branch = "main"
bits = 4

[verify]
eval = "hf:codeparrot/codeparrot-clean-valid:train:content"
seqlen = 2048
max_windows = 64

[[gguf]]
type = "Q4_K_M"

[[gguf]]
type = "Q8_0"

[[gguf]]
type = "F16"
description = "unquantised, for re-quantising | reference"

[publish]
fp16_repo = "my-org/CodeLlama-7B-Instruct-fp16"
gptq_repo = "my-org/CodeLlama-7B-Instruct-GPTQ"
gguf_repo = "my-org/CodeLlama-7B-Instruct-GGUF"
quantized_by = "my-org"
tags = ["code", "llama-2", "gptq"]
"""
CARD_FILES = {"Q4_K_M": ("codellama-7b-instruct.Q4_K_M.gguf", 4_081_010_464),
              "Q8_0": ("codellama-7b-instruct.Q8_0.gguf", 7_161_089_824),
              "F16": ("codellama-7b-instruct.F16.gguf", 13_478_127_904)}
CARD_CONFIG = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
               "hidden_size": 4096, "intermediate_size": 11008, "vocab_size": 32016,
               "max_position_embeddings": 16384}
CARD_REPORT = {
    "schema": 3, "tool_version": "0.1.0", "passed": True, "device": "cuda", "dtype": "float16",
    "eval": {"source": "hf", "files": [], "sha256": "ab" * 32, "seqlen": 2048, "windows": 64,
             "tokens": 131072},
    "artifacts": {name: {"path": f"/w/gguf/{name}", "kind": "gguf", "type": t, "files": {},
                         "runtime": "llama-cpp-python 0.3.36"}
                  for t, (name, _) in CARD_FILES.items()},
    "checks": [
        {"check": "gguf_parity", "artifact": CARD_FILES["F16"][0], "passed": True,
         "metrics": {"max_rel_err": 0.00512, "top1_agreement": 0.99932}, "thresholds": {}},
        *({"check": "kl_divergence", "artifact": CARD_FILES[t][0], "passed": True, "metrics": m,
           "thresholds": {}} for t, m in {
            "Q4_K_M": {"kl_mean": 0.0307, "kl_p99": 0.392, "top1": 0.9421},
            "Q8_0": {"kl_mean": 0.00112, "kl_p99": 0.0131, "top1": 0.9893},
            "F16": {"kl_mean": 6.7e-7, "kl_p99": 7.6e-6, "top1": 0.99932}}.items()),
        {"check": "against_no_imatrix", "artifact": CARD_FILES["Q4_K_M"][0], "passed": True,
         "metrics": {"kl_mean": 0.0307, "kl_p99": 0.392, "top1": 0.9421, "ppl_without": 6.3398,
                     "kl_mean_without": 0.0344, "kl_p99_without": 0.441, "top1_without": 0.9377,
                     "kl_ratio": 0.892}, "thresholds": {"imatrix_margin": 0.02}}],
    "perplexity": {"fp16": 6.1234, CARD_FILES["Q4_K_M"][0]: 6.3012, CARD_FILES["Q8_0"][0]: 6.1301,
                   CARD_FILES["F16"][0]: 6.1235},
    "tokens_per_second": 1000.0,
}


def test_gguf_card_matches_golden_and_its_yaml_reads_back(tmp_path):
    """The card for a fixed recipe and report (the provided-files table with sizes and the RAM at
    the full context, llama.cpp's measurements, how to run it) against the reviewed golden file;
    its front matter read by an independent YAML parser."""
    import yaml

    from pipeline import card

    (tmp_path / "r.toml").write_text(CARD_RECIPE)
    recipe = load_recipe(tmp_path / "r.toml")
    rows = [card.GGUFRow(name, g.type, TYPES[g.type].bits, TYPES[g.type].bpw, size,
                         g.description or TYPES[g.type].use_case, g.type == "Q4_K_M")
            for g in recipe.gguf for name, size in [CARD_FILES[g.type]]]
    imatrix = {"file": "codellama-7b-instruct.imatrix.gguf", "chunks": 128, "chunk_size": 2048,
               "dataset": "hf:nickrosh/Evol-Instruct-Code-80k-v1:train:output",
               "activations": "the model in this pipeline's GPTQ pass (4-bit, group 128), each "
                              "layer fed by the layers before it already quantised"}
    text = card.gguf_card(recipe, rows, Report.from_dict(CARD_REPORT, "CARD_REPORT"), CARD_CONFIG,
                          "https://huggingface.co", imatrix)
    assert text == (Path(__file__).parent / "golden" / "gguf_README.md").read_text()
    meta = yaml.safe_load(text[4:text.index("\n---\n", 3)])
    assert meta["base_model"] == "codellama/CodeLlama-7b-Instruct-hf"
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "gguf"
    assert meta["tags"] == ["code", "llama-2", "gguf"]  # the GPTQ tag is not this repo's
    assert [m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]] == \
        [6.3012, 6.1301, 6.1235]
    kv = 2 * 32 * 32 * 128 * 2 * 16384  # K and V, f16, every layer, the full context: 8.59 GB
    assert f"| {card.human_size(4_081_010_464 + kv)} |" in text


# ---------------------------------------------------------------- recipes, types, credentials


def test_every_type_has_default_thresholds_and_a_llama_cpp_file_type():
    assert all(set(t.thresholds) == set(th.GGUF_KINDS) for t in TYPES.values())
    import llama_cpp

    for t in TYPES.values():  # the quantiser is called with llama_cpp's own constant
        assert getattr(llama_cpp, f"LLAMA_FTYPE_{t.ftype.name}") == int(t.ftype)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.replace('type = "Q8_0"', 'type = "IQ1_S"'), "type = 'IQ1_S': must be one of"),
    (lambda r: r.replace('type = "Q8_0"', 'type = "F16"'), "type 'F16' is also [[gguf]] #1"),
    (lambda r: r.replace('gguf_repo = "demo-org/Tiny-GGUF"\n', ''), "need [publish] gguf_repo"),
    (lambda r: r.replace('gguf_repo = "demo-org/Tiny-GGUF"', 'gguf_repo = "demo-org/Tiny-fp16"'),
     "gguf_repo must differ"),
    (lambda r: r.replace('description = "medium, balanced quality"', 'top1 = 1.5'),
     "top1 must be in [0, 1]"),
    (lambda r: r.replace('description = "medium, balanced quality"', 'bits = 4'),
     "unknown key(s) bits"),
])
def test_recipe_gguf_entries_are_validated(edit, message, tmp_path):
    from pipeline.core.errors import InputError

    (tmp_path / "r.toml").write_text(edit(RECIPE))
    with pytest.raises(InputError, match=re.escape(message)):
        load_recipe(tmp_path / "r.toml", allow_dirs=[demo_model.DEMO])


def test_a_credential_in_gguf_metadata_is_refused(job, tmp_path):
    """GGUF files are binary, but their string metadata is free text (name, chat template): the
    publish scan reads it."""
    from pipeline.core.errors import InputError
    from pipeline.credentials import refuse_credentials

    write_gguf(job["work"] / "fp16", tmp_path / "t.gguf", name=f"model {TOKEN}")
    with pytest.raises(InputError, match="t.gguf: a Hugging Face token"):
        refuse_credentials({"t.gguf": tmp_path / "t.gguf"}, [])
    refuse_credentials({"ok.gguf": job["gguf"]["Q4_K_M"]}, [])


def test_publish_refuses_a_report_that_misstates_a_files_type(job, tmp_path):
    """An F16 file recorded as Q8_0, its gguf_parity dropped (Q8_0 needs none): the verdict alone
    would pass; publish reads the type from the file and refuses."""
    from pipeline.core.errors import CheckFailed

    report = job["report"].to_dict()
    f16 = job["gguf"]["F16"].name
    report["artifacts"][f16]["type"] = "Q8_0"
    report["checks"] = [c for c in report["checks"] if c["check"] != "gguf_parity"]
    (tmp_path / "verify.json").write_text(json.dumps(report))
    w = job["work"]
    with pytest.raises(CheckFailed, match=re.escape(f"{f16}: its GGUF type is F16 (the verify "
                                                    "report says Q8_0)")):
        publish(job["recipe"], fp16=w / "fp16", variants={"main": w / "gptq" / "main"},
                ggufs=job["gguf"], report=tmp_path / "verify.json", dry_run=True)


def test_every_card_of_a_recipe_with_gguf_files_links_the_gguf_repository(tmp_path):
    """The fp16, GPTQ and GGUF cards list the same repositories, each marking its own."""
    from pipeline import card

    (tmp_path / "r.toml").write_text(CARD_RECIPE)
    recipe = load_recipe(tmp_path / "r.toml")
    url = f"https://huggingface.co/{recipe.publish.gguf_repo}"
    for name in ("gptq", "fp16", "gguf"):
        listed = card.repositories(recipe, "https://huggingface.co", this=name, original="x")
        lines = listed.splitlines()
        assert [line for line in lines if url in line] == [
            f"- [GGUF models for CPU and GPU inference with llama.cpp, one file per quantisation type]"
            f"({url})" + (" (this repo)" if name == "gguf" else "")]
        assert sum("(this repo)" in line for line in lines) == 1
