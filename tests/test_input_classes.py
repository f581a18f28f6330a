"""Hostile, broken, concurrent and faulty input through the CLI, one test per class (issue #19's
table): nesting, counts larger than the file, types that lie, paths, the operating system's
failures (a real full tmpfs and a real read-only mount), concurrent writers, state that moved,
names the Hub refuses, optional parts, and secrets. Each case must end in one line and exit 1, 2 or
3 with the file named; never a traceback, never a changed input, never a secret's value shown."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_runner import run_cli
from meta_fixtures import build_checkpoint, refresh_checklist
from tiny_project import RTN, build_project, recipe_text

CANARY = "hf_" + "C4nary0SecretValue1234567890abcdefXYZ"  # the shape of a Hub token


def digest(root: Path) -> str:
    """sha256 over every entry under root (or of one file)."""
    h = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(root.rglob("*"))
    for p in paths:
        h.update(str(p.relative_to(root.parent)).encode() + b"\0")
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def cli(monkeypatch, capsys):
    """`python -m pipeline ARGS` here, with a Hub token in the environment: (exit code, all
    output); asserts the common contract of every case."""
    monkeypatch.setenv("HF_TOKEN", CANARY)

    def run(*args) -> tuple[int, str]:
        code, out, err = run_cli(list(args), monkeypatch, capsys)
        text = out + err
        assert "Traceback" not in text and CANARY not in text, text
        return code, text
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build_project(tmp_path_factory.mktemp("classes"))


@pytest.fixture
def w(built, tmp_path) -> Path:
    """A private copy of everything built (tests damage it)."""
    shutil.copytree(built, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def one_line_error(text: str) -> str:
    """The error line; there must be exactly one."""
    errors = [line for line in text.splitlines() if line.startswith(("error: ", "internal error"))]
    assert len(errors) == 1, text
    return errors[0]


# ---------------------------------------------------------------- secrets and names


def test_a_secret_from_the_environment_is_never_shown(w, cli):
    """[source] env naming the token's variable: the message names the variable, never its value
    (stderr, --json and job.log); and a token that reaches a message any other way (here: a path
    the user typed) is shown as the variable's name."""
    recipe = w / "tiny.toml"
    recipe.write_text(recipe_text(source='env = "HF_TOKEN"'))
    code, text = cli("run", recipe, "--workdir", w / "new", "--json", "--device", "cpu")
    assert code == 2 and "$HF_TOKEN does not name a directory" in text
    log = (w / "new" / "job.log")
    assert not log.exists() or CANARY not in log.read_text()

    out = w / CANARY / "q"
    code, text = cli("quantize", w / "fp16", out, *RTN, "--json")
    assert code == 0 and "$HF_TOKEN/q" in text  # the path, with the secret replaced
    recipe.write_text(recipe_text())
    code, text = cli("run", recipe, "--workdir", w / CANARY, "--stage", "convert", "--device", "cpu")
    assert code == 0 and CANARY not in (w / CANARY / "job.log").read_text()


@pytest.mark.parametrize("name", ["../../Escaped", "/tmp/Escaped", "a/b", "..", "Tiny\n", "",
                                  "x" * 200, ".hidden"])
def test_a_model_name_cannot_leave_the_work_directory(w, cli, name):
    recipe = w / "tiny.toml"
    recipe.write_text(recipe_text(name=json.dumps(name)[1:-1]) +
                      '\n[[gguf]]\ntype = "F16"\n')
    recipe.write_text(recipe.read_text().replace('gptq_repo = "org/Tiny-GPTQ"',
                                                 'gptq_repo = "org/Tiny-GPTQ"\n'
                                                 'gguf_repo = "org/Tiny-GGUF"'))
    before = sorted(p.name for p in w.parent.iterdir())
    code, text = cli("run", recipe, "--workdir", w / "jobdir", "--stage", "gguf")
    assert code == 2 and "[model] name" in one_line_error(text)
    assert sorted(p.name for p in w.parent.iterdir()) == before
    assert not (w / "jobdir").exists()


@pytest.mark.parametrize("key, value, problem", [
    ("fp16_repo", "org/x..y", "Cannot have -- or .."),
    ("fp16_repo", "org/x--y", "Cannot have -- or .."),
    ("fp16_repo", "org/name\\n", "alphanumeric"),
    ("fp16_repo", "org/a/b", "OWNER/NAME"),
    ("fp16_repo", "org/x.git", "cannot end by '.git'"),
    ("fp16_repo", "org/-x", "alphanumeric"),
    ("branch", "main\\n", "branch"),
    ("branch", "a..b", "branch"),
    ("branch", "v1.lock", "branch"),
    ("branch", "../x", "branch"),
])
def test_names_the_hub_refuses_are_refused_before_anything_runs(w, cli, key, value, problem):
    text = recipe_text()
    if key == "branch":
        text = text.replace("\n[verify]", f'\n[[variants]]\nbranch = "{value}"\nbits = 8\n\n[verify]')
    else:
        text = text.replace('fp16_repo = "org/Tiny-fp16"', f'fp16_repo = "{value}"')
    (w / "tiny.toml").write_text(text)
    code, out = cli("run", w / "tiny.toml", "--workdir", w / "jobdir", "--dry-run")
    assert code == 2 and problem in one_line_error(out) and "tiny.toml" in out
    assert not (w / "jobdir").exists()


# ---------------------------------------------------------------- nesting


def nest(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("kind", ["params.json", "checklist.chk", "config.json",
                                  "safetensors header", "calibration .jsonl", "tokenizer.json",
                                  "verify.json", "job.json", "recipe", "extends"])
def test_nesting_tens_of_thousands_deep(w, cli, kind):
    deep = nest(40_000)
    job = w / "job"
    argv = {"params.json": ["convert", w / "meta", w / "out"],
            "checklist.chk": ["convert", w / "meta", w / "out"],
            "config.json": ["quantize", w / "fp16", w / "out", *RTN],
            "safetensors header": ["quantize", w / "fp16", w / "out", *RTN],
            "tokenizer.json": ["verify", "--fp16", w / "fp16", "--eval", w / "eval.py", "--out",
                               w / "v", "--seqlen", "16", "--max-windows", "1", "--device", "cpu"],
            "calibration .jsonl": ["quantize", w / "fp16", w / "out", "--calibration",
                                   w / "cal.jsonl", "--nsamples", "2", "--seqlen", "16",
                                   "--device", "cpu"],
            "verify.json": ["publish", w / "tiny.toml", "--workdir", job, "--dry-run"],
            "job.json": ["run", w / "tiny.toml", "--workdir", job, "--stage", "convert"],
            "recipe": ["run", w / "tiny.toml", "--workdir", w / "jobdir"],
            "extends": ["run", w / "tiny.toml", "--workdir", w / "jobdir"]}[kind]
    target = {"params.json": w / "meta" / "params.json", "config.json": w / "fp16" / "config.json",
              "tokenizer.json": w / "fp16" / "tokenizer.json",
              "verify.json": job / "verify" / "verify.json", "job.json": job / "job.json",
              "recipe": w / "tiny.toml", "checklist.chk": w / "meta" / "checklist.chk"}.get(kind)
    if kind in ("params.json", "config.json", "verify.json", "job.json", "tokenizer.json"):
        target.write_text('{"x": ' + deep + "}")
    elif kind == "checklist.chk":
        target.write_text(deep)  # a checklist is lines, not JSON: refused as such
    elif kind == "recipe":
        target.write_text(recipe_text() + "\n[extra]\nx = " + nest(20_000) + "\n")
    elif kind == "extends":
        (w / "base.toml").write_text("x = " + nest(20_000) + "\n")
        target = w / "base.toml"
        (w / "tiny.toml").write_text('extends = "base.toml"\n' + recipe_text())
    elif kind == "calibration .jsonl":
        target = w / "cal.jsonl"
        target.write_text('{"text": "ok"}\n{"text": ' + deep + "}\n")
    else:  # a safetensors header that is valid framing around deep JSON
        target = w / "fp16" / "model.safetensors"
        data = target.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        raw = ('{"x": ' + deep + "}").encode()
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    if kind == "params.json":
        refresh_checklist(w / "meta")
    before = digest(target)
    code, text = cli(*argv)
    line = one_line_error(text)
    assert code == 2, text
    assert str(target) in line or target.name in line, line
    assert digest(target) == before


# ---------------------------------------------------------------- counts and sizes


def tiktoken_checkpoint(d: Path, edit) -> Path:
    build_checkpoint(d, "llama3", n_shards=1)
    tok = d / "tokenizer.model"
    lines = tok.read_bytes().splitlines()
    tok.write_bytes(b"\n".join(edit(lines)) + b"\n")
    refresh_checklist(d)
    return d


@pytest.mark.parametrize("case", ["shard size of 400 digits", "tiktoken rank beyond int64",
                                  "duplicate tiktoken rank", "skipped tiktoken rank",
                                  "GGUF declaring 2^62 tensors", "GGUF array of 2^60 items"])
def test_counts_larger_than_the_file(w, cli, case):
    if case == "shard size of 400 digits":
        code, text = cli("convert", w / "meta", w / "out", "--max-shard-size", "9" * 400)
        assert code == 2 and "--max-shard-size" in one_line_error(text)
        return
    if case.startswith("GGUF"):
        gguf = w / "m.gguf"
        assert cli("gguf", w / "fp16", gguf)[0] == 0
        data = bytearray(gguf.read_bytes())
        if "tensors" in case:
            struct.pack_into("<Q", data, 8, 1 << 62)
        else:
            at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
            struct.pack_into("<Q", data, at, 1 << 60)
        gguf.write_bytes(bytes(data))
        code, text = cli("verify", "--fp16", w / "fp16", "--eval", w / "eval.py", "--out",
                         w / "v", "--seqlen", "16", "--max-windows", "1", "--device", "cpu",
                         "--gguf", gguf)
        assert code == 2 and str(gguf) in one_line_error(text)
        return

    def edit(lines: list[bytes]) -> list[bytes]:
        token, _ = lines[5].split()
        if case == "tiktoken rank beyond int64":
            return [*lines[:5], token + b" " + b"9" * 30, *lines[6:]]
        if case == "duplicate tiktoken rank":
            other = lines[6].split()[0]
            return [*lines[:6], other + b" 5", *lines[7:]]
        return lines[:5] + lines[6:]  # rank 5 missing
    src = tiktoken_checkpoint(w / "meta3", edit)
    code, text = cli("convert", src, w / "out")
    assert code == 2 and "tokenizer.model" in one_line_error(text)


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("case", ["safetensors dtype a list", "safetensors shape a dict",
                                  "job.json a list", "job.json binary", "job.json record a list",
                                  "job.json written a string",
                                  "verify.json passed a string", "verify.json artifacts missing",
                                  "verify.json relpath a number", "params.json a list"])
def test_values_of_the_wrong_type(w, cli, case):
    job = w / "job"
    if case.startswith("safetensors"):
        target = w / "fp16" / "model.safetensors"
        data = target.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        if "dtype" in case:
            header[name]["dtype"] = ["F16"]
        else:
            header[name]["shape"] = {"a": 1}
        raw = json.dumps(header).encode()
        target.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
        argv = ["quantize", w / "fp16", w / "out", *RTN]
    elif case.startswith("job.json"):
        target = job / "job.json"
        record = json.loads(target.read_text())
        content = {"job.json a list": b"[1, 2]", "job.json binary": b"\x00\xffPK\x03\x04",
                   "job.json record a list": json.dumps(
                       {**record, "stages": {"convert": [1]}}).encode(),
                   "job.json written a string": json.dumps(
                       {**record, "stages": {"convert": {**record["stages"]["convert"],
                                                         "written": "fp16"}}}).encode()}[case]
        target.write_bytes(content)
        argv = ["run", w / "tiny.toml", "--workdir", job, "--stage", "convert"]
    elif case.startswith("verify.json"):
        target = job / "verify" / "verify.json"
        report = json.loads(target.read_text())
        if "passed" in case:
            report["passed"] = "yes"
        elif "missing" in case:
            del report["artifacts"]
        else:
            report["artifacts"]["fp16"]["relpath"] = 7
        target.write_text(json.dumps(report))
        argv = ["publish", w / "tiny.toml", "--workdir", job, "--dry-run"]
    else:
        target = w / "meta" / "params.json"
        target.write_text("[64, 2]")
        refresh_checklist(w / "meta")
        argv = ["convert", w / "meta", w / "out"]
    before = digest(target)
    code, text = cli(*argv)
    assert code == 2 and str(target) in one_line_error(text), text
    assert digest(target) == before


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("case", ["NUL byte", "name over 255 bytes", "path over 4095 bytes",
                                  "undecodable bytes", "symlink loop as input",
                                  "symlink loop in extends", "checklist.chk a loop",
                                  "verify.json a loop", "workdir a regular file",
                                  "calibration glob through a link loop"])
def test_paths(w, cli, case):
    loop = w / "loop"
    loop.symlink_to(w / "loop2")
    (w / "loop2").symlink_to(loop)
    job, recipe = w / "job", w / "tiny.toml"
    argv, named = {
        "NUL byte": (["convert", w / "meta", f"{w}/out\0x"], "NUL byte"),
        "name over 255 bytes": (["convert", w / "meta", w / ("n" * 300)], "300 bytes"),
        "path over 4095 bytes": (["quantize", w / "fp16", "/".join(["d" * 200] * 25), *RTN],
                                 "bytes long"),
        "undecodable bytes": (["convert", w / "meta", os.fsdecode(b"out\xff\xfe")],
                              "not valid UTF-8"),
        "symlink loop as input": (["quantize", loop, w / "out", *RTN], "symbolic-link loop"),
        "symlink loop in extends": (["run", recipe, "--workdir", w / "jobdir"], "loop"),
        "checklist.chk a loop": (["convert", w / "meta", w / "out"], "checklist.chk"),
        "verify.json a loop": (["publish", recipe, "--workdir", job, "--dry-run"], "verify.json"),
        "workdir a regular file": (["run", recipe, "--workdir", w / "eval.py"],
                                   "exists and is not a directory"),
        "calibration glob through a link loop": (["quantize", w / "fp16", w / "out",
                                                  "--calibration", f"{w}/cal/**/*.txt",
                                                  "--nsamples", "2", "--seqlen", "16",
                                                  "--device", "cpu", "--json"], None),
    }[case]
    if case == "symlink loop in extends":
        recipe.write_text('extends = "loop"\n' + recipe_text())
    if case == "checklist.chk a loop":
        (w / "meta" / "checklist.chk").unlink()
        (w / "meta" / "checklist.chk").symlink_to(w / "meta" / "checklist.chk")
    if case == "verify.json a loop":
        (job / "verify" / "verify.json").unlink()
        (job / "verify" / "verify.json").symlink_to(job / "verify" / "verify.json")
    if case == "calibration glob through a link loop":
        (w / "cal").mkdir()
        (w / "cal" / "a.txt").write_text((w / "cal.py").read_text())
        (w / "cal" / "back").symlink_to(w / "cal")
        (w / "cal" / "back2").symlink_to(w / "cal")
    before = digest(w / "meta"), digest(w / "fp16")
    code, text = cli(*argv)
    if named is None:  # followed into no link: the one file, once
        assert code == 0, text
        assert json.loads(text.splitlines()[0])["calibration"]["files"] == 1
    else:
        assert code == 2 and named in one_line_error(text), text
    assert (digest(w / "meta"), digest(w / "fp16")) == before


# ---------------------------------------------------------------- the operating system


@contextmanager
def mounted(where: Path, *options: str):
    """A real file system mounted at `where` (tmpfs of a given size, or a read-only bind)."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(directory: Path, leave: int) -> None:
    """Fill a file system until at most `leave` bytes are free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free > leave:
        with open(directory / "filler", "wb") as f:
            try:
                f.write(b"\0" * (free - leave))
            except OSError:
                pass


@pytest.mark.parametrize("stage", ["quantize", pytest.param("verify", marks=pytest.mark.slow), "publish",
                                   "convert", "gguf"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(w, cli, tmp_path, stage):
    disk = tmp_path / "disk"
    with mounted(disk, "-t", "tmpfs", "-o", "size=2m", "tmpfs"):
        fill(disk, 4096 if stage in ("verify", "publish") else 64 << 10)  # less than each writes
        argv = {"quantize": ["quantize", w / "fp16", disk / "out", *RTN],
                "convert": ["convert", w / "meta", disk / "out"],
                "gguf": ["gguf", w / "fp16", disk / "out.gguf"],
                "verify": ["verify", "--fp16", w / "fp16", "--eval", w / "eval.py", "--out",
                           disk / "out", "--seqlen", "16", "--max-windows", "1", "--device",
                           "cpu", "--prompt", "x" * 1000] + ["--prompt", "y"] * 50,
                "publish": ["publish", w / "tiny.toml", "--workdir", w / "job", "--dry-run",
                            "--plan-dir", disk / "out"]}[stage]
        if stage == "publish":
            assert cli("run", w / "tiny.toml", "--workdir", w / "job", "--stage", "verify")[0] == 0
        before = digest(w / "meta"), digest(w / "fp16")
        code, text = cli(*argv)
        line = one_line_error(text)
        assert code == 1 and "no space left on the device (ENOSPC)" in line, text
        assert str(disk) in line
        left = sorted(p.name for p in disk.iterdir())
        if stage == "quantize":  # its finished layers are kept, and said to be, for --resume
            assert left == [".out.partial", "filler"]
            assert f"kept the partial output {disk / '.out.partial'} for --resume" in line
        else:
            assert left == ["filler"] and "removed the partial output" in line
        assert (digest(w / "meta"), digest(w / "fp16")) == before


def test_a_read_only_file_system_for_run(w, cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "job").mkdir()
    with mounted(ro, "--bind", "-o", "ro", str(ro)):
        code, text = cli("run", w / "tiny.toml", "--workdir", ro / "job", "--stage", "convert")
        assert code == 2 and "read-only file system (EROFS)" in one_line_error(text)
        code, text = cli("run", w / "tiny.toml", "--workdir", ro / "new", "--stage", "convert")
        assert code == 2 and "read-only file system (EROFS)" in one_line_error(text)


# ---------------------------------------------------------------- concurrency and resume


HOLD = """
import sys, time
from pathlib import Path
from pipeline.core.output import exclusive
with exclusive(Path(sys.argv[1])):
    Path(sys.argv[2]).touch()
    time.sleep(60)
"""


def test_two_writers_of_one_output_exclude_each_other(w, cli):
    """Another process building the same output (here: holding its lock as every stage does)
    makes quantize, convert and gguf refuse at once, leaving that writer's partial output alone."""
    out, ready = w / "out", w / "ready"
    (w / ".out.partial").mkdir()
    (w / ".out.partial" / "theirs").write_text("the other writer's work")
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready)])
    try:
        while not ready.exists():
            assert other.poll() is None
        for argv in (["quantize", w / "fp16", out, *RTN], ["convert", w / "meta", out],
                     ["quantize", w / "fp16", out, *RTN, "--resume"]):
            code, text = cli(*argv)
            assert code == 2 and "another process is writing it" in one_line_error(text)
        assert (w / ".out.partial" / "theirs").read_text() == "the other writer's work"
    finally:
        other.kill()
        other.wait()
    code, text = cli("quantize", w / "fp16", out, *RTN)  # the lock died with its holder
    assert code == 0, text


def test_resume_over_a_damaged_layer_redoes_it(w, cli, monkeypatch):
    import pipeline.quantize as stage

    args = ["quantize", w / "fp16", w / "q", "--bits", "4", "--group-size", "32", "--calibration",
            w / "cal.py", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--json"]
    real = stage.write_model

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(stage, "write_model", interrupted)
    assert cli(*args)[0] == 130
    monkeypatch.setattr(stage, "write_model", real)
    layers = w / ".q.partial" / "layers"
    assert sorted(p.name for p in layers.iterdir()) == ["00000.safetensors", "00001.safetensors"]
    layer1 = layers / "00001.safetensors"
    layer1.write_bytes(layer1.read_bytes()[:-100])  # a torn write
    code, text = cli(*args, "--resume")
    assert code == 0 and "00001.safetensors is damaged; layer 1 is quantised again" in text
    assert json.loads(text.splitlines()[0])["resumed_layers"] == 1
    code, text = cli(*[w / "fresh" if a == w / "q" else a for a in args])
    assert code == 0
    for p in (w / "fresh").glob("*.safetensors"):
        assert p.read_bytes() == (w / "q" / p.name).read_bytes()


# ---------------------------------------------------------------- state that moved


def test_a_moved_work_directory_runs_again_without_force(w, cli):
    moved = w / "elsewhere" / "job2"
    moved.parent.mkdir()
    shutil.move(w / "job", moved)
    code, text = cli("run", w / "tiny.toml", "--workdir", moved, "--dry-run", "--json")
    assert code == 0, text
    result = json.loads(text[:text.rindex("}") + 1][text.index("{"):])
    status = {r["stage"]: r["status"] for r in result["stages"]}
    assert status == {"convert": "reused", "quantize/main": "reused", "verify": "reused",
                      "publish": "dry run"}, [r["reason"] for r in result["stages"]]


# ---------------------------------------------------------------- optional parts and bugs


def test_verify_gguf_without_llama_cpp(w, cli, monkeypatch):
    assert cli("gguf", w / "fp16", w / "m.gguf")[0] == 0
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    code, text = cli("verify", "--fp16", w / "fp16", "--eval", w / "eval.py", "--out", w / "v",
                     "--seqlen", "16", "--max-windows", "1", "--device", "cpu", "--gguf",
                     w / "m.gguf")
    assert code in (1, 2) and "llama-cpp-python is not installed" in one_line_error(text)


def test_a_chat_template_that_raises(w, cli):
    (w / "fp16" / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    code, text = cli("verify", "--fp16", w / "fp16", "--eval", w / "eval.py", "--out", w / "v",
                     "--seqlen", "16", "--max-windows", "1", "--device", "cpu",
                     "--chat-prompt", "hi")
    assert code == 2 and "chat template fails" in one_line_error(text)
    assert not (w / "v").exists()


def test_an_unexpected_error_is_one_line_and_a_crash_report(w, cli, monkeypatch):
    import pipeline.convert as stage

    def bug(*a, **kw):
        raise ZeroDivisionError(f"a bug holding {CANARY}")
    monkeypatch.setattr(stage, "convert", bug)
    code, text = cli("convert", w / "meta", w / "out")
    line = one_line_error(text)
    assert code == 1 and line.startswith("internal error: ZeroDivisionError: a bug holding $HF_TOKEN")
    report = Path(line.split("the traceback is in ")[1].rstrip(")"))
    crash = report.read_text()
    assert "Traceback" in crash and "ZeroDivisionError" in crash and CANARY not in crash
    report.unlink()
