"""Model cards: golden files for a fixed recipe and report, the YAML front matter read back by an
independent YAML parser, and the values the cards must carry (sizes, perplexities, parameters)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from markdown_it import MarkdownIt

from pipeline import card
from pipeline.core.errors import InputError
from pipeline.recipe import load_recipe
from verify.report import Report

GOLDEN = Path(__file__).parent / "golden"
RECIPE = """
[model]
name = "CodeLlama-7B-Instruct"
creator = "Meta"
license = "llama2"
base_model = "codellama/CodeLlama-7b-Instruct-hf"
prompt_template = "[INST] {prompt} [/INST]"
description = "Meta's CodeLlama 7B-Instruct, an instruction-following code assistant."
original_card = "cards/original.md"

[source]
env = "CODELLAMA_7B_INSTRUCT"

[calibration]
source = "hf:nickrosh/Evol-Instruct-Code-80k-v1:train:output"
nsamples = 128
seqlen = 4096

[[variants]]
branch = "main"
bits = 4
group_size = 128
damp = 0.1
description = "4-bit, 128g, no act-order: the most compatible"

[[variants]]
bits = 4
group_size = 32
act_order = true
damp = 0.1
description = "4-bit, 32g, act-order: highest 4-bit accuracy"

[[variants]]
bits = 8
group_size = -1
act_order = true
damp = 0.1
calibration = "data/code/**/*.py"
seqlen = 2048
description = "8-bit, no groups, act-order | closest to fp16"

[verify]
eval = "hf:codeparrot/codeparrot-clean-valid:train:content"
seqlen = 2048
max_windows = 64

[publish]
fp16_repo = "my-org/CodeLlama-7B-Instruct-fp16"
gptq_repo = "my-org/CodeLlama-7B-Instruct-GPTQ"
quantized_by = "my-org"
tags = ["code", "llama-2", "gptq"]
"""
ORIGINAL_CARD = """---
license: llama2
language:
- code
---
# **Code Llama**

Code Llama is a collection of pretrained and fine-tuned generative text models.
"""

def typed(report: dict) -> Report:
    """A report object from its verify.json form, as publish reads it."""
    return Report.from_dict(report, "REPORT")


REPORT = {
    "schema": 3, "tool_version": "0.1.0", "passed": True, "device": "cuda", "dtype": "float16",
    "eval": {"source": "hf", "files": [], "sha256": "ab" * 32, "seqlen": 2048, "windows": 64, "tokens": 131072},
    "artifacts": {},
    "checks": [{"check": "conversion_parity", "artifact": "fp16", "passed": True,
                "metrics": {"max_rel_err": 3.1e-5, "top1_agreement": 0.99951}, "thresholds": {}},
               {"check": "generation", "artifact": "fp16", "passed": True, "reference": True, "samples": [
                   {"prompt": "def fibonacci(n):", "text": "\n    if n < 2:\n        return n\n", "degenerate": None},
                   {"prompt": "import os\n\n\ndef ", "text": "walk(top):\n    s = '```'", "degenerate": None}]},
               *({"check": "kl_divergence", "artifact": name, "passed": True, "metrics": kl, "thresholds": {}}
                 for name, kl in {"main": {"kl_mean": 0.0312, "kl_p99": 0.41, "top1": 0.9412},
                                  "gptq-4bit-32g-actorder_True": {"kl_mean": 0.0207, "kl_p99": 0.287, "top1": 0.9533},
                                  "gptq-8bit--1g-actorder_True": {"kl_mean": 0.00041, "kl_p99": 0.0052,
                                                                  "top1": 0.9961}}.items()),
               *({"check": "generation", "artifact": name, "passed": True, "samples": [
                   {"prompt": "def fibonacci(n):", "text": text[0], "agree": agree[0], "compared": 32},
                   {"prompt": "import os\n\n\ndef ", "text": text[1], "agree": agree[1], "compared": 32}]}
                 for name, text, agree in [
                     ("main", ("\n    if n <= 1:\n        return n\n", "walk(top):\n    pass"), (5, 3)),
                     ("gptq-4bit-32g-actorder_True", ("\n    if n < 2:\n        return n\n", "walk(top):\n"), (32, 4)),
                     ("gptq-8bit--1g-actorder_True", ("\n    if n < 2:\n        return n\n",
                                                      "walk(top):\n    s = '```'"), (32, 32))])],
    "perplexity": {"fp16": 6.1234, "main": 6.3012, "main:rtn": 6.5,
                   "gptq-4bit-32g-actorder_True": 6.2, "gptq-8bit--1g-actorder_True": 6.125},
    "tokens_per_second": 1000.0,
}


def runtime_result(version: str | None, ppl: float | None = None, ours: float = 6.3, top1: float = 0.95,
                   reason: str | None = None, error: str | None = None, expected: bool = False) -> dict:
    """One verify.json `runtimes` entry (verify/stage.py judge_runtimes) for the card."""
    return {"version": version, "checked": reason is None, "reason": reason, "loaded": reason is None,
            "error": error, "kernels": ["TorchLinear"], "ppl": ppl, "ppl_ours": ours,
            "ratio": None if ppl is None else ppl / ours - 1, "top1": None if ppl is None else top1,
            "kl_mean": None if ppl is None else 0.01, "expected_refusal": expected}


NAMES = ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit--1g-actorder_True"]
REPORT["runtimes"] = {
    "gptqmodel": {n: runtime_result("7.6.0", p, ours) for n, p, ours in
                  zip(NAMES, (6.3004, 6.2011, 6.1249), (6.3001, 6.2013, 6.1249))},
    "transformers": {"main": runtime_result("5.24.0", 6.2912, 6.3001, top1=0.9412)},
    "vllm": {n: runtime_result(None, reason="not checked: needs CUDA") for n in NAMES},
}
SIZES = {"main": 3_901_234_567, "gptq-4bit-32g-actorder_True": 4_280_000_000,
         "gptq-8bit--1g-actorder_True": 7_160_000_000}
FP16_FILES = {"model-00001-of-00002.safetensors": 9_976_576_152, "model-00002-of-00002.safetensors": 3_500_296_424,
              "model.safetensors.index.json": 23_950, "config.json": 637, "tokenizer.model": 500_058}


@pytest.fixture
def recipe(tmp_path: Path):
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "original.md").write_text(ORIGINAL_CARD)
    (tmp_path / "r.toml").write_text(RECIPE)
    return load_recipe(tmp_path / "r.toml")


def artifact(path: Path, bits: int, group: int, act: bool, seqlen: int) -> Path:
    path.mkdir(parents=True)
    qc = {"bits": bits, "group_size": group, "damp_percent": 0.1, "desc_act": act, "sym": True,
          "static_groups": False, "true_sequential": True, "quant_method": "gptq", "checkpoint_format": "gptq"}
    (path / "quantize_config.json").write_text(json.dumps(qc))
    (path / "quant_log.json").write_text(json.dumps({"method": "gptq", "calibration": {"seqlen": seqlen}}))
    return path


@pytest.fixture
def branches(recipe, tmp_path):
    params = {"main": (4, 128, False, 4096), "gptq-4bit-32g-actorder_True": (4, 32, True, 4096),
              "gptq-8bit--1g-actorder_True": (8, -1, True, 2048)}
    return [card.read_branch(recipe, v, artifact(tmp_path / "gptq" / v.branch, *params[v.branch]), SIZES[v.branch])
            for v in recipe.variants]


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---\n", 3)])


def test_gptq_card_matches_golden(recipe, branches):
    text = card.gptq_card(recipe, branches, typed(REPORT), "llama", "https://huggingface.co")
    assert text == (GOLDEN / "gptq_README.md").read_text()


def compatibility_section(text: str) -> str:
    return text[text.index("## Compatibility"):text.index("# Original model card")]


def test_card_compatibility_is_what_verify_measured(recipe, branches):
    """Only runtimes the report measured appear: no report section, no runtime named; a ragged
    branch gets RAGGED_REFUSED_BY and its measured refusal, a runtime that was not run its reason."""
    from verify.runtimes import RAGGED_REFUSED_BY

    bare = {k: v for k, v in REPORT.items() if k != "runtimes"}
    section = compatibility_section(card.gptq_card(recipe, branches, typed(bare), "llama", "https://huggingface.co"))
    assert "No runtime was checked" in section
    assert not any(n in section for n in ("GPTQModel", "vLLM", "ExLlama", "Transformers", "TGI"))

    ragged = [b if b.name != "main" else card.Branch(**{**b.__dict__, "partial_groups": ("mlp.down_proj",)})
              for b in branches]
    refusal = "RuntimeError: _weight_int4pack_mm_cpu: expect K to be divisible by qGroupSize"
    report = {**REPORT, "runtimes": {**REPORT["runtimes"], "transformers": {
        "main": {**runtime_result("5.24.0"), "error": "scoring: " + refusal, "expected_refusal": True}}}}
    section = compatibility_section(card.gptq_card(recipe, ragged, typed(report), "llama", "https://huggingface.co"))
    assert "In `main`, some layers have an input width that is not a multiple of the group size" in section
    assert ", ".join(RAGGED_REFUSED_BY) in section
    assert f"| Transformers 5.24.0 | `main` | refused, as expected: `scoring: {refusal}` | — | — | — |" in section
    assert "| GPTQModel 7.6.0 | `main` | yes | 6.3004 | +0.005% | 95.0% |" in section
    assert "vLLM: not checked (needs CUDA)." in section


def test_a_runtime_is_named_on_cards_by_its_runtimes_entry(recipe, branches, monkeypatch):
    """verify/runtimes.py RUNTIMES is the one list of runtimes: the card's name for each is its
    entry's label, and RAGGED_REFUSED_BY is the labels of those that refuse ragged groups plus
    the kernels that are no runtime here (the measured list)."""
    from verify import runtimes

    assert set(runtimes.RAGGED_REFUSED_BY) == {"Transformers", "vLLM", "Marlin", "ExLlama"}
    new = runtimes.Runtime("Text Generation Inference", ("text_generation",), True, None)
    monkeypatch.setitem(runtimes.RUNTIMES, "tgi", new)
    report = {**REPORT, "runtimes": {"tgi": {"main": runtime_result("3.0.0", 6.3002, 6.3001)}}}
    section = compatibility_section(card.gptq_card(recipe, branches, typed(report), "llama", "https://huggingface.co"))
    assert "| Text Generation Inference 3.0.0 | `main` | yes | 6.3002 |" in section


def test_fp16_card_matches_golden(recipe):
    text = card.fp16_card(recipe, FP16_FILES, typed(REPORT), "llama", "https://huggingface.co")
    assert text == (GOLDEN / "fp16_README.md").read_text()


def test_gptq_metadata_read_back_by_yaml(recipe, branches):
    meta = front_matter(card.gptq_card(recipe, branches, typed(REPORT), "llama", "https://hub.example"))
    assert {k: meta[k] for k in ("license", "base_model", "base_model_relation", "model_name", "model_creator",
                                  "model_type", "pipeline_tag", "library_name", "inference", "quantized_by",
                                  "prompt_template")} == {
        "license": "llama2", "base_model": "codellama/CodeLlama-7b-Instruct-hf", "base_model_relation": "quantized",
        "model_name": "CodeLlama-7B-Instruct", "model_creator": "Meta", "model_type": "llama",
        "pipeline_tag": "text-generation", "library_name": "transformers", "inference": False,
        "quantized_by": "my-org", "prompt_template": "[INST] {prompt} [/INST]"}
    assert meta["tags"] == ["code", "llama-2", "gptq"]
    (index,) = meta["model-index"]
    assert index["name"] == "CodeLlama-7B-Instruct-GPTQ"
    (result,) = index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"]["type"] == "codeparrot/codeparrot-clean-valid"
    values = sorted(m["value"] for m in result["metrics"])
    assert values == sorted(REPORT["perplexity"][b.name] for b in branches)  # measured, every branch, no RTN
    assert all(m["type"] == "perplexity" and m["verified"] is False for m in result["metrics"])


def test_fp16_metadata_has_no_quantisation_fields(recipe):
    meta = front_matter(card.fp16_card(recipe, FP16_FILES, typed(REPORT), "llama", "https://huggingface.co"))
    assert "base_model_relation" not in meta and "quantized_by" not in meta and "gptq" not in meta["tags"]
    assert [m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]] == [6.1234]


def test_gptq_table_rows_carry_parameters_sizes_and_perplexities(recipe, branches):
    text = card.gptq_card(recipe, branches, typed(REPORT), "llama", "https://huggingface.co")
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    cells = [re.split(r"(?<!\\)\|", row)[1:-1] for row in rows]
    assert [c[0].strip().split("]")[0][1:] for c in cells] == [v.branch for v in recipe.variants]
    assert [c[7].strip() for c in cells] == ["3.90 GB", "4.28 GB", "7.16 GB"]
    assert [c[1].strip() + c[2].strip() + c[3].strip() for c in cells] == ["4128No", "432Yes", "8NoneYes"]
    assert [c[6].strip() for c in cells] == ["4096", "4096", "2048"]  # from quant_log.json
    assert "`data/code/**/*.py`" in cells[2][5]  # local calibration shown relative to the recipe
    assert "closest to fp16" in cells[2][8] and "\\|" in cells[2][8]  # '|' in a description is escaped
    ppl = [line for line in text.splitlines() if line.startswith("| `main`")]
    assert ppl == ["| `main` (4-bit, 128g) | 6.3012 | +2.90% | 0.0312 | 0.41 | 94.12% |",
                   "| `main` RTN baseline | 6.5000 | +6.15% | — | — | — |"]  # RTN: no KL measured


def fences(text: str) -> list[str]:
    """Contents of the fenced code blocks of a markdown text, as an independent parser reads them."""
    return [t.content for t in MarkdownIt().parse(text) if t.type == "fence" and t.info == "text"]


def test_cards_show_every_generation_sample_verbatim(recipe, branches):
    gen = {c["artifact"]: c["samples"] for c in REPORT["checks"] if c["check"] == "generation"}
    text = card.gptq_card(recipe, branches, typed(REPORT), "llama", "https://huggingface.co")
    section = text[text.index("## Generation samples"):text.index("## How to download")]
    expected = [gen[name][i]["text"].rstrip("\n") + "\n" for i in range(2)
                for name in ["fp16", *(b.artifact for b in branches)]]  # per prompt, fp16 first
    assert fences(section) == expected  # backticks in a sample do not end its block
    assert section.count("Prompt ") == 2 and '`"import os\\n\\n\\ndef "`' in section
    assert "`main` (matches fp16 for the first 5 of 32 tokens)" in section
    fp16 = card.fp16_card(recipe, FP16_FILES, typed(REPORT), "llama", "https://huggingface.co")
    assert fences(fp16) == [s["text"].rstrip("\n") + "\n" for s in gen["fp16"]]


def test_original_card_appended_without_its_front_matter(recipe, branches):
    text = card.gptq_card(recipe, branches, typed(REPORT), "llama", "https://huggingface.co")
    assert text.count("\n---\n") == 1  # only the closing line of our own front matter
    assert text.endswith("# **Code Llama**\n\nCode Llama is a collection of pretrained and fine-tuned "
                         "generative text models.\n")


@pytest.mark.parametrize("value", [
    {"a": "x: y", "b": ["- item", "#not a comment", "multi\nline", "ünïcode", "'quoted\""], "c": True,
     "d": [{"e": 1.5, "f": [{"g": None}]}, {"h": []}], "i": {}, "j": "yes", "k": "0.10", "l": -1},
])
def test_to_yaml_round_trips_through_an_independent_parser(value):
    assert yaml.safe_load(card.to_yaml(value)) == value


def test_read_branch_refuses_a_directory_of_another_variant(recipe, tmp_path):
    main = recipe.variant("main")
    path = artifact(tmp_path / "x", 8, 128, False, 4096)
    with pytest.raises(InputError, match="bits = 8"):
        card.read_branch(recipe, main, path, 1)
    good = artifact(tmp_path / "y", 4, 128, False, 4096)
    (good / "quant_log.json").unlink()
    with pytest.raises(InputError, match="quant_log.json"):
        card.read_branch(recipe, main, good, 1)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (1_000_000, "1.00 MB"),
                                     (3_901_234_567, "3.90 GB"), (68_000_000_000_000, "68.00 TB")])
def test_human_size(n, text):
    assert card.human_size(n) == text


def test_a_round_to_nearest_variant_has_a_card_row_without_calibration(recipe, tmp_path):
    """RTN reads no calibration text: quantize's real output for it gives a row saying so, where a
    GPTQ row names its dataset and sequence length (it used to be refused for lacking a seqlen)."""
    import dataclasses

    from demo_model import demo_fp16

    from pipeline.methods import QuantSpec
    from pipeline.quantize import quantize

    out = tmp_path / "rtn"
    quantize(demo_fp16(tmp_path / "fp16"), out, QuantSpec(4, 128, False, method="rtn"), device="cpu")
    variant = dataclasses.replace(recipe.variant("main"), method="rtn", damp=0.1)
    branch = card.read_branch(recipe, variant, out, 1)
    assert (branch.dataset, branch.seqlen) == ("", None)
    text = card.gptq_card(recipe, [branch], typed(REPORT), "llama", "https://huggingface.co")
    row = next(line for line in text.splitlines() if line.startswith("| [main]"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert cells[5:7] == ["none (round-to-nearest)", "—"]
