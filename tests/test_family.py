"""The whole family (#23): CodeLlama 70B (base, Python, Instruct with its own chat format), Llama 3.2
1B/3B and Llama 3.3 70B. Their recipes load and plan the expected tasks; the released shapes give
Meta's widths; a converted CodeLlama 70B-Instruct gives Meta's dialog ids and stop tokens; the
cards say what Meta trained (no infilling for 70B, tied embeddings for 3.2). Conversion parity
for their layouts is in tests/test_convert.py (PARITY), llama.cpp and the GPTQ runtimes on a tied
model in tests/test_gguf.py and tests/test_runtimes.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from cli_runner import run_cli
from meta_chat import meta_codellama70b_dialog
from meta_fixtures import STEP_ID, build_checkpoint
from transformers import AutoTokenizer

from pipeline import card
from pipeline.convert import convert
from pipeline.recipe import load_recipe
from verify.meta_reference import ModelArgs

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# recipe -> (its source variable, chat format, the variants' branches)
CODELLAMA = ["main", "gptq-4bit-32g-actorder_True", "gptq-4bit-64g-actorder_True",
             "gptq-8bit-128g-actorder_True", "gptq-3bit-128g-actorder_True"]
LLAMA3 = ["main", "gptq-4bit-32g-actorder_True", "gptq-8bit-128g-actorder_True"]
FAMILY = {
    "codellama-70b": ("CODELLAMA_70B", "none", CODELLAMA),
    "codellama-70b-python": ("CODELLAMA_70B_PYTHON", "none", CODELLAMA),
    "codellama-70b-instruct": ("CODELLAMA_70B_INSTRUCT", "codellama-70b", CODELLAMA),
    "llama-3.2-1b": ("LLAMA3_2_1B", "none", LLAMA3),
    "llama-3.2-1b-instruct": ("LLAMA3_2_1B_INSTRUCT", "llama3", LLAMA3),
    "llama-3.2-3b": ("LLAMA3_2_3B", "none", LLAMA3),
    "llama-3.2-3b-instruct": ("LLAMA3_2_3B_INSTRUCT", "llama3", LLAMA3),
    "llama-3.3-70b-instruct": ("LLAMA3_3_70B_INSTRUCT", "llama3",
                               LLAMA3 + ["gptq-3bit-128g-actorder_True"]),
}


@pytest.mark.parametrize("name", FAMILY)
def test_recipe_loads_and_plans_its_stages(name, monkeypatch, capsys):
    env, fmt, branches = FAMILY[name]
    r = load_recipe(RECIPES / f"{name}.toml")
    assert (r.source.env, r.model.chat_format) == (env, fmt)
    assert r.model.original_card is not None and r.model.original_card.is_file()
    assert [v.branch for v in r.variants] == branches
    if fmt != "none":
        assert r.verify.chat_prompts
    code, out, err = run_cli(["run", name, "--plan", "--json", "--workdir", "w"], monkeypatch,
                             capsys)
    assert code == 0, err
    tasks = [t["task"] for t in json.loads(out)["tasks"]]
    assert tasks == ["convert", *(f"quantize/{b}" for b in branches), "verify", "publish"]


@pytest.mark.parametrize("name,ffn", [
    ("CodeLlama-70B", 28672), ("Llama-3.2-3B", 8192), ("Llama-3.3-70B", 28672)])
def test_released_params_give_metas_widths(name, ffn):
    """The params.json of the releases (CodeLlama 70B: Llama 2 70B's with θ 1e6 and 32016 pieces;
    Llama 3.3 70B: Llama 3.1 70B's), read by the independent reference: their w1 widths."""
    params = {
        "CodeLlama-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                              ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=1000000,
                              vocab_size=32016),
        "Llama-3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                             ffn_dim_multiplier=1.0, multiple_of=256, norm_eps=1e-5,
                             rope_theta=500000.0, use_scaled_rope=True, vocab_size=128256),
        "Llama-3.3-70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                              ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                              use_scaled_rope=True, vocab_size=128256),
    }[name]
    a = ModelArgs.from_params(params)
    assert a.hidden_dim == ffn
    assert a.scale_factor == (32.0 if name == "Llama-3.2-3B" else 8.0)


def test_codellama_70b_instruct_conversion_gives_metas_dialog_ids(tmp_path):
    """The whole converter on a CodeLlama 70B-Instruct layout (θ 10000, 4096 context, <step>):
    apply_chat_template gives Meta's dialog_prompt_tokens ids, with and without a system message
    and over several turns, and generation stops at <step> and </s>."""
    src = build_checkpoint(tmp_path / "meta", "codellama-70b-instruct", 2)
    out = tmp_path / "hf"
    summary = convert(src, out, chat_format="codellama-70b")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["rope_theta"], cfg["max_position_embeddings"]) == (10000.0, 4096)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, STEP_ID]
    assert summary["tokenizer"]["infill"] is None  # grouped-query 70B: not offered
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(out)
    for dialog in ([{"role": "user", "content": "Reverse a list."}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Reverse a list."},
                    {"role": "assistant", "content": "xs[::-1]"},
                    {"role": "user", "content": " In place? "}]):
        ids = tok.apply_chat_template(dialog, add_generation_prompt=True, return_dict=False)
        assert ids == meta_codellama70b_dialog(sp, dialog)


@pytest.mark.parametrize("name,facts", [
    ("codellama-7b", card.ModelFacts({"prefix": 32007, "suffix": 32008, "middle": 32009,
                                      "eot": 32010})),
    ("codellama-70b", card.ModelFacts(None, untrained_infill=True)),
    ("llama3.2", card.ModelFacts(tied=True)),
    ("llama3.2-output", card.ModelFacts(tied=True)),
    ("llama3.3", card.ModelFacts()),
])
def test_cards_say_what_meta_trained(tmp_path, name, facts):
    """conversion.json -> what the cards state: infilling for Code Llama 7B (its ids), none for
    70B although its vocabulary holds the pieces, tied embeddings for Llama 3.2."""
    convert(build_checkpoint(tmp_path / "meta", name, 1), tmp_path / "hf")
    got = card.ModelFacts.of(json.loads((tmp_path / "hf" / "conversion.json").read_text()))
    assert got == facts
    notes = card.prompt_notes(load_recipe(RECIPES / "codellama-70b.toml"), got)
    assert ("PRE, SUF, MID, EOT" in notes) == (facts.infill is not None)
    assert ("Code Llama 7B and 13B only" in notes) == facts.untrained_infill
    assert ("`tie_word_embeddings` is true" in notes) == facts.tied
