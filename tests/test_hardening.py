"""Careless and hostile inputs through the CLI, one test per class: each gets exit 2 and a message
naming the file (and key or tensor), never a traceback, never exit 0 with a broken output, and
the input's bytes are the same afterwards. Fixtures: tiny random Llama 2-shaped models."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from meta_fixtures import build_checkpoint, refresh_checklist
from safetensors.torch import load_file, save_file
from tiny_project import recipe_text

import pipeline.quantize as stage
from pipeline.convert import convert
from pipeline.methods import QuantSpec
from pipeline.quantize import quantize

RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--device", "cpu"]


def digest(root: Path) -> str:
    """sha256 over every entry under root (or of one file): names, bytes, link targets."""
    root = Path(root)
    if root.is_file():
        return hashlib.sha256(root.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode() + b"\0")
            if p.is_symlink():
                h.update(b"link:" + os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def cli(monkeypatch, capsys):
    """`python -m pipeline ARGS` in this process: (exit code, stdout + stderr); never a
    traceback (main() turns only PipelineError into a message, anything else escapes here)."""
    def run(*args) -> tuple[int, str]:
        code, out, err = run_cli(list(args), monkeypatch, capsys)
        text = out + err
        assert "Traceback" not in text
        return code, text
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A Meta checkpoint, its fp16 conversion, an RTN variant, calibration and evaluation text."""
    d = tmp_path_factory.mktemp("built")
    build_checkpoint(d / "meta", "llama2", n_shards=2)
    convert(d / "meta", d / "fp16")
    quantize(d / "fp16", d / "rtn", QuantSpec(4, 32, False, method="rtn"), device="cpu")
    import json.decoder
    import textwrap
    (d / "cal.py").write_text(inspect.getsource(json.decoder))
    (d / "eval.py").write_text(inspect.getsource(textwrap))
    return {"root": d, "meta": d / "meta", "fp16": d / "fp16", "rtn": d / "rtn",
            "cal": d / "cal.py", "eval": d / "eval.py"}


@pytest.fixture
def work(built, tmp_path) -> dict[str, Path]:
    """Private copies of the built artifacts (tests may damage them)."""
    paths = {"root": tmp_path}
    for key in ("meta", "fp16", "rtn", "cal", "eval"):
        src = built[key]
        paths[key] = tmp_path / src.name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, paths[key])
    return paths


def verify_args(fp16: Path, out: Path, eval_text: Path, *extra) -> list:
    return ["verify", "--fp16", fp16, "--eval", eval_text, "--out", out, "--seqlen", "16",
            "--max-windows", "1", "--device", "cpu", *extra]


# ---------------------------------------------------------------- outputs never destroy inputs


@pytest.mark.parametrize("case", ["convert-same", "convert-parent", "convert-inside", "convert-link",
                                  "quantize-same", "quantize-inside", "quantize-calibration",
                                  "verify-fp16", "verify-meta", "verify-eval"])
def test_output_never_is_contains_or_lies_in_an_input(work, cli, case):
    w = work
    (w["root"] / "link").symlink_to(w["meta"])
    (w["rtn"] / "notes.py").write_text("# calibration text kept with the model\n" * 50)
    report = w["root"] / "report"  # a verify output of ours, holding the evaluation text
    report.mkdir()
    (report / "verify.json").write_text("{}")
    (report / "eval.py").write_text(w["eval"].read_text())
    argv, out, src = {
        "convert-same": (["convert", w["meta"], w["meta"]], w["meta"], w["meta"]),
        "convert-parent": (["convert", w["meta"], w["root"]], w["root"], w["meta"]),
        "convert-inside": (["convert", w["meta"], w["meta"] / "hf"], w["meta"] / "hf", w["meta"]),
        "convert-link": (["convert", w["meta"], w["root"] / "link" / "hf"], w["root"] / "link" / "hf",
                         w["meta"]),
        "quantize-same": (["quantize", w["fp16"], w["fp16"], *RTN], w["fp16"], w["fp16"]),
        "quantize-inside": (["quantize", w["fp16"], w["fp16"] / "q", *RTN], w["fp16"] / "q",
                            w["fp16"]),
        "quantize-calibration": (["quantize", w["fp16"], w["rtn"], "--calibration",
                                  w["rtn"] / "notes.py", "--nsamples", "2", "--seqlen", "16",
                                  "--device", "cpu"], w["rtn"], w["rtn"] / "notes.py"),
        "verify-fp16": (verify_args(w["fp16"], w["fp16"], w["eval"]), w["fp16"], w["fp16"]),
        "verify-meta": (verify_args(w["fp16"], w["meta"], w["eval"], "--meta", w["meta"]),
                        w["meta"], w["meta"]),
        "verify-eval": (verify_args(w["fp16"], report, report / "eval.py"), report,
                        report / "eval.py"),
    }[case]
    before = digest(w["root"])
    code, text = cli(*argv, "--force")
    assert code == 2, text
    assert f"error: {out}: the output " in text and f"the input {src}" in text
    assert any(f"the output {how} the input" in text for how in ("is", "contains", "lies inside"))
    assert digest(w["root"]) == before


@pytest.mark.parametrize("stage_name", ["convert", "quantize", "verify"])
def test_force_never_replaces_what_is_not_our_output(work, cli, stage_name):
    out = work["root"] / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    # even a file named like another stage's manifest does not make it ours
    (out / "verify.json" if stage_name != "verify" else out / "quant_log.json").write_text("{}")
    argv = {"convert": ["convert", work["meta"], out],
            "quantize": ["quantize", work["fp16"], out, *RTN],
            "verify": verify_args(work["fp16"], out, work["eval"])}[stage_name]
    manifest = {"convert": "conversion.json", "quantize": "quant_log.json",
                "verify": "verify.json"}[stage_name]
    before = digest(work["root"])
    code, text = cli(*argv, "--force")
    assert code == 2 and f"{out}: exists and is not an output of this tool (no {manifest})" in text
    assert digest(work["root"]) == before


def test_force_replaces_our_own_output(work, cli):
    """The counterpart: --force does replace what the stage wrote (its manifest is there)."""
    (work["rtn"] / "stale.bin").write_bytes(b"old")
    code, text = cli("quantize", work["fp16"], work["rtn"], *RTN, "--force")
    assert code == 0, text
    assert not (work["rtn"] / "stale.bin").exists() and (work["rtn"] / "quant_log.json").is_file()


@pytest.mark.parametrize("case", ["dangling-target", "linked-target", "partial-link",
                                  "partial-dangling", "partial-file", "parent-is-file",
                                  "read-only"])
def test_output_locations_never_follow_links(work, cli, case):
    root = work["root"]
    victim = root / "victim"
    victim.mkdir()
    (victim / "conversion.json").write_text("{}")  # looks like ours: still never touched
    (victim / "data.bin").write_bytes(b"\x01" * 64)
    out = root / "out"
    if case == "dangling-target":
        out.symlink_to(root / "nowhere")
    elif case == "linked-target":
        out.symlink_to(victim)
    elif case == "partial-link":
        (root / ".out.partial").symlink_to(victim)
    elif case == "partial-dangling":
        (root / ".out.partial").symlink_to(root / "nowhere")
    elif case == "partial-file":
        (root / ".out.partial").write_text("not ours")
    elif case == "parent-is-file":
        (root / "file").write_text("x")
        out = root / "file" / "out"
    else:
        out = Path("/proc/self/out")  # read-only for every user, root included
    message = {"dangling-target": f"{out}: is a symbolic link",
               "linked-target": f"{out}: is a symbolic link",
               "parent-is-file": f"{out}: cannot create it: {root / 'file'} is not a directory",
               "read-only": f"{out}: cannot create it: /proc/self is not writable"
               }.get(case, f"{root / '.out.partial'}: the temporary name of {out} is taken")
    before = digest(root)
    for force in ([], ["--force"]):
        code, text = cli("convert", work["meta"], out, *force)
        assert code == 2 and message in text, text
    code, text = cli("quantize", work["fp16"], out, *RTN, "--resume")
    assert code == 2 and message in text, text
    assert digest(root) == before and not (root / "nowhere").exists()


# ---------------------------------------------------------------- the job's work directory

def project(work, calibration="cal.py", eval_text="eval.py") -> Path:
    recipe = work["root"] / "tiny.toml"
    recipe.write_text(recipe_text(calibration=calibration, eval_text=eval_text))
    return recipe


def test_run_replaces_only_outputs_the_job_wrote(work, cli):
    recipe, d = project(work), work["root"] / "D"
    (d / "fp16").mkdir(parents=True)
    (d / "fp16" / "precious.bin").write_bytes(b"\x42" * 100)
    before = digest(work["meta"]), digest(d / "fp16")
    for force in ([], ["--force"]):
        code, text = cli("run", recipe, "--workdir", d, "--stage", "convert", "--device", "cpu",
                         *force)
        assert code == 2 and f"{d / 'fp16'}: exists, but {d / 'job.json'} has no record" in text
    assert (digest(work["meta"]), digest(d / "fp16")) == before
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == ["fp16", "job.log"]

    shutil.rmtree(d / "fp16")
    for force in ([], ["--force"]):  # its own output it replaces freely
        code, text = cli("run", recipe, "--workdir", d, "--stage", "convert", "--device", "cpu",
                         *force)
        assert code == 0, text
    # recorded in job.json, but the directory there now is not the job's output
    shutil.rmtree(d / "fp16")
    (d / "fp16").mkdir()
    (d / "fp16" / "precious.bin").write_bytes(b"\x42")
    code, text = cli("run", recipe, "--workdir", d, "--stage", "convert", "--device", "cpu")
    assert code == 2 and f"{d / 'fp16'}: exists and is not an output of this tool" in text
    assert (d / "fp16" / "precious.bin").read_bytes() == b"\x42"


@pytest.mark.parametrize("case", ["eval", "calibration", "params", "card"])
def test_run_checks_every_local_input_before_any_stage(work, cli, case):
    recipe = project(work, **{"eval": {"eval_text": "missing/*.py"},
                              "calibration": {"calibration": "missing/*.py"}}.get(case, {}))
    if case == "card":
        recipe.write_text(recipe.read_text().replace('name = "Tiny"',
                                                     'name = "Tiny"\noriginal_card = "card.md"'))
    if case == "params":
        p = work["meta"] / "params.json"
        p.write_text(json.dumps({**json.loads(p.read_text()), "n_heads": 0}))
    d = work["root"] / "D"
    before = digest(work["meta"])
    code, text = cli("run", recipe, "--workdir", d, "--stage", "verify", "--device", "cpu")
    assert code == 2
    assert {"eval": "[verify] eval = ", "calibration": "[[variants]] main: calibration = ",
            "params": "params.json: n_heads = 0", "card": "card.md': file not found"}[case] in text
    assert not (d / "fp16").exists() and not (d / "job.json").exists()  # no stage started
    assert digest(work["meta"]) == before


# ---------------------------------------------------------------- quantize --resume


def test_resume_never_reuses_layers_of_another_model(work, built, cli, monkeypatch, tmp_path):
    model, out = work["fp16"], tmp_path / "q"
    args = ["quantize", model, out, "--bits", "4", "--group-size", "32", "--calibration",
            work["cal"], "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--json"]
    real = stage.quantize_layer

    def interrupt_in_layer_1():
        calls = []

        def once(*a, **kw):
            if calls:
                raise KeyboardInterrupt
            calls.append(1)
            return real(*a, **kw)
        monkeypatch.setattr(stage, "quantize_layer", once)
        assert cli(*args)[0] == 130
        monkeypatch.setattr(stage, "quantize_layer", real)
        assert (tmp_path / ".q.partial" / "layers" / "00000.safetensors").is_file()

    def resumed() -> tuple[int, str]:
        code, text = cli(*args, "--resume")
        assert code == 0, text
        return json.loads(text.splitlines()[0])["resumed_layers"], text  # stdout: the JSON line

    # control: the same run resumes from its finished layer
    interrupt_in_layer_1()
    assert resumed()[0] == 1

    # the input replaced in place by another model of the same shapes: same size, same header,
    # same mtime (restored), same inode; only the weights differ
    shutil.rmtree(out)
    interrupt_in_layer_1()
    build_checkpoint(tmp_path / "meta2", "llama2", n_shards=2, seed=1)
    convert(tmp_path / "meta2", tmp_path / "other")
    target = model / "model.safetensors"
    st = target.stat()
    header = target.read_bytes()[:8 + struct.unpack("<Q", target.read_bytes()[:8])[0]]
    shutil.copyfile(tmp_path / "other" / "model.safetensors", target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.read_bytes().startswith(header) and target.stat().st_size == st.st_size
    assert target.stat().st_mtime_ns == st.st_mtime_ns and target.stat().st_ino == st.st_ino
    layers, text = resumed()
    assert layers == 0 and "(input changed); starting over" in text
    fresh = tmp_path / "fresh"
    assert cli(*[fresh if a == out else a for a in args])[0] == 0
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        if name != "quant_log.json":
            assert (fresh / name).read_bytes() == (out / name).read_bytes(), name

    # a changed spec or calibration text also starts over
    shutil.rmtree(out)
    interrupt_in_layer_1()
    args += ["--damp", "0.05"]
    layers, text = resumed()
    assert layers == 0 and "(spec changed)" in text
    shutil.rmtree(out)
    interrupt_in_layer_1()
    with open(work["cal"], "a") as f:
        f.write("\n# one more line of calibration text\n")
    layers, text = resumed()
    assert layers == 0 and "(calibration changed)" in text


# ---------------------------------------------------------------- params.json

BAD_PARAMS = [
    ("n_heads", 0), ("n_heads", "8"), ("n_heads", 4.0), ("n_heads", True), ("n_heads", 3),
    ("dim", -64), ("dim", None), ("n_layers", 4.0), ("n_layers", 0), ("n_layers", 10**12),
    ("multiple_of", 0), ("multiple_of", None), ("vocab_size", None), ("vocab_size", 0),
    ("vocab_size", -1.0), ("norm_eps", "x"), ("norm_eps", 0), ("norm_eps", float("nan")),
    ("rope_theta", "abc"), ("rope_theta", float("inf")), ("rope_theta", -1e4),
    ("n_kv_heads", 3), ("n_kv_heads", 0), ("ffn_dim_multiplier", -1.3),
    ("ffn_dim_multiplier", "1.3"), ("use_scaled_rope", "yes"), ("max_seq_len", 0),
]


@pytest.mark.parametrize("key, value", BAD_PARAMS, ids=[f"{k}={v!r}" for k, v in BAD_PARAMS])
def test_params_json_bad_values(work, cli, key, value):
    params = work["meta"] / "params.json"
    params.write_text(json.dumps({**json.loads(params.read_text()), key: value}))
    refresh_checklist(work["meta"])
    before = digest(work["meta"])
    code, text = cli("convert", work["meta"], work["root"] / "out")
    assert code == 2 and f"error: {params}: " in text and key in text, text
    assert digest(work["meta"]) == before and not (work["root"] / "out").exists()


@pytest.mark.parametrize("content", [b"\xff\xfe\x00\x81binary", b"[1, 2]", b"{\"dim\": 64",
                                     b"\x00" * 100])
def test_params_json_not_json(work, cli, content):
    (work["meta"] / "params.json").write_bytes(content)
    refresh_checklist(work["meta"])
    code, text = cli("convert", work["meta"], work["root"] / "out")
    assert code == 2 and f"{work['meta'] / 'params.json'}: " in text
    assert not (work["root"] / "out").exists()


# ---------------------------------------------------------------- config.json of an HF directory

BAD_CONFIG = [
    ("num_attention_heads", 0), ("num_attention_heads", 3), ("num_attention_heads", "4"),
    ("hidden_size", 60), ("hidden_size", 64.0), ("num_key_value_heads", 3),
    ("num_key_value_heads", 0), ("intermediate_size", None), ("vocab_size", -1),
    ("rms_norm_eps", "x"), ("rms_norm_eps", float("nan")), ("rope_theta", 0),
    ("num_hidden_layers", 2.0), ("num_hidden_layers", 10**9), ("num_hidden_layers", 1),
    ("tie_word_embeddings", "no"), ("hidden_act", "gelu"), ("head_dim", 8),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    ("max_position_embeddings", -1), ("attention_bias", True),
]


@pytest.mark.parametrize("command", ["quantize", "verify"])
@pytest.mark.parametrize("key, value", BAD_CONFIG, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG])
def test_config_json_bad_values(work, cli, command, key, value):
    cfg = work["fp16"] / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), key: value}))
    before = digest(work["fp16"])
    out = work["root"] / "out"
    argv = ["quantize", work["fp16"], out, *RTN] if command == "quantize" else \
        verify_args(work["fp16"], out, work["eval"])
    code, text = cli(*argv)
    assert code == 2 and str(cfg) in text, text
    # a layer count that disagrees with the tensors is named by the tensor it lacks or adds
    assert (f"error: {cfg}: " in text and key in text) if type(value) is not int or \
        key != "num_hidden_layers" else "tensor" in text, text
    assert digest(work["fp16"]) == before and not out.exists()


# ---------------------------------------------------------------- safetensors headers


def rewrite_header(path: Path, edit, raw: bytes | None = None) -> None:
    """Replace the header of a safetensors file by edit(header dict) (or by raw bytes), keeping
    the data section as it is."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if raw is None:
        header = json.loads(data[8:8 + n])
        edit(header)
        raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


Q = "model.layers.0.self_attn.q_proj.weight"
GATE = "model.layers.1.mlp.gate_proj.weight"


def _set(key, field, value):
    return lambda h: h[key].__setitem__(field, value)


def _shift(h):  # every tensor after q_proj moved 2 bytes: overlaps it
    begin, end = h[Q]["data_offsets"]
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] - 2, v["data_offsets"][1] - 2]


HEADER_EDITS = {
    "garbage-json": (None, b"{\"a\": [1, 2,, }  "),
    "not-utf8": (None, b"\xff\xfe{}\x80"),
    "not-an-object": (None, b"[1, 2, 3]"),
    "dtype-F16-to-I16": (_set(Q, "dtype", "I16"), None),
    "dtype-unknown": (_set(Q, "dtype", "Q4"), None),
    "dtype-F16-to-F32": (_set(Q, "dtype", "F32"), None),  # 2x the bytes its range holds
    "shape-transposed": (_set(GATE, "shape", [64, 224]), None),  # right size, wrong shape
    "shape-negative": (_set(Q, "shape", [-64, -64]), None),
    "offsets-past-end": (_set(Q, "data_offsets", [0, 10**12]), None),
    "offsets-reversed": (_set(Q, "data_offsets", [8192, 0]), None),
    "offsets-overlap": (_shift, None),
    "tensor-dropped-from-header": (lambda h: h.pop(Q), None),  # its bytes: a gap
    "tensor-extra": (lambda h: h.__setitem__("model.layers.0.extra.weight", {
        "dtype": "F16", "shape": [0], "data_offsets": [0, 0]}), None),
    "metadata-not-strings": (lambda h: h.__setitem__("__metadata__", {"format": 1}), None),
}


@pytest.mark.parametrize("command", ["quantize", "verify"])
@pytest.mark.parametrize("case", [*HEADER_EDITS, "absurd-length", "truncated", "short-file",
                                  "tensor-missing"])
def test_safetensors_header_corruption(work, cli, command, case):
    st = work["fp16"] / "model.safetensors"
    if case == "tensor-missing":
        t = load_file(st)
        del t[Q]
        save_file(t, st, metadata={"format": "pt"})
    elif case == "absurd-length":
        st.write_bytes(struct.pack("<Q", 2**62) + st.read_bytes()[8:])
    elif case == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif case == "short-file":
        st.write_bytes(b"\x05\x00")
    else:
        edit, raw = HEADER_EDITS[case]
        rewrite_header(st, edit, raw)
    before = digest(work["fp16"])
    out = work["root"] / "out"
    argv = ["quantize", work["fp16"], out, *RTN] if command == "quantize" else \
        verify_args(work["fp16"], out, work["eval"])
    code, text = cli(*argv)
    assert code == 2, text
    assert f"error: {st}: " in text or f"error: {work['fp16']}: layer 0 lacks tensor" in text, text
    tensor = {"shape-transposed": GATE, "tensor-extra": "model.layers.0.extra.weight"}.get(case, Q)
    if case.startswith(("dtype", "shape", "offsets-past", "offsets-rev", "tensor-missing",
                        "tensor-extra")):
        assert tensor in text, text
    assert digest(work["fp16"]) == before and not out.exists()


def test_a_weight_stored_as_integers_is_refused(work, cli):
    """The reported case, in full: F16 weights whose header says I16 (same bytes) were quantised
    with exit 0; the same for a file written as int16 by safetensors itself."""
    st = work["fp16"] / "model.safetensors"
    t = load_file(st)
    t[Q] = t[Q].view(torch.int16)
    save_file(t, st, metadata={"format": "pt"})
    code, text = cli("quantize", work["fp16"], work["root"] / "out", *RTN)
    assert code == 2 and f"{st}: tensor {Q} has dtype I16; expected" in text


# ---------------------------------------------------------------- numeric options


@pytest.mark.parametrize("argv, message", [
    (["convert", "{meta}", "{out}", "--max-shard-size", "0"], "--max-shard-size: size '0': must be"),
    (["convert", "{meta}", "{out}", "--max-shard-size", "-5GB"], "size '-5GB': must be at least"),
    (["convert", "{meta}", "{out}", "--max-shard-size", "inf"], "cannot parse size 'inf'"),
    (["quantize", "{fp16}", "{out}", *RTN, "--max-shard-size", "0"], "--max-shard-size: size '0'"),
    (["verify", "--fp16", "{fp16}", "--eval", "{eval}", "--out", "{out}", "--max-windows", "0"],
     "--max-windows 0: must be at least 1"),
    (["verify", "--fp16", "{fp16}", "--eval", "{eval}", "--out", "{out}", "--max-windows", "-3"],
     "--max-windows -3: must be at least 1"),
])
def test_numeric_options_out_of_range(work, cli, argv, message):
    fill = {k: str(v) for k, v in work.items()} | {"out": str(work["root"] / "out")}
    code, text = cli(*[a.format(**fill) for a in argv])
    assert code == 2 and message in text, text
    assert not (work["root"] / "out").exists()
