"""Recipe loading: the schema, every validation error, `extends`, paths, and the shipped recipes."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from cli_runner import run_cli

from pipeline.core.errors import InputError
from pipeline.methods import QuantSpec
from pipeline.recipe import find_recipe, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MINIMAL = """
[model]
name = "Tiny"

[source]
path = "ckpt"

[calibration]
source = "calib/*.py"

[[variants]]
branch = "main"
bits = 4

[verify]
eval = "eval"

[publish]
fp16_repo = "org/Tiny-fp16"
gptq_repo = "org/Tiny-GPTQ"
"""


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def edited(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new, 1)


def test_minimal_recipe_defaults_and_paths(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.name == "r"
    assert r.source.path == tmp_path / "ckpt"
    assert r.calibration.source == str(tmp_path / "calib/*.py")
    assert r.verify.eval == str(tmp_path / "eval")
    assert r.convert.dtype == "float16" and r.convert.max_shard_size == "5GB"
    (v,) = r.variants
    assert r.variant("main") is v
    assert (v.branch, v.bits, v.group_size, v.act_order, v.damp, v.sym) == ("main", 4, 128, False, 0.01, True)
    # variants inherit the calibration defaults
    assert (v.calibration, v.nsamples, v.seqlen, v.seed) == (str(tmp_path / "calib/*.py"), 128, 2048, 0)
    assert v.as_dict() == {"bits": 4, "group_size": 128, "act_order": False, "sym": True,
                           "damp": 0.01, "static_groups": False, "true_sequential": True,
                           "mse": True, "blocksize": 128, "method": "gptq"}
    assert QuantSpec(**v.as_dict()) == QuantSpec(4)  # the spec alone, QuantSpec's defaults
    assert r.verify.tolerance == {} and r.verify.prompts == [] and r.verify.max_windows is None


def test_default_branch_names_and_per_variant_overrides(tmp_path):
    text = MINIMAL + """
[[variants]]
bits = 8
group_size = -1
act_order = true
calibration = "hf:wikitext:wikitext-2-raw-v1:train:text"
nsamples = 16
seqlen = 512

[[variants]]
bits = 3
group_size = 32
"""
    r = load_recipe(write(tmp_path, text))
    branches = [v.branch for v in r.variants]
    assert branches == ["main", "gptq-8bit--1g-actorder_True", "gptq-3bit-32g-actorder_False"]
    v8 = r.variant("gptq-8bit--1g-actorder_True")
    assert (v8.calibration, v8.nsamples, v8.seqlen) == ("hf:wikitext:wikitext-2-raw-v1:train:text", 16, 512)
    with pytest.raises(InputError, match="no variant 'nope'"):
        r.variant("nope")


def test_tolerance_and_lists_parse(tmp_path):
    text = edited('eval = "eval"', 'eval = "eval"\ntolerance = { "4" = 0.05 }\nprompts = ["def f():"]\n'
                  'max_windows = 3')
    r = load_recipe(write(tmp_path, text))
    assert r.verify.tolerance == {4: 0.05}
    assert r.verify.prompts == ["def f():"] and r.verify.max_windows == 3


@pytest.mark.parametrize("old,new,message", [
    # GGUF types: an IQ type needs its importance matrix; an unknown type is named
    ('gptq_repo = "org/Tiny-GPTQ"', 'gptq_repo = "org/Tiny-GPTQ"\ngguf_repo = "org/Tiny-GGUF"\n'
     '[[gguf]]\ntype = "IQ2_M"\nimatrix = false',
     r"\[\[gguf\]\] #1 \(IQ2_M\): imatrix = false: IQ2_M needs an importance matrix"),
    ('gptq_repo = "org/Tiny-GPTQ"', 'gptq_repo = "org/Tiny-GPTQ"\ngguf_repo = "org/Tiny-GGUF"\n'
     '[[gguf]]\ntype = "Q4_K_M"\nimatrix = "yes"', r"\[\[gguf\]\] #1 imatrix must be true or false"),
    # unknown keys
    ('name = "Tiny"', 'name = "Tiny"\ncolour = "red"', r"\[model\]: unknown key\(s\) colour"),
    ("bits = 4", "bits = 4\nbitz = 4", r"\[\[variants\]\] #1: unknown key\(s\) bitz"),
    ("[model]", "flavour = 1\n[model]", r"unknown top-level key\(s\) flavour"),
    # missing keys / sections
    ('name = "Tiny"', 'creator = "x"', r"\[model\]: missing required key 'name'"),
    ('[verify]\neval = "eval"', "", r"missing section \[verify\]"),
    ("bits = 4", "group_size = 128", r"missing required key 'bits'"),
    # wrong types
    ("bits = 4", 'bits = "4"', r"bits must be an integer, got str '4'"),
    ("bits = 4", "bits = 4.0", r"bits must be an integer"),
    ("bits = 4", "bits = true", r"bits must be an integer"),
    ("bits = 4", "bits = 4\nact_order = 1", r"act_order must be true or false"),
    ("bits = 4", "bits = 4\ndamp = true", r"damp must be a number"),
    ('name = "Tiny"', "name = 7", r"\[model\] name must be a string"),
    ('gptq_repo = "org/Tiny-GPTQ"', 'gptq_repo = "org/Tiny-GPTQ"\ntags = "code"', r"tags must be a list of strings"),
    ('eval = "eval"', 'eval = "eval"\ntolerance = { "4" = "x" }', r"tolerance.4 must be a number"),
    ('eval = "eval"', 'eval = "eval"\ntolerance = { "four" = 0.1 }', r"key 'four' must be a bit width"),
    ('eval = "eval"', 'eval = "eval"\ntolerance = 0.1', r"tolerance must be a table"),
    ('path = "ckpt"', "path = 3", r"\[source\] path must be a path"),
    ("[[variants]]", "[variants]", r"variants must be an array of tables"),
    # impossible values and combinations
    ("bits = 4", "bits = 5", r"bits = 5: must be one of 2, 3, 4, 8"),
    ("bits = 4", "bits = 4\ngroup_size = 0", r"group_size = 0: must be -1 \(one group per row\) or a "
     "positive number of columns"),
    ("bits = 4", "bits = 4\ngroup_size = -2", r"group_size = -2"),
    ("bits = 4", "bits = 4\ndamp = 0", r"damp = 0.0: must be in \(0, 1\)"),
    ("bits = 4", "bits = 4\ndamp = 1", r"damp = 1.0"),
    ("bits = 4", "bits = 4\nmethod = \"awq\"", r"method = 'awq'"),
    ("bits = 4", "bits = 4\ngroup_size = -1\nstatic_groups = true", r"static_groups = true: needs a group size other than -1"),
    ("bits = 4", "bits = 4\nblocksize = 0", r"\[\[variants\]\] #1 \(main\): blocksize = 0: must be positive"),
    ("bits = 4", "bits = 4\nnsamples = 0", r"nsamples = 0"),
    ('branch = "main"', 'branch = "my branch"', r"branch = 'my branch'"),
    ('branch = "main"', 'branch = "gptq-4bit-128g"', r'no variant has branch = "main"'),
    ('[[variants]]\nbranch = "main"\nbits = 4', "", r"missing section \[variants\]"),
    ('path = "ckpt"', 'path = "ckpt"\nenv = "CKPT"', r"exactly one of `path` or `env` \(got path, env\)"),
    ('path = "ckpt"', "", r"exactly one of `path` or `env` \(got none\)"),
    ('path = "ckpt"', 'repo = "org/Model"', r"exactly one of `path` or `env` \(got repo\)"),
    ('path = "ckpt"', 'format = "gguf"\npath = "ckpt"', r"format = 'gguf': must be one of meta, hf"),
    ('path = "ckpt"', 'format = "hf"\nrepo = "org/Model"\npath = "ckpt"',
     r"exactly one of `path`, `env` or `repo` \(got path, repo\)"),
    ('path = "ckpt"', 'format = "hf"\nrepo = "no-owner"', r"repo = 'no-owner': expected a repository id"),
    ('path = "ckpt"', 'format = "hf"\nrepo = "org/M"\nrevision = "../x"', r"revision = '../x'"),
    ('path = "ckpt"', 'format = "hf"\nrepo = "org/M"\nrevision = "main\\n"', r"revision = 'main\\n'"),
    ('path = "ckpt"', 'format = "hf"\nrepo = "org/M"',
     r"\[publish\] fp16_repo: an HF source is published as it is"),
    ('fp16_repo = "org/Tiny-fp16"\n', "", r"\[publish\] fp16_repo is required"),
    ('path = "ckpt"', 'env = "not a name"', r"not an environment variable name"),
    ('name = "Tiny"', 'name = "Tiny"\nprompt_template = "Q:"', r"prompt_template must contain \{prompt\}"),
    ('name = "Tiny"', 'name = "Tiny"\noriginal_card = "card.md"', r"original_card = .*card.md.*file not found"),
    ("[calibration]", "[convert]\ndtype = \"int8\"\n[calibration]", r"dtype = 'int8'"),
    ("[calibration]", "[convert]\nmax_shard_size = \"lots\"\n[calibration]",
     r"max_shard_size: cannot parse size 'lots'"),
    ('source = "calib/*.py"', 'source = "hf:wikitext"', r"expected hf:DATASET\[:CONFIG\]:SPLIT:FIELD"),
    ('eval = "eval"', 'eval = "eval"\ntolerance = { "5" = 0.1 }', r"keys must be bit widths"),
    ('eval = "eval"', 'eval = "eval"\ntolerance = { "8" = 0.1 }', r"no entry for the 4-bit variant"),
    ('eval = "eval"', 'eval = "eval"\nmax_windows = 0', r"max_windows = 0"),
    ('gptq_repo = "org/Tiny-GPTQ"', 'gptq_repo = "org/Tiny-fp16"', r"fp16_repo and gptq_repo must differ"),
    ('gptq_repo = "org/Tiny-GPTQ"', 'gptq_repo = "Tiny-GPTQ"', r"gptq_repo = 'Tiny-GPTQ': expected a repository id"),
])
def test_invalid_recipes_name_file_and_key(tmp_path, old, new, message):
    path = write(tmp_path, edited(old, new))
    with pytest.raises(InputError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value)


# -1, or any positive width: GPTQ's format (ceil(in/group) groups, g_idx) and GPTQModel take a
# partial last group (recorded in quant_log.json for the runtimes that refuse it)
@pytest.mark.parametrize("group_size,accepted", [(-1, True), (1, True), (32, True), (96, True),
                                                 (100, True), (128, True), (4096, True),
                                                 (0, False), (-2, False), (-128, False)])
def test_group_size_rule_is_the_same_in_recipe_and_cli(tmp_path, monkeypatch, capsys, group_size,
                                                       accepted):
    rule = r"must be -1 \(one group per row\) or a positive number of columns"
    path = write(tmp_path, edited("bits = 4", f"bits = 4\ngroup_size = {group_size}"))
    if accepted:
        assert load_recipe(path).variant("main").group_size == group_size
    else:
        with pytest.raises(InputError, match=rf"{path}: \[\[variants\]\] #1 \(main\): group_size = "
                                             rf"{group_size}: {rule}"):
            load_recipe(path)
    # the CLI: a refused width stops at the option; an accepted one gets to the (missing) model
    missing = tmp_path / "no-model"
    code, _, err = run_cli(["quantize", missing, tmp_path / "out", "--method", "rtn",
                            "--group-size", group_size, "--device", "cpu"], monkeypatch, capsys)
    assert code == 2
    if accepted:
        assert str(missing) in err and "--group-size" not in err, err
    else:
        assert err.startswith(f"error: --group-size {group_size}: "), err
        assert re.search(rule, err), err


def stops_at(call, prefix: str) -> bool:
    """Whether a stage call is refused by its own check (its message starts with `prefix`); an
    accepted value goes on to fail on the missing input instead."""
    with pytest.raises(InputError) as e:
        call()
    return str(e.value).startswith(prefix)


# a calibration window is BOS + at least one text token, and at least one window is drawn: the
# recipe accepts exactly what the quantize stage's load_calibration accepts, so a recipe that
# loads never fails there after convert
@pytest.mark.parametrize("nsamples,seqlen,accepted", [(1, 0, False), (1, 1, False), (0, 2, False),
                                                      (1, 2, True), (2, 3, True)])
def test_calibration_window_rule_is_the_stages(tmp_path, nsamples, seqlen, accepted):
    from types import SimpleNamespace

    from pipeline.core.calibration import load_calibration

    path = write(tmp_path, edited('source = "calib/*.py"',
                                  f'source = "calib/*.py"\nnsamples = {nsamples}\nseqlen = {seqlen}'))
    if accepted:
        assert load_recipe(path).variant("main").seqlen == seqlen
    else:
        with pytest.raises(InputError, match=r"\[\[variants\]\] #1 \(main\): (nsamples|seqlen) = "):
            load_recipe(path)
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    assert stops_at(lambda: load_calibration(str(tmp_path / "no-text"), tokenizer, nsamples, seqlen),
                    "--nsamples") is not accepted


# an evaluation window scores seqlen - 1 predicted tokens, at least one: the recipe's [verify]
# seqlen is refused exactly when the verify stage refuses it
@pytest.mark.parametrize("seqlen,accepted", [(0, False), (1, False), (2, True), (3, True)])
def test_verify_seqlen_rule_is_the_stages(tmp_path, seqlen, accepted):
    from verify.stage import judge

    path = write(tmp_path, edited('eval = "eval"', f'eval = "eval"\nseqlen = {seqlen}'))
    if accepted:
        assert load_recipe(path).verify.seqlen == seqlen
    else:
        with pytest.raises(InputError, match=rf"\[verify\] seqlen = {seqlen}: must be at least 2"):
            load_recipe(path)
    assert stops_at(lambda: judge(fp16=tmp_path / "no-fp16", eval_text=str(tmp_path / "no-eval"),
                                  out=tmp_path / "v", seqlen=seqlen, device="cpu"),
                    "--seqlen") is not accepted


# the recipe's [convert] max_shard_size is parsed by the CLI's parse_size: the same values pass
@pytest.mark.parametrize("size,accepted", [
    ("5GB", True), ("5gb", True), ("500MB", True), ("2GiB", True), ("1024", True), ("1.5GB", True),
    ("5 GB", True), ("0GB", False), ("0", False), ("-5GB", False), ("lots", False), ("5XB", False),
    ("inf", False)])
def test_shard_size_rule_is_the_same_in_recipe_and_cli(tmp_path, monkeypatch, capsys, size,
                                                       accepted):
    path = write(tmp_path, edited("[calibration]", f'[convert]\nmax_shard_size = "{size}"\n[calibration]'))
    if accepted:
        assert load_recipe(path).convert.max_shard_size == size
    else:
        with pytest.raises(InputError, match=rf"{re.escape(str(path))}: \[convert\] max_shard_size: "):
            load_recipe(path)
    missing = tmp_path / "no-meta"
    code, _, err = run_cli(["convert", missing, tmp_path / "out", "--max-shard-size", size],
                           monkeypatch, capsys)
    assert code == 2
    if accepted:
        assert str(missing) in err and "--max-shard-size" not in err, err
    else:
        assert err.startswith("error: --max-shard-size: "), err


def test_duplicate_branches(tmp_path):
    explicit = MINIMAL + '\n[[variants]]\nbranch = "main"\nbits = 8\n'
    with pytest.raises(InputError, match=r"#2 \(main\): branch 'main' is also used by \[\[variants\]\] #1"):
        load_recipe(write(tmp_path, explicit))
    computed = MINIMAL + ('\n[[variants]]\nbits = 8\n\n[[variants]]\nbranch = "gptq-8bit-128g-actorder_False"\n'
                          "bits = 3\n")
    with pytest.raises(InputError, match="also used by"):
        load_recipe(write(tmp_path, computed))


def test_empty_variant_list(tmp_path):
    text = "variants = []\n" + edited('[[variants]]\nbranch = "main"\nbits = 4', "")
    with pytest.raises(InputError, match=r"no \[\[variants\]\]; at least the one on branch"):
        load_recipe(write(tmp_path, text))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"r.toml: invalid TOML"):
        load_recipe(write(tmp_path, "[model\nname = 1"))
    with pytest.raises(InputError, match=r"nope.toml: recipe file not found"):
        load_recipe(tmp_path / "nope.toml")


def test_extends_merges_tables_and_resolves_paths_per_file(tmp_path):
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "card.md").write_text("# card\n")
    write(base_dir, MINIMAL.replace('name = "Tiny"', 'name = "Base"\noriginal_card = "card.md"\n'
                                    'license = "llama2"'), "common.toml")
    leaf = write(tmp_path, """
        extends = "base/common.toml"

        [model]
        name = "Leaf"

        [calibration]
        nsamples = 7

        [[variants]]
        branch = "main"
        bits = 8
        group_size = 64
        """)
    r = load_recipe(leaf)
    assert r.model.name == "Leaf" and r.model.license == "llama2"           # merged key by key
    assert r.model.original_card == base_dir / "card.md"                    # base's own directory
    assert r.calibration.source == str(base_dir / "calib/*.py") and r.calibration.nsamples == 7
    assert [(v.bits, v.group_size, v.nsamples) for v in r.variants] == [(8, 64, 7)]  # list replaced
    assert r.name == "r"


def test_extends_errors(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(InputError, match="`extends` cycle"):
        load_recipe(tmp_path / "a.toml")
    with pytest.raises(InputError, match=r"missing.toml: recipe file not found \(extended by .*c.toml\)"):
        load_recipe(write(tmp_path, 'extends = "missing.toml"\n', "c.toml"))
    with pytest.raises(InputError, match="extends must be a string"):
        load_recipe(write(tmp_path, "extends = 3\n", "d.toml"))


def test_source_resolve(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    assert load_recipe(write(tmp_path, MINIMAL)).source.resolve() == tmp_path / "ckpt"
    r = load_recipe(write(tmp_path, edited('path = "ckpt"', 'env = "TINY_CKPT"')))
    monkeypatch.delenv("TINY_CKPT", raising=False)
    with pytest.raises(InputError, match=r"\$TINY_CKPT is not set"):
        r.source.resolve()
    monkeypatch.setenv("TINY_CKPT", str(tmp_path / "absent"))
    with pytest.raises(InputError, match=r"\$TINY_CKPT does not name a directory") as e:
        r.source.resolve()
    assert "absent" not in str(e.value)  # a variable's value is never shown: it may be a secret
    monkeypatch.setenv("TINY_CKPT", str(tmp_path / "ckpt"))
    assert r.source.resolve() == tmp_path / "ckpt"


def test_an_hf_source_is_a_directory_or_a_repository_at_a_revision(tmp_path):
    (tmp_path / "model").mkdir()
    hf = edited('path = "ckpt"', 'format = "hf"\npath = "model"').replace(
        'fp16_repo = "org/Tiny-fp16"\n', "")
    r = load_recipe(write(tmp_path, hf))
    assert r.source.is_hf and r.source.resolve() == tmp_path / "model"
    assert r.source.describe() == {"format": "hf", "path": "model"}
    r = load_recipe(write(tmp_path, hf.replace('path = "model"', 'repo = "org/Model"\nrevision = "v1.0"')))
    assert r.source.resolve() is None  # the job downloads it
    assert r.source.describe() == {"format": "hf", "repo": "org/Model", "revision": "v1.0"}
    assert load_recipe(write(tmp_path, MINIMAL)).source.describe() == {"format": "meta", "path": "ckpt"}


SHIPPED = sorted(p for p in RECIPES.glob("*.toml") if not p.name.startswith("_"))
CODELLAMA_SET = [  # (branch, bits, group, act-order) as quantisers published them for CodeLlama
    ("main", 4, 128, False),
    ("gptq-4bit-32g-actorder_True", 4, 32, True),
    ("gptq-4bit-64g-actorder_True", 4, 64, True),
    ("gptq-8bit-128g-actorder_True", 8, 128, True),
    ("gptq-3bit-128g-actorder_True", 3, 128, True),
]


def test_every_expected_recipe_is_shipped():
    names = {p.stem for p in SHIPPED}
    expected = {f"codellama-{s}{f}" for s in ("7b", "13b", "34b", "70b")
                for f in ("", "-python", "-instruct")}
    expected |= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "demo"}
    expected |= {f"llama-3.2-{s}{f}" for s in ("1b", "3b") for f in ("", "-instruct")}
    expected |= {"llama-3.3-70b-instruct"}  # 3.3 was released as an Instruct model only
    expected |= {"smollm2-135m-instruct"}  # an HF source: the suite's real pretrained model
    assert expected <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_recipe_is_valid(path):
    r = load_recipe(path)
    assert r.variant("main").branch == "main"
    assert r.publish.fp16_repo != r.publish.gptq_repo
    assert bool(r.publish.fp16_repo) != r.source.is_hf  # a converted model is published, a source not
    if path.stem.startswith("codellama"):
        got = [(v.branch, v.bits, v.group_size, v.act_order) for v in r.variants]
        assert got == CODELLAMA_SET
        size, *flavour = path.stem.split("-")[1:]
        assert r.source.env == "_".join(["CODELLAMA", size, *flavour]).upper()
        instruct = flavour == ["instruct"]
        assert ("[INST]" in r.model.prompt_template) == (instruct and size != "70b")
        assert ("Source: user" in r.model.prompt_template) == (instruct and size == "70b")
        assert r.model.original_card is not None and r.model.original_card.is_file()


def test_shipped_demo_points_at_the_committed_model(tmp_path):
    r = load_recipe(RECIPES / "demo.toml")
    assert r.source.path == RECIPES / "demo" / "meta"
    assert Path(r.calibration.source) == RECIPES / "demo" / "text" / "calib"
    assert Path(r.verify.eval) == RECIPES / "demo" / "text" / "eval"


def test_find_recipe_by_path_or_name(tmp_path, monkeypatch):
    path = write(tmp_path, MINIMAL, "mine.toml")
    assert find_recipe(str(path)) == path
    monkeypatch.chdir(tmp_path)
    assert find_recipe("demo").resolve() == RECIPES / "demo.toml"      # beside the package
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes", MINIMAL, "demo.toml")
    assert find_recipe("demo").resolve() == tmp_path / "recipes" / "demo.toml"  # ./recipes first
    with pytest.raises(InputError, match=r"nope: no such recipe file.*shipped: .*codellama-7b"):
        find_recipe("nope")


def test_loading_a_recipe_imports_no_torch():
    """`run --plan` and every recipe error come without torch's import time: loading the shipped
    recipes, in a fresh interpreter, leaves torch and transformers unimported."""
    import subprocess
    import sys

    code = ("import sys\nfrom pipeline.recipe import RECIPES_DIR, load_recipe\n"
            "names = [p for p in sorted(RECIPES_DIR.glob('*.toml')) if not p.name.startswith('_')]\n"
            "for p in names: load_recipe(p)\n"
            "print(len(names), sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    count, loaded = out.stdout.split(" ", 1)
    assert int(count) > 5 and loaded.strip() == "[]"
