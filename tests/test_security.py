"""Security: a recipe cannot make the pipeline read files outside its folder into anything it
writes or uploads; credentials are recognised without being repeated; checklist.chk names files
of its own directory only. The malicious inputs are built here; each must give exit 2 with a
message naming the file and key, no traceback, and leave every input byte unchanged.
(The publish-side refusals, against the local Hub, are in test_publish.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from cli_runner import run_cli
from meta_fixtures import build_checkpoint

from pipeline.core.errors import CheckFailed, InputError
from pipeline.credentials import PATTERNS, find_credentials, masked_url, strip_url
from pipeline.recipe import ALLOW_ENV, MAX_CARD_BYTES, load_recipe

GOLDEN = Path(__file__).resolve().parent / "golden"

RECIPE = """
[model]
name = "Tiny"
original_card = "card.md"

[source]
path = "meta"

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


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under root: file bytes, or where a link points (FIFOs are never opened)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[key] = f"-> {os.readlink(p)}"
        elif p.is_file():
            out[key] = p.read_bytes()
    return out


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A recipe folder (card, calibration and eval text, a checkpoint directory) and, beside it,
    a folder the recipe must not reach."""
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    root = tmp_path / "project"
    for d in ("meta", "calib", "eval"):
        (root / d).mkdir(parents=True)
    (root / "card.md").write_text("# Tiny\n\nThe original card.\n")
    (root / "calib" / "a.py").write_text("x = 1\n")
    (root / "eval" / "b.py").write_text("y = 2\n")
    (root / "meta" / "params.json").write_text("{}")
    (root / "recipe.toml").write_text(RECIPE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("HF_TOKEN=hf_notREALbutLOOKSlikeONE0123456789abcd\n")
    return root


def edit(project: Path, old: str, new: str) -> Path:
    path = project / "recipe.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def refused(path: Path, key: str, match: str, allow=()) -> str:
    with pytest.raises(InputError, match=match) as e:
        load_recipe(path, allow)
    message = str(e.value)
    assert str(path) in message and key in message
    return message


@pytest.mark.parametrize("card", ["/proc/self/environ", "../../../../../../../../etc/passwd",
                                  "../outside/secret.md", "~/.bash_history"])
def test_original_card_outside_the_recipe_folder_is_refused(project, card):
    path = edit(project, 'original_card = "card.md"', f'original_card = "{card}"')
    before = snapshot(project.parent)
    message = refused(path, "[model] original_card", "outside the recipe's folder")
    assert "--allow-dir" in message and ALLOW_ENV in message
    assert snapshot(project.parent) == before


def test_symlink_out_of_the_folder_is_refused(project):
    (project / "card.md").unlink()
    (project / "card.md").symlink_to(project.parent / "outside" / "secret.md")
    message = refused(project / "recipe.toml", "[model] original_card", "outside the recipe's folder")
    assert "through" in message and "hf_" not in message  # names the link, never shows the content


@pytest.mark.parametrize("kind, match", [
    ("fifo", "not a regular file"),
    ("directory", "not a regular file"),
    ("binary", "not UTF-8 text"),
    ("nul", "not UTF-8 text"),
    ("huge", f"larger than {MAX_CARD_BYTES // 1024} KiB"),
    ("missing", "file not found"),
])
def test_original_card_must_be_a_small_regular_text_file(project, kind, match):
    card = project / "card.md"
    card.unlink()
    if kind == "fifo":
        os.mkfifo(card)  # opening it for reading must not wait for a writer
    elif kind == "directory":
        card.mkdir()
    elif kind == "binary":
        card.write_bytes(bytes(range(256)))
    elif kind == "nul":
        card.write_bytes(b"# card\0\0\0")
    elif kind == "huge":
        card.write_text("x" * (MAX_CARD_BYTES + 1))
    before = snapshot(project)
    refused(project / "recipe.toml", "[model] original_card", match)
    assert snapshot(project) == before


def test_a_card_of_exactly_the_limit_loads(project):
    (project / "card.md").write_text("é" * (MAX_CARD_BYTES // 2))  # 2 bytes each in UTF-8
    assert load_recipe(project / "recipe.toml").model.original_card_text == "é" * (MAX_CARD_BYTES // 2)


@pytest.mark.parametrize("old, new, key", [
    ('path = "meta"', 'path = "/"', "[source] path"),
    ('path = "meta"', 'path = "../outside"', "[source] path"),
    ('source = "calib/*.py"', 'source = "../outside/*.md"', "[calibration] source"),
    ('source = "calib/*.py"', 'source = "/etc/*"', "[calibration] source"),
    ('eval = "eval"', 'eval = "eval/../../outside"', "[verify] eval"),
    ('bits = 4', 'bits = 4\ncalibration = "../outside"', "[[variants]] calibration"),
])
def test_every_recipe_path_is_confined(project, old, new, key):
    refused(edit(project, old, new), key, "outside the recipe's folder")


@pytest.mark.parametrize("old, new, key, link", [
    ('source = "calib/*.py"', 'source = "calib/*.py"', "[calibration] source", "calib/leak.py"),
    ('source = "calib/*.py"', 'source = "calib/**/*.py"', "[calibration] source", "calib/sub/leak.py"),
    ('eval = "eval"', 'eval = "eval"', "[verify] eval", "eval/leak.py"),
    ('path = "meta"', 'path = "meta"', "[source] path", "meta/tokenizer.model"),
])
def test_links_out_of_a_named_directory_or_glob_are_refused(project, old, new, key, link):
    (project / link).parent.mkdir(parents=True, exist_ok=True)
    (project / link).symlink_to(project.parent / "outside" / "secret.md")
    refused(edit(project, old, new), key, "outside the recipe's folder")


def test_extends_is_confined(project):
    (project.parent / "outside" / "base.toml").write_text(RECIPE)
    path = project / "leaf.toml"
    path.write_text('extends = "../outside/base.toml"\n')
    refused(path, "extends", "outside the recipe's folder")


def test_allowed_folders_and_the_source_env_are_the_users_choice(project, monkeypatch):
    outside = project.parent / "outside"
    path = edit(project, 'original_card = "card.md"', f'original_card = "{outside / "secret.md"}"')
    text = outside / "text"
    text.mkdir()
    (text / "c.py").write_text("z = 3\n")
    edit(project, 'source = "calib/*.py"', f'source = "{text}/*.py"')
    assert load_recipe(path, [outside]).model.original_card == outside / "secret.md"
    monkeypatch.setenv(ALLOW_ENV, f"/nonexistent-but-listed-first{os.pathsep}{outside}")
    with pytest.raises(InputError, match="nonexistent-but-listed-first is not a directory"):
        load_recipe(path)
    monkeypatch.setenv(ALLOW_ENV, str(outside))
    assert load_recipe(path).calibration.source == f"{text}/*.py"
    monkeypatch.delenv(ALLOW_ENV)
    # [source] env names the checkpoint through the user's environment: not confined
    monkeypatch.setenv("TINY_META", str(outside))
    r = load_recipe(edit(project, 'path = "meta"', 'env = "TINY_META"'), [outside])
    assert r.source.resolve() == outside
    # hf: datasets are not paths
    edit(project, f'source = "{text}/*.py"', 'source = "hf:org/data:train:text"')
    assert load_recipe(path, [outside]).calibration.source == "hf:org/data:train:text"


def test_cli_refuses_with_exit_2_and_allow_dir_lets_it_through(project, monkeypatch, capsys):
    outside = project.parent / "outside"
    path = edit(project, 'original_card = "card.md"', 'original_card = "/proc/self/environ"')
    for args in (["publish", str(path), "--dry-run", "--workdir", str(project / "w")],
                 ["run", str(path), "--workdir", str(project / "w"), "--dry-run"]):
        code, out, err = run_cli(args, monkeypatch, capsys)
        assert code == 2 and "Traceback" not in err and out == ""
        assert f"{path}: [model] original_card = '/proc/self/environ' reaches" in err
    assert not (project / "w").exists()
    # allowed, the card loads and each command goes on to its next step
    edit(project, "/proc/self/environ", str(outside / "secret.md"))
    code, out, err = run_cli(["publish", str(path), "--dry-run", "--workdir", str(project / "w"),
                              "--allow-dir", str(outside)], monkeypatch, capsys)
    assert code == 2 and "verify report missing" in err
    code, out, err = run_cli(["run", str(path), "--workdir", str(project / "w"), "--stage", "convert",
                              "--allow-dir", str(outside)], monkeypatch, capsys)
    assert code == 2 and "original_card" not in err and "Traceback" not in err


# ---------------------------------------------------------------- credentials


TOKEN_LIKE = "hf_" + "aB3" * 12
CREDENTIALS = {  # text holding one credential -> the kind find_credentials must report
    f"see {TOKEN_LIKE} here": "Hugging Face token",
    "pip install --index-url https://alice:pa55word@pypi.example.com/simple": "URL with a password",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n": "private key block",
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE": "AWS access key id",
    "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY": "credential assignment",
    "GITHUB_TOKEN=ghp_" + "x" * 36: "GitHub token",
}


@pytest.mark.parametrize("text", CREDENTIALS)
def test_credential_shapes_are_found_and_not_repeated(text):
    found = find_credentials("# card\n\n" + text, [])
    assert any(CREDENTIALS[text] in f for f in found), found
    assert all("line 3" in f for f in found)
    secret = text.split()[-1]
    assert not any(secret in f for f in found)


def test_values_in_use_are_found_wherever_they_are():
    found = find_credentials("a\nb\nprefix-s3cr3t-VALUE-suffix\n", ["s3cr3t-VALUE"])
    assert found == ["a secret in use here (a token or an environment variable's value) (line 3)"]


def test_real_cards_hold_no_credential_shape():
    """No false alarm on what publish renders: the reviewed golden cards and the shipped cards."""
    cards = [*GOLDEN.glob("*.md"), *(GOLDEN.parent.parent / "recipes" / "cards").glob("*.md")]
    assert len(cards) >= 4
    for card in cards:
        assert find_credentials(card.read_text(), []) == [], card
    assert len(PATTERNS) >= 6


@pytest.mark.parametrize("url, bare, shown", [
    ("https://user:pass@hub.example.com/x", "https://hub.example.com/x", "https://***@hub.example.com/x"),
    ("http://tok@127.0.0.1:8080", "http://127.0.0.1:8080", "http://***@127.0.0.1:8080"),
    ("https://hub.example.com", "https://hub.example.com", "https://hub.example.com"),
])
def test_urls_lose_their_credentials(url, bare, shown):
    assert strip_url(url)[0] == bare and masked_url(url) == shown


def test_percent_encoded_password_is_known_both_ways():
    assert strip_url("https://u:p%40ss@h")[1] == ["u", "p%40ss", "p@ss"]


# ---------------------------------------------------------------- checklist.chk


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return build_checkpoint(tmp_path / "meta", "llama2", 2)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("entry, match", [
    ("absolute", r"checklist\.chk:5: '/.*secret\.bin' is not a plain file name"),
    ("dotdot", r"checklist\.chk:5: '\.\./secret\.bin' is not a plain file name"),
    ("subdir", r"checklist\.chk:5: 'sub/x\.bin' is not a plain file name"),
    ("link", r"checklist\.chk lists \['link\.bin'\], links to files outside"),
    ("binary", r"checklist\.chk: not UTF-8 text"),
])
def test_checklist_names_files_of_its_own_directory_only(checkpoint, tmp_path, entry, match,
                                                         monkeypatch, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not part of the checkpoint")
    chk = checkpoint / "checklist.chk"
    line = {"absolute": f"{md5(secret)}  {secret}", "dotdot": f"{md5(secret)}  ../secret.bin",
            "subdir": f"{md5(secret)}  sub/x.bin", "link": f"{md5(secret)}  link.bin"}.get(entry)
    if entry == "link":
        (checkpoint / "link.bin").symlink_to(secret)
    if entry == "binary":
        chk.write_bytes(b"\xff\xfe\x00\x81" + chk.read_bytes())
    else:
        assert len(chk.read_text().splitlines()) == 4
        chk.write_text(chk.read_text() + line + "\n")
    before = snapshot(tmp_path)
    code, out, err = run_cli(["convert", str(checkpoint), str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before


def test_checklist_that_omits_a_shard_is_not_recorded_as_verified(checkpoint, tmp_path,
                                                                  monkeypatch, capsys):
    chk = checkpoint / "checklist.chk"
    chk.write_text("".join(l + "\n" for l in chk.read_text().splitlines()
                           if not l.endswith("consolidated.01.pth")))
    code, out, err = run_cli(["convert", str(checkpoint), str(tmp_path / "out"), "--json"],
                             monkeypatch, capsys)
    assert code == 0, err
    source = json.loads(out)["source"]
    assert source == json.loads((tmp_path / "out" / "conversion.json").read_text())["source"]
    assert source["checksums"] == "partial"
    assert source["md5_unchecked"] == ["consolidated.01.pth"]
    assert sorted(source["md5_checked"]) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    # the unchecked shard's md5 is still recorded: computed here, independently
    assert source["files"]["consolidated.01.pth"]["md5"] == md5(checkpoint / "consolidated.01.pth")
    assert "md5 NOT checked against checklist.chk (partial) for: consolidated.01.pth" in err


def test_full_checklist_is_verified(checkpoint, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(["convert", str(checkpoint), str(tmp_path / "out"), "--json"],
                             monkeypatch, capsys)
    assert code == 0, err
    source = json.loads(out)["source"]
    assert source["checksums"] == "verified" and source["md5_unchecked"] == []
    assert "md5 of all 4 source files verified against checklist.chk" in err


# ---------------------------------------------------------------- verify records what it ran on


def test_verify_records_its_inputs_and_publish_matches_them_to_the_conversion(tmp_path):
    """A real convert + verify: the report's inputs name the Meta files by size and md5 (computed
    here with hashlib) and the fp16 files by fingerprint; publish's checks accept them, and refuse
    the same fp16 verified against another checkpoint."""
    from meta_fixtures import corpus

    from pipeline.convert import convert
    from verify.report import check_inputs, check_verdict, read_report
    from verify.stage import judge

    meta = build_checkpoint(tmp_path / "meta", "llama2", 2)
    other = build_checkpoint(tmp_path / "other", "llama2", 2, seed=1)
    convert(meta, tmp_path / "fp16")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.txt").write_text(corpus()[:6000])
    args = dict(fp16=tmp_path / "fp16", eval_text=str(tmp_path / "eval"), seqlen=64, max_windows=2,
                prompts=["def main():"], device="cpu")
    judge(meta=meta, out=tmp_path / "v", **args)
    path = tmp_path / "v" / "verify.json"
    report = read_report(path)
    files = report.inputs["meta"]["files"]
    for name in ("consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"):
        data = (meta / name).read_bytes()
        assert files[name] == {"bytes": len(data), "md5": hashlib.md5(data).hexdigest()}
    assert report.inputs["eval_sha256"] == report.eval["sha256"]
    fp16_files = sorted(report.artifacts["fp16"]["files"].items())
    assert report.inputs["fp16"] == hashlib.sha256(json.dumps(fp16_files).encode()).hexdigest()
    conversion = json.loads((tmp_path / "fp16" / "conversion.json").read_text())
    check_verdict(report, ["fp16"], path)
    check_inputs(report, path, conversion)

    judge(meta=other, out=tmp_path / "v2", **args)
    path = tmp_path / "v2" / "verify.json"
    with pytest.raises(CheckFailed, match="other than the one the fp16 model was converted from") as e:
        check_inputs(read_report(path), path, conversion)
    assert str(path) in str(e.value)
