"""The publish stage against a local Hub (tests/hub_server.py) through huggingface_hub's real
client: what snapshot_download gets back per branch, idempotence, resume, refusals, token hygiene,
rate limits, network and permission failures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hub_server import Fault, HubServer
from huggingface_hub import constants, snapshot_download
from safetensors.numpy import save_file

from pipeline.core.errors import CheckFailed, InputError, PipelineError
from pipeline.publish import command, publish
from pipeline.recipe import load_recipe

TOKEN = "hf_TESTwriteTOKENneverLEAK0123456789"
READ_TOKEN = "hf_TESTreadONLYtoken0123456789"
ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
[model]
name = "Tiny-Llama-test"
creator = "Meta"
license = "llama2"
base_model = "meta-llama/Tiny-hf"
prompt_template = "[INST] {prompt} [/INST]"
description = "A tiny test model."

[source]
path = "meta"

[calibration]
source = "hf:test-org/code-text:train:content"
nsamples = 16
seqlen = 64

[[variants]]
branch = "main"
bits = 4
group_size = 128
damp = 0.1
description = "4-bit, 128g"

[[variants]]
bits = 4
group_size = 32
act_order = true
damp = 0.1
description = "4-bit, 32g, act-order"

[[variants]]
bits = 8
group_size = 128
act_order = true
damp = 0.1
description = "8-bit, 128g, act-order"

[verify]
eval = "eval/*.txt"
seqlen = 64

[publish]
fp16_repo = "test-org/Tiny-fp16"
gptq_repo = "test-org/Tiny-GPTQ"
quantized_by = "test-org"
tags = ["test"]
"""
BRANCHES = {"main": (4, 128, False, 1), "gptq-4bit-32g-actorder_True": (4, 32, True, 1),
            "gptq-8bit-128g-actorder_True": (8, 128, True, 2)}  # bits, group, act order, shards


def weights(path: Path, seed: int, n_shards: int) -> None:
    """Real safetensors files (random fp16), sharded with an index when n_shards > 1."""
    rng = np.random.default_rng(seed)
    names = ([path / "model.safetensors"] if n_shards == 1 else
             [path / f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)])
    weight_map = {}
    for i, name in enumerate(names):
        save_file({f"layer{i}.w": rng.standard_normal((64, 48)).astype(np.float16)}, str(name))
        weight_map[f"layer{i}.w"] = name.name
    if n_shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def common_files(path: Path) -> None:
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(bytes(range(256)) * 8)  # binary: an LFS file
    (path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (path / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (path / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')


def gptq_artifact(path: Path, bits: int, group: int, act: bool, shards: int, seed: int) -> None:
    common_files(path)
    qc = {"bits": bits, "group_size": group, "damp_percent": 0.1, "desc_act": act, "static_groups": False,
          "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
          "quant_method": "gptq", "checkpoint_format": "gptq"}
    (path / "quantize_config.json").write_text(json.dumps(qc))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    log = {"method": "gptq", "calibration": {"source": "hf:test-org/code-text:train:content",
                                             "nsamples": 16, "seqlen": 64, "seed": 0}}
    (path / "quant_log.json").write_text(json.dumps(log))
    weights(path, seed, shards)


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# the Meta files the fp16 fixture was "converted from" (its conversion.json) and verify hashed
META_FILES = {"consolidated.00.pth": {"bytes": 1000, "md5": "0123456789abcdef" * 2},
              "params.json": {"bytes": 120, "md5": "fedcba9876543210" * 2}}


def passing_checks(name: str, kind: str, passed: bool = True) -> list[dict]:
    """Every check verify runs on an artifact of this kind (`passed` for its perplexity check)."""
    names = (["conversion_parity", "perplexity", "generation"] if kind == "fp16" else
             ["perplexity", "kl_divergence", "against_rtn", "module_integrity", "generation"])
    return [{"check": c, "artifact": name, "passed": passed or c != "perplexity",
             "metrics": {"max_rel_err": 2e-6, "top1_agreement": 1.0} if c == "conversion_parity" else {},
             "thresholds": {}, "samples": []} for c in names]


def write_report(work: Path, passed: bool = True) -> Path:
    """A schema-3 verify.json over the artifacts as they are now (hashes computed here); its
    inputs fingerprint fp16's (path, sha256) pairs, sorted, as verify/report.py documents."""
    fp16_files = tree_hashes(work / "fp16")
    artifacts = {"fp16": {"path": str((work / "fp16").resolve()), "kind": "fp16", "files": fp16_files}}
    checks = passing_checks("fp16", "fp16")
    ppl = {"fp16": 7.5}
    for i, (branch, (bits, group, act, _)) in enumerate(BRANCHES.items()):
        d = work / "gptq" / branch
        artifacts[branch] = {"path": str(d.resolve()), "kind": "gptq", "bits": bits, "group_size": group,
                             "desc_act": act, "files": tree_hashes(d)}
        ppl[branch], ppl[f"{branch}:rtn"] = 7.6 + 0.1 * i, 8.0 + 0.1 * i
        checks += passing_checks(branch, "gptq", passed)
    fingerprint = hashlib.sha256(json.dumps(sorted(fp16_files.items())).encode()).hexdigest()
    report = {"schema": 3, "tool_version": "0.1.0", "passed": passed, "device": "cpu", "dtype": "float32",
              "eval": {"source": "glob", "files": ["eval/a.txt"], "sha256": "0" * 64, "seqlen": 64,
                       "windows": 4, "tokens": 256},
              "artifacts": artifacts, "checks": checks, "perplexity": ppl, "tokens_per_second": 100.0,
              "inputs": {"fp16": fingerprint, "meta": {"path": "/models/tiny", "files": META_FILES},
                         "eval_sha256": "0" * 64}}
    path = work / "verify" / "verify.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A job work directory: recipe, fp16/, gptq/<branch>/, verify/verify.json."""
    w = tmp_path / "work"
    (w / "recipes").mkdir(parents=True)
    (w / "recipes" / "tiny.toml").write_text(RECIPE)
    common_files(w / "fp16")
    (w / "fp16" / "config.json").write_text('{"model_type": "llama", "hidden_size": 48}')
    (w / "fp16" / "conversion.json").write_text(json.dumps({"source": {"files": META_FILES}}))
    weights(w / "fp16", 0, 2)
    for i, (branch, (bits, group, act, shards)) in enumerate(BRANCHES.items(), 1):
        gptq_artifact(w / "gptq" / branch, bits, group, act, shards, seed=i)
    write_report(w)
    return w


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The local Hub, and the environment publish reads at call time."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with HubServer(tmp_path / "hub", {TOKEN: "write", READ_TOKEN: "read"}) as server:
        yield server


def run(work: Path, **kwargs) -> dict:
    recipe = load_recipe(work / "recipes" / "tiny.toml")
    variants = {b: work / "gptq" / b for b in BRANCHES}
    return publish(recipe, fp16=work / "fp16", variants=variants, report=work / "verify" / "verify.json",
                   plan_dir=work / "publish-plan", **kwargs)


def download(server: HubServer, repo: str, branch: str, dest: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """path -> bytes of a branch, through huggingface_hub.snapshot_download (the reference client).
    snapshot_download consults constants.HF_HUB_OFFLINE, frozen when huggingface_hub was first
    imported; another test module importing it under HF_HUB_OFFLINE=1 must not break this one."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    local = Path(snapshot_download(repo, revision=branch, endpoint=server.url, token=TOKEN, local_dir=dest,
                                   cache_dir=dest.parent / "hf-cache"))
    return {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(local).parts}


def expected_branches(work: Path) -> dict[tuple[str, str], dict[str, bytes]]:
    """(repo, branch) -> the files publish must put there: the artifact, its card, and the Hub's
    own .gitattributes (created with the repo, the only file a branch keeps that is not planned)."""
    plan_dir = work / "publish-plan"
    out = {}
    for repo, artifacts in (("test-org/Tiny-fp16", {"main": work / "fp16"}),
                            ("test-org/Tiny-GPTQ", {b: work / "gptq" / b for b in BRANCHES})):
        for branch, root in artifacts.items():
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
            files["README.md"] = (plan_dir / "cards" / repo.replace("/", "--") / branch / "README.md").read_bytes()
            out[repo, branch] = files
    return out


def check_hub_matches(server: HubServer, work: Path, tmp_path: Path, monkeypatch) -> None:
    for (repo, branch), files in expected_branches(work).items():
        got = download(server, repo, branch, tmp_path / "dl" / repo / branch, monkeypatch)
        assert got.pop(".gitattributes").startswith(b"*.bin filter=lfs")
        assert sorted(got) == sorted(files), (repo, branch)
        for path, data in files.items():
            assert got[path] == data, (repo, branch, path)


def test_publish_round_trip_then_nothing_to_do(work, hub, tmp_path, monkeypatch):
    first = run(work, endpoint=hub.url)
    assert first["commits"] == 4
    check_hub_matches(hub, work, tmp_path, monkeypatch)
    # a new branch starts from main: the 8-bit one must drop main's model.safetensors
    deleted = {r["branch"]: r["deleted"] for r in first["branches"]}
    assert deleted["gptq-8bit-128g-actorder_True"] == ["model.safetensors"] and first["deleted_files"] == 1
    assert "model.safetensors" not in hub.branch_files("test-org/Tiny-GPTQ", "gptq-8bit-128g-actorder_True")
    # a card went through validate-yaml once per repository (GPTQ branches inherit main's,
    # identical, so do not upload it again), and LFS files went through batch + PUT
    assert hub.count("POST", "/api/validate-yaml") == 2
    puts = hub.count("PUT", "/lfs-upload/")
    assert puts > 0

    commits = hub.count("POST", r"/commit/")
    second = run(work, endpoint=hub.url)
    assert second["uploaded_files"] == 0 and second["commits"] == 0 and second["deleted_files"] == 0
    assert hub.count("PUT", "/lfs-upload/") == puts and hub.count("POST", r"/commit/") == commits
    assert hub.count("POST", "/preupload/") == 4  # only the first run prepared uploads


def test_changed_variant_uploads_only_differences_and_drops_stale_shards(work, hub, tmp_path, monkeypatch):
    run(work, endpoint=hub.url)
    main = work / "gptq" / "main"
    before = tree_hashes(main)
    (main / "model.safetensors").unlink()
    weights(main, 99, 2)  # re-quantised into two shards
    write_report(work)
    result = run(work, endpoint=hub.url)
    after = tree_hashes(main)
    changed = {p for p in after if before.get(p) != after[p]} | {"README.md"}  # the card shows the new size
    by_branch = {(r["repo"], r["branch"]): r for r in result["branches"]}
    assert set(by_branch["test-org/Tiny-GPTQ", "main"]["uploaded"]) == changed
    assert by_branch["test-org/Tiny-GPTQ", "main"]["deleted"] == ["model.safetensors"]
    # the card (shared by every GPTQ branch) changed; nothing else did
    for key in [("test-org/Tiny-GPTQ", b) for b in BRANCHES if b != "main"]:
        assert by_branch[key]["uploaded"] == ["README.md"] and by_branch[key]["deleted"] == []
    assert by_branch["test-org/Tiny-fp16", "main"]["commit"] is None
    check_hub_matches(hub, work, tmp_path, monkeypatch)


def test_interrupted_upload_completes_on_rerun(work, hub, tmp_path, monkeypatch):
    hub.faults.append(Fault("PUT", "/lfs-upload/", 507, after=2))  # the third LFS upload fails
    with pytest.raises(PipelineError, match="re-run publish"):
        run(work, endpoint=hub.url)
    hub.faults.append(Fault("POST", "/commit/gptq-8bit", 500))  # and the next run dies at one commit
    with pytest.raises(PipelineError, match="commit to test-org/Tiny-GPTQ@gptq-8bit"):
        run(work, endpoint=hub.url)
    commits = hub.count("POST", "/commit/")
    result = run(work, endpoint=hub.url)
    assert result["commits"] == 1 and hub.count("POST", "/commit/") == commits + 1
    check_hub_matches(hub, work, tmp_path, monkeypatch)
    # every LFS object was uploaded once over the three runs: resumed runs re-sent nothing
    lfs_objects = {(repo, blob.sha256) for repo, r in hub.repos.items() for tree in r.commits.values()
                   for blob in tree.values() if blob.lfs}
    assert hub.count("PUT", "/lfs-upload/") == len(lfs_objects)


REFUSALS = {"failed": "verify did not pass", "modified": "model.safetensors: changed",
            "added": "extra.safetensors: not verified", "missing": "tokenizer.model: missing",
            "not_verified": "artifact 'gptq-4bit-32g-actorder_True' is missing", "no_ppl": "no perplexity",
            "other_dir": "verify this directory"}


@pytest.mark.parametrize("tamper", REFUSALS)
def test_refuses_unverified_or_modified_artifacts(work, hub, tamper):
    target = work / "gptq" / "gptq-4bit-32g-actorder_True"
    if tamper == "failed":
        write_report(work, passed=False)
    elif tamper == "modified":
        data = bytearray((target / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (target / "model.safetensors").write_bytes(bytes(data))
    elif tamper == "added":
        (target / "extra.safetensors").write_bytes(b"unverified")
    elif tamper == "missing":
        (target / "tokenizer.model").unlink()
    elif tamper == "not_verified":
        report = json.loads((work / "verify" / "verify.json").read_text())
        del report["artifacts"][target.name]
        (work / "verify" / "verify.json").write_text(json.dumps(report))
    elif tamper == "no_ppl":
        report = json.loads((work / "verify" / "verify.json").read_text())
        del report["perplexity"][target.name]
        (work / "verify" / "verify.json").write_text(json.dumps(report))
    elif tamper == "other_dir":  # the report verified an identical copy, not the directory given
        copy = work / "elsewhere" / target.name
        shutil.copytree(target, copy)
        report = json.loads((work / "verify" / "verify.json").read_text())
        report["artifacts"][target.name]["path"] = str(copy)
        (work / "verify" / "verify.json").write_text(json.dumps(report))
    with pytest.raises(CheckFailed, match=REFUSALS[tamper]):
        run(work, endpoint=hub.url)
    assert hub.requests == []  # refused before any network traffic


def test_dry_run_writes_exact_plan_and_touches_no_network(work, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    result = CliRunner().invoke(command, ["--help"])
    assert result.exit_code == 0 and "--dry-run" in result.output
    monkeypatch.chdir(work)
    result = CliRunner().invoke(command, ["recipes/tiny.toml", "--workdir", ".", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and summary["commits"] == 0 and hub.requests == []
    plan = json.loads((work / "publish-plan" / "plan.json").read_text())
    assert plan["endpoint"] == hub.url
    for (repo, branch), files in expected_branches(work).items():
        planned = plan["repos"][repo]["branches"][branch]["files"]
        assert {f["path"]: (f["size"], f["sha256"]) for f in planned} == {
            p: (len(d), hashlib.sha256(d).hexdigest()) for p, d in files.items()}
    assert plan["repos"]["test-org/Tiny-GPTQ"]["private"] is False


def test_cli_publishes_private_repos_and_prints_json(work, hub, monkeypatch):
    monkeypatch.chdir(work)
    result = CliRunner().invoke(command, ["recipes/tiny.toml", "--workdir", ".", "--endpoint", hub.url,
                                          "--private", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["commits"] == 4
    for b in summary["branches"]:  # the JSON describes what the Hub now holds
        assert b["files"] == len(hub.branch_files(b["repo"], b["branch"])) - 1  # - .gitattributes
    assert hub.repos["test-org/Tiny-GPTQ"].private and hub.repos["test-org/Tiny-fp16"].private
    assert "published 4 branches" in result.stderr


def test_endpoint_from_environment_at_call_time(work, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert run(work)["endpoint"] == hub.url
    assert hub.count("POST", "/commit/") == 4


def test_token_never_appears_in_output_files_or_errors(work, hub, tmp_path, capfd, caplog):
    # everything huggingface_hub and the pipeline log, down to DEBUG (the HTTP transport's own
    # DEBUG trace prints raw response headers, which this test's echoing server fills with the token)
    for name in ("huggingface_hub", "pipeline", "verify"):
        caplog.set_level("DEBUG", logger=name)
    result = run(work, endpoint=hub.url)
    hub.faults.append(Fault("GET", "/tree/", 403, message="forbidden for {auth}"))
    with pytest.raises(PipelineError) as e:
        run(work, endpoint=hub.url)
    assert "HTTP 403" in str(e.value) and "***" in str(e.value)
    texts = [json.dumps(result), str(e.value), repr(e.value), caplog.text, *capfd.readouterr()]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert all(TOKEN not in t for t in texts)
    assert hub.repos  # the uploads did happen: the scan covered real output


def test_missing_token_is_a_clear_error(work, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "publish", "recipes/tiny.toml", "--workdir", ".",
                           "--endpoint", "http://127.0.0.1:9"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "no Hugging Face token" in proc.stderr and "HF_TOKEN" in proc.stderr


@pytest.mark.parametrize("token, status", [(READ_TOKEN, "HTTP 403"), ("hf_wrong", "HTTP 401")])
def test_wrong_permissions_are_clear_errors(work, hub, token, status):
    with pytest.raises(PipelineError, match=status) as e:
        run(work, endpoint=hub.url, token=token)
    assert token not in str(e.value)
    assert not hub.repos


def test_unreachable_endpoint_is_a_clear_error(work, hub):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(PipelineError, match="cannot reach"):
        run(work, endpoint=url)


def test_offline_mode_read_at_call_time(work, hub, monkeypatch):
    before = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE"):
        run(work, endpoint=hub.url)
    assert hub.requests == []
    assert (constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET) == before  # restored


def test_rate_limit_retried_with_backoff(work, hub, capfd):
    hub.faults.append(Fault("POST", "/commit/", 429, times=2, headers={"Retry-After": "0"}))
    result = run(work, endpoint=hub.url)
    assert result["commits"] == 4
    assert "rate limited (HTTP 429), retrying" in capfd.readouterr().err


def test_rate_limit_persisting_is_a_clear_error(work, hub):
    hub.faults.append(Fault("POST", "/commit/", 429, times=1000, headers={"Retry-After": "0"}))
    with pytest.raises(PipelineError, match=r"still rate limited \(HTTP 429\) after 7 tries"):
        run(work, endpoint=hub.url)
    assert hub.count("POST", "/commit/") == 0


# ---------------------------------------------------------------- security: what may leave the machine


def publish_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m pipeline publish ARGS` in this process: exit code, stdout, stderr."""
    from cli_runner import run_cli
    return run_cli(["publish", *args], monkeypatch, capsys)


def everything_written(*roots: Path) -> str:
    """Every file under roots, as text (binary bytes read as latin-1), for leak scans."""
    return "\n".join(p.read_bytes().decode("latin-1") for root in roots for p in root.rglob("*")
                     if p.is_file())


@pytest.mark.parametrize("card", ["/proc/self/environ", "../../../../../../../../etc/passwd"])
def test_a_recipe_cannot_publish_local_files_or_the_token(work, hub, card, monkeypatch, capsys):
    """The reported attack: original_card naming the process environment (HF_TOKEN inside) or
    /etc/passwd. Refused at recipe load, exit 2, before any request reaches the Hub."""
    recipe = work / "recipes" / "tiny.toml"
    recipe.write_text(RECIPE.replace('description = "A tiny test model."',
                                     f'description = "A tiny test model."\noriginal_card = "{card}"'))
    code, out, err = publish_cli([str(recipe), "--workdir", str(work), "--endpoint", hub.url, "--json"],
                                 monkeypatch, capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{recipe}: [model] original_card = '{card}' reaches" in err
    assert hub.requests == [] and not hub.repos
    assert not (work / "publish-plan").exists()
    assert TOKEN not in err + everything_written(work)


def card_in_recipe_folder(work: Path, text: str) -> None:
    (work / "recipes" / "card.md").write_text(text)
    (work / "recipes" / "tiny.toml").write_text(RECIPE.replace(
        'description = "A tiny test model."', 'description = "A tiny test model."\noriginal_card = "card.md"'))


LEAKS = {  # card text -> what the refusal names (never the value)
    f"Copied from my shell: HF_TOKEN={TOKEN}\n": "a secret in use here",
    "env: MY_SERVICE_API_TOKEN_VALUE\n": "a secret in use here",
    "mirror: https://bob:hunter2-pass@mirror.example.com/\n": "URL with a password",
    "another token: hf_" + "Zz9" * 11 + "\n": "Hugging Face token",
    "AWS_SECRET_ACCESS_KEY=abcdEFGH1234ijklMNOP5678qrstUVWX90yz\n": "credential assignment",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----\n": "private key block",
}


@pytest.mark.parametrize("leak", LEAKS)
def test_credentials_in_a_card_are_refused_before_anything_is_written(work, hub, leak, monkeypatch):
    """Whatever the source, a rendered card holding a credential is refused: in a dry run before
    the plan is written, in a real run before the first request; the message names the card."""
    monkeypatch.setenv("SOME_SERVICE_API_TOKEN", "MY_SERVICE_API_TOKEN_VALUE")
    card_in_recipe_folder(work, "# Original\n\n" + leak)
    for dry_run in (True, False):
        with pytest.raises(InputError, match=LEAKS[leak]) as e:
            run(work, endpoint=hub.url, dry_run=dry_run)
        message = str(e.value)
        assert "test-org/Tiny-fp16@main: README.md" in message and "line " in message
        secret = leak.split("=")[-1].split()[-1] if "=" in leak else leak.split()[-1]
        assert secret not in message and TOKEN not in message
    assert hub.requests == [] and not (work / "publish-plan").exists()


def test_credentials_in_artifact_files_are_refused(work, hub):
    """Text files and safetensors metadata of the artifacts are scanned too."""
    variant = work / "gptq" / "main"
    save_file({"w": np.zeros((2, 2), np.float16)}, str(variant / "extra.safetensors"),
              metadata={"note": f"pushed with {TOKEN}"})
    write_report(work)
    with pytest.raises(InputError, match=r"test-org/Tiny-GPTQ@main: extra.safetensors: .*a secret in use"):
        run(work, endpoint=hub.url)
    (variant / "extra.safetensors").unlink()
    (work / "fp16" / "generation_config.json").write_text(json.dumps({"note": "hf_" + "k" * 34}))
    write_report(work)
    with pytest.raises(InputError, match=r"test-org/Tiny-fp16@main: generation_config.json: a Hugging Face"):
        run(work, endpoint=hub.url, dry_run=True)
    assert hub.requests == [] and not (work / "publish-plan").exists()


def test_endpoint_credentials_are_stripped_and_masked_everywhere(work, hub, tmp_path, monkeypatch, capsys):
    password = "s3cret-Pa55word"
    endpoint = hub.url.replace("http://", f"http://alice:{password}@")
    monkeypatch.chdir(work)
    for args in (["--dry-run", "--plan-dir", str(work / "dry-plan")], []):
        code, out, err = publish_cli(["recipes/tiny.toml", "--workdir", ".", "--endpoint", endpoint, "--json",
                                      *args], monkeypatch, capsys)
        assert code == 0, err
        assert json.loads(out)["endpoint"] == hub.url
        assert "http://***@127.0.0.1" in err  # the warning says credentials were dropped, masked
        assert password not in out + err and "alice" not in out + err
    for plan_dir in (work / "dry-plan", work / "publish-plan"):
        assert json.loads((plan_dir / "plan.json").read_text())["endpoint"] == hub.url
    assert f"]({hub.url}/test-org/Tiny-GPTQ/tree/main)" in (
        work / "publish-plan" / "cards" / "test-org--Tiny-GPTQ" / "main" / "README.md").read_text()
    assert hub.count("POST", "/commit/") == 4
    assert password not in everything_written(work, tmp_path / "hub")
    code, out, err = publish_cli(["recipes/tiny.toml", "--workdir", ".", "--endpoint",
                                  f"ftp://alice:{password}@host"], monkeypatch, capsys)
    assert code == 2 and "ftp://***@host" in err and password not in err and "Traceback" not in err


def tamper_report(work: Path, edit) -> Path:
    path = work / "verify" / "verify.json"
    report = json.loads(path.read_text())
    edit(report)
    path.write_text(json.dumps(report))
    return path


def drop_check(report: dict, artifact: str, check: str) -> None:
    report["checks"] = [c for c in report["checks"] if (c["artifact"], c["check"]) != (artifact, check)]


def fail_one(report: dict) -> None:
    report["checks"][-1]["passed"] = False


V32 = "gptq-4bit-32g-actorder_True"
FORGERIES = {  # hand-edited verify.json -> what the refusal (exit 3) says
    "hash_edited": (lambda r: r["artifacts"][V32]["files"].update({"model.safetensors": "0" * 64}),
                    "model.safetensors: changed"),
    "no_checks": (lambda r: r.update(checks=[]), "its check list is empty"),
    "passed_with_a_failing_check": (fail_one, "failed: generation:gptq-8bit-128g-actorder_True although it says passed"),
    "required_check_missing": (lambda r: drop_check(r, V32, "kl_divergence"),
                               f"'{V32}' lacks the required check\\(s\\) kl_divergence"),
    "no_parity": (lambda r: drop_check(r, "fp16", "conversion_parity"), "lacks the required check\\(s\\) conversion_parity"),
    "variant_missing": (lambda r: r["artifacts"].pop(V32), f"artifact '{V32}' is missing"),
    "no_inputs": (lambda r: r.pop("inputs"), "records no inputs"),
    "fp16_fingerprint": (lambda r: r["inputs"].update(fp16="1" * 64), "inputs.fp16 does not match"),
    "other_meta": (lambda r: r["inputs"]["meta"]["files"]["params.json"].update(md5="9" * 32),
                   "a Meta checkpoint other than the one the fp16 model was converted from \\(differs: params.json\\)"),
    "no_meta": (lambda r: r["inputs"].update(meta=None), "verify ran without the Meta checkpoint"),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_hand_edited_verify_report_is_refused(work, hub, forgery, monkeypatch, capsys):
    edit, match = FORGERIES[forgery]
    path = tamper_report(work, edit)
    before = path.read_bytes()
    code, out, err = publish_cli([str(work / "recipes" / "tiny.toml"), "--workdir", str(work),
                                  "--endpoint", hub.url], monkeypatch, capsys)
    assert code == 3, err
    assert "Traceback" not in err and str(path) in err
    assert re.search(match, err), err
    assert hub.requests == [] and path.read_bytes() == before


RUN = (b'"device": "cpu", "dtype": "float32", "tokens_per_second": 1.0, "eval": {"source": "e", '
       b'"files": [], "seqlen": 8, "windows": 1, "tokens": 8}, "perplexity": {}')


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{\x00\"\x00", "not UTF-8 text"),
    (bytes(range(256)), "not UTF-8 text"),
    (b'{"schema": 3, "passed": "yes", "artifacts": {}, "checks": [], ' + RUN + b'}',
     "verify.passed: must be bool, got str"),
    (b'{"schema": 3, "passed": true, "artifacts": {"fp16": {"path": "/x", "kind": "fp16", '
     b'"files": {"../../etc/passwd": "abc"}}}, "checks": [], ' + RUN + b'}',
     "'../../etc/passwd' is not a relative path"),
    (b'{"schema": 3, "passed": true, "artifacts": {}, "checks": [{"check": 1}], ' + RUN + b'}',
     r"verify.checks.0.check: must be str, got int; verify.checks.0.artifact: missing"),
    (b'{"schema": 3, "passed": true, "artifacts": {}, "checks": [], "runtimes": {"x": {"v": '
     b'null}}, ' + RUN + b'}', r"verify.runtimes.x.v: must be an object"),
])
def test_malformed_or_binary_verify_report_is_bad_input(work, hub, content, match, monkeypatch, capsys):
    path = work / "verify" / "verify.json"
    path.write_bytes(content)
    code, out, err = publish_cli([str(work / "recipes" / "tiny.toml"), "--workdir", str(work),
                                  "--endpoint", hub.url], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert str(path) in err and re.search(match, err), err
    assert hub.requests == [] and path.read_bytes() == content
