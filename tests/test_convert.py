"""The convert stage: logits parity with Meta's model for every family and shard count, the
files written, and every kind of bad input (clear error, non-zero exit, no complete-looking output)."""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch
from meta_fixtures import SPECS, build_checkpoint, edit_shard, random_state, refresh_checklist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline import cli
from pipeline import convert as convert_module
from pipeline.convert import convert
from pipeline.core.errors import InputError, OutputExistsError, PipelineError
from verify.meta_reference import meta_logits

# (family fixture, model-parallel shards): every family, every shard count.
PARITY = [
    ("llama1", 1),
    ("llama2", 2),
    ("codellama-7b", 2),
    ("codellama-34b", 4),
    ("llama3", 2),
    ("llama3.1", 4),
    # the whole family (#23): each at 1 and 2 shards, and at its real count where that differs
    ("codellama-70b", 1),
    ("codellama-70b", 2),
    ("codellama-70b", 8),
    ("codellama-70b-instruct", 1),
    ("codellama-70b-instruct", 2),
    ("llama3.2", 1),
    ("llama3.2", 2),
    ("llama3.2-output", 1),
    ("llama3.2-output", 2),
    ("llama3.3", 1),
    ("llama3.3", 2),
    ("llama3.3", 8),
]


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tokens_for(name: str, T: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, SPECS[name].vocab, (2, T), generator=g)


def hf_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Converted checkpoints shared by the tests below: name -> (src, out)."""
    cache: dict[tuple[str, int], tuple[Path, Path]] = {}

    def get(name: str, n_shards: int) -> tuple[Path, Path]:
        if (name, n_shards) not in cache:
            d = tmp_path_factory.mktemp(f"{name}-{n_shards}")
            src = build_checkpoint(d / "meta", name, n_shards)
            convert(src, d / "hf")
            cache[name, n_shards] = (src, d / "hf")
        return cache[name, n_shards]

    return get


@pytest.mark.parametrize("name,n_shards", PARITY)
def test_logits_match_meta_reference(converted, name, n_shards):
    src, out = converted(name, n_shards)
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["source"]["family"] == SPECS[name].family
    tokens = tokens_for(name)
    assert max_rel_err(hf_logits(out, tokens), meta_logits(src, tokens)) <= 1e-4


def _rewrite(out: Path, edit) -> None:
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def test_parity_catches_unpermuted_k(converted, tmp_path):
    """Negative control: k_proj copied in Meta's interleaved layout (the classic GQA bug)."""
    src, out = converted("codellama-34b", 4)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    meta = random_state(SPECS["codellama-34b"])

    def unpermute(t: dict[str, torch.Tensor]) -> None:
        for i in range(2):
            t[f"model.layers.{i}.self_attn.k_proj.weight"] = \
                meta[f"layers.{i}.attention.wk.weight"].to(torch.bfloat16).to(torch.float16)

    _rewrite(broken, unpermute)
    tokens = tokens_for("codellama-34b")
    ref = meta_logits(src, tokens)
    assert max_rel_err(hf_logits(out, tokens), ref) <= 1e-4
    assert max_rel_err(hf_logits(broken, tokens), ref) > 1e-2


@pytest.mark.parametrize("name,n_shards,key", [
    ("codellama-7b", 2, "rope_theta"), ("llama3.1", 4, "rope_scaling"),
    ("codellama-70b", 2, "rope_theta"), ("llama3.3", 2, "rope_scaling"),
    ("llama3.2", 2, "factor 8"), ("llama3.2-output", 2, "factor 8")])
def test_parity_catches_missing_rope_config(converted, tmp_path, name, n_shards, key):
    """Negative control: config.json without rope_theta (CodeLlama read with θ=10000) or without
    Llama 3.1's rope_scaling; Llama 3.2 with Meta's hard-coded factor 8 instead of 32."""
    src, out = converted(name, n_shards)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((out / "config.json").read_text())
    if key == "factor 8":
        assert cfg["rope_scaling"]["factor"] == 32.0
        cfg["rope_scaling"]["factor"] = 8.0
    else:
        del cfg[key]
    (broken / "config.json").write_text(json.dumps(cfg))
    tokens = tokens_for(name, T=128)
    assert max_rel_err(hf_logits(broken, tokens), meta_logits(src, tokens)) > 1e-3


@pytest.mark.parametrize("name,n_shards", PARITY)
def test_config_and_files(converted, name, n_shards):
    src, out = converted(name, n_shards)
    spec = SPECS[name]
    cfg = json.loads((out / "config.json").read_text())
    p = spec.params
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == \
        (p["dim"], spec.ffn, p["n_layers"])
    assert cfg["num_attention_heads"] == p["n_heads"]
    assert cfg["num_key_value_heads"] == p.get("n_kv_heads", p["n_heads"])
    assert cfg["vocab_size"] == spec.vocab
    assert cfg["rope_theta"] == p.get("rope_theta", 10000.0)  # top level: read by 4.x and 5.x
    assert "rope_parameters" not in cfg
    assert cfg["max_position_embeddings"] == spec.max_positions
    tied = spec.output != "own"  # Llama 3.2: the head is the embedding matrix, written once
    factor = 32.0 if tied else 8.0  # Llama 3.2 1B/3B: factor 32 (their tied embeddings tell)
    assert cfg["rms_norm_eps"] == p["norm_eps"] and cfg["tie_word_embeddings"] is tied
    if p.get("use_scaled_rope"):
        assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}
    else:
        assert cfg["rope_scaling"] is None
    if spec.tokenizer == "tiktoken":
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (512, 513)
    else:
        assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    # transformers 5.x reads the same θ and scaling from the top-level keys
    hf = AutoConfig.from_pretrained(out)
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert rope["rope_theta"] == p.get("rope_theta", 10000.0)
    if p.get("use_scaled_rope"):
        assert rope["rope_type"] == "llama3" and rope["factor"] == factor
    # the dtype the config names is the dtype of every tensor written
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert ("lm_head.weight" in f.keys()) is not tied and "model.embed_tokens.weight" in f.keys()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"]
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).is_file()


def test_manifest_records_verified_source_hashes(converted):
    import hashlib

    src, out = converted("llama2", 2)
    m = json.loads((out / "conversion.json").read_text())
    assert m["source"]["checksums"] == "verified" and m["source"]["n_shards"] == 2
    for name in ("consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"):
        assert m["source"]["files"][name]["md5"] == hashlib.md5((src / name).read_bytes()).hexdigest()
    assert m["params"] == SPECS["llama2"].params and m["tool_version"]
    assert m["detected"]["ffn_dim"] == 224 and m["detected"]["vocab_size"] == 1000
    assert m["detected"]["embedding_split"].startswith("ParallelEmbedding")


def test_bfloat16_sharded_output_wrapped_params(tmp_path):
    """--dtype bfloat16 and small --max-shard-size: several files + index, config says bfloat16;
    a wrapped params.json and rope.freqs in the shards are handled."""
    src = build_checkpoint(tmp_path / "meta", "llama3", 2, wrap_params=True)
    out = tmp_path / "hf"
    s = convert(src, out, dtype="bfloat16", max_shard_size="100KB")
    assert len(s["output"]["files"]) > 3 and "model.safetensors.index.json" in s["output"]["files"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(s["output"]["files"]) - {"model.safetensors.index.json"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tokens = tokens_for("llama3")
    assert max_rel_err(hf_logits(out, tokens), meta_logits(src, tokens)) <= 1e-4


def test_rope_freqs_is_ignored(tmp_path):
    src = build_checkpoint(tmp_path / "meta", "llama2", 1)
    assert "rope.freqs" in torch.load(src / "consolidated.00.pth", weights_only=True, mmap=True)
    s = convert(src, tmp_path / "hf")
    assert "rope.freqs" not in json.dumps(s["output"]) and s["detected"]["n_layers"] == 2


# ---- bad input: each one an InputError naming the file or tensor; nothing left at OUT ----------

def _fails(src: Path, out: Path, match: str, error=InputError, **kw) -> None:
    with pytest.raises(error, match=match):
        convert(src, out, **kw)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture
def llama2_src(tmp_path) -> Path:
    return build_checkpoint(tmp_path / "meta", "llama2", 2)


@pytest.mark.parametrize("missing,match", [
    ("params.json", r"params\.json: missing"),
    ("tokenizer.model", r"tokenizer\.model: missing"),
    ("consolidated.00.pth", r"consolidated\.00\.pth.*missing"),
])
def test_missing_files(llama2_src, tmp_path, missing, match):
    (llama2_src / missing).unlink()
    _fails(llama2_src, tmp_path / "out", match, skip_checksums=True)


def test_checksum_mismatch_names_file(llama2_src, tmp_path):
    p = llama2_src / "consolidated.01.pth"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    _fails(llama2_src, tmp_path / "out", r"consolidated\.01\.pth: md5 .* does not match")


def test_truncated_shard(llama2_src, tmp_path):
    p = llama2_src / "consolidated.01.pth"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    refresh_checklist(llama2_src)
    _fails(llama2_src, tmp_path / "out", r"consolidated\.01\.pth: cannot read: truncated")


def test_corrupt_shard(llama2_src, tmp_path):
    (llama2_src / "consolidated.00.pth").write_bytes(b"\x00garbage" * 1000)
    _fails(llama2_src, tmp_path / "out", r"consolidated\.00\.pth: cannot read", skip_checksums=True)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(llama2_src, tmp_path):
    edit_shard(llama2_src, 1, lambda s: s.__setitem__("evil", _Payload()))
    _fails(llama2_src, tmp_path / "out", r"consolidated\.01\.pth: refused.*weights_only")


def test_inconsistent_shapes(llama2_src, tmp_path):
    edit_shard(llama2_src, 1, lambda s: s.__setitem__(
        "layers.1.attention.wv.weight", s["layers.1.attention.wv.weight"][:8].clone()))
    _fails(llama2_src, tmp_path / "out",
           r"consolidated\.01\.pth: tensor layers\.1\.attention\.wv\.weight has shape \(8, 64\)")


def test_inconsistent_keys(llama2_src, tmp_path):
    edit_shard(llama2_src, 1, lambda s: s.pop("layers.0.feed_forward.w3.weight"))
    _fails(llama2_src, tmp_path / "out",
           r"consolidated\.01\.pth: holds different tensors.*layers\.0\.feed_forward\.w3")


def test_replicated_norms_must_agree(llama2_src, tmp_path):
    edit_shard(llama2_src, 1, lambda s: s["layers.1.ffn_norm.weight"].mul_(1.5))
    _fails(llama2_src, tmp_path / "out",
           r"consolidated\.01\.pth: replicated tensor layers\.1\.ffn_norm\.weight differs")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight(llama2_src, tmp_path, bad):
    edit_shard(llama2_src, 0, lambda s: s["layers.0.attention.wo.weight"].view(-1).__setitem__(7, bad))
    _fails(llama2_src, tmp_path / "out",
           r"consolidated\.00\.pth: tensor layers\.0\.attention\.wo\.weight contains NaN or Inf")


def test_bf16_outside_fp16_range(llama2_src, tmp_path):
    edit_shard(llama2_src, 1, lambda s: s["layers.0.feed_forward.w2.weight"].view(-1).__setitem__(3, 1e6))
    _fails(llama2_src, tmp_path / "out",
           r"consolidated\.01\.pth: tensor layers\.0\.feed_forward\.w2\.weight: values up to .* "
           r"exceed .*--dtype bfloat16")
    convert(llama2_src, tmp_path / "bf16", dtype="bfloat16")  # bf16 holds it


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.update(flux_capacitor=1), r"params\.json: unknown key\(s\) \['flux_capacitor'\]"),
    (lambda p: p.update(n_kv_heads=2), r"attention\.wk holds 4 kv heads .* n_kv_heads=2"),
    (lambda p: p.update(vocab_size=999), r"vocab_size=999 but tok_embeddings holds 1000 rows"),
    (lambda p: p.update(ffn_dim_multiplier=1.5), r"feed_forward\.w1 has 224 rows.*FFN width 256"),
    (lambda p: p.update(n_layers=3), r"n_layers=3.*missing \['layers\.2\."),
    (lambda p: p.update(dim=128), r"norm\.weight has shape \(64,\) but params\.json says dim=128"),
    (lambda p: p.pop("norm_eps"), r"params\.json: missing key\(s\) \['norm_eps'\]"),
])
def test_params_disagree_with_shapes(llama2_src, tmp_path, edit, match):
    params = json.loads((llama2_src / "params.json").read_text())
    edit(params)
    (llama2_src / "params.json").write_text(json.dumps(params))
    refresh_checklist(llama2_src)
    _fails(llama2_src, tmp_path / "out", match)


def test_wrong_tokenizer_for_weights(llama2_src, tmp_path):
    from meta_fixtures import padded_sentencepiece_model

    (llama2_src / "tokenizer.model").write_bytes(padded_sentencepiece_model(32000).read_bytes())
    _fails(llama2_src, tmp_path / "out", r"tokenizer\.model: 32000 tokens.*1000 rows",
           skip_checksums=True)


def test_existing_output_needs_force(llama2_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        convert(llama2_src, out)
    assert (out / "keep.txt").is_file()
    with pytest.raises(OutputExistsError, match="not an output of this tool"):
        convert(llama2_src, out, force=True)  # not ours: kept even with --force
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    convert(llama2_src, out, force=True)  # an empty directory holds nothing to lose
    (out / "added.txt").write_text("x")
    convert(llama2_src, out, force=True)  # our output (conversion.json): replaced
    assert not (out / "added.txt").exists() and (out / "config.json").is_file()


def test_interrupt_leaves_nothing(llama2_src, tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing tensors: no output, no temporary directory left."""
    calls = []
    real = convert_module.merge

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(convert_module, "merge", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(llama2_src, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["meta"]


def _main(monkeypatch, *args: str) -> int:
    """Run the CLI in-process; its exit status."""
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    try:
        cli.main()
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_full_disk(llama2_src, tmp_path, monkeypatch, capsys):
    """A write that fails as on a full disk (file size limit): exit 1, message, nothing left."""
    out = tmp_path / "out"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        code = _main(monkeypatch, "convert", str(llama2_src), str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert code == 1
    err = capsys.readouterr().err
    assert f"error: {out}: file too large (a file size limit) (EFBIG); removed the partial " \
           "output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]


def test_cli_json_and_exit_codes(llama2_src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert _main(monkeypatch, "convert", str(llama2_src), str(out), "--json") == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["source"]["family"] == "llama2" and summary["output"]["dtype"] == "float16"
    assert "converted Llama 2 (2 shards, 2 layers, vocab 1000)" in captured.err
    assert _main(monkeypatch, "convert", str(llama2_src), str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    (llama2_src / "params.json").unlink()
    assert _main(monkeypatch, "convert", str(llama2_src), str(tmp_path / "o2")) == 2
    assert "params.json: missing" in capsys.readouterr().err
    assert _main(monkeypatch, "convert", "--help") == 0
    assert "--skip-checksums" in capsys.readouterr().out


def test_family_override_and_bad_options(llama2_src, tmp_path):
    s = convert(llama2_src, tmp_path / "o1", family="llama1")
    assert s["source"]["family"] == "llama1" and s["detected"]["max_seq_len"] == 2048
    _fails(llama2_src, tmp_path / "o2", r"--max-shard-size", max_shard_size="lots")
    _fails(llama2_src, tmp_path / "o3", r"--dtype 'int8'", dtype="int8")
    _fails(llama2_src, tmp_path / "o4", r"family 'llama9'", family="llama9")
    _fails(llama2_src, tmp_path / "o5", r"tokenizer\.model: a sentencepiece tokenizer, but "
           r"Llama 3 uses tiktoken", family="llama3")
    assert issubclass(InputError, PipelineError)


def test_a_head_that_only_looks_tied_is_not_tied(tmp_path):
    """Llama 3.2 as Meta ships it with output.weight: a copy of tok_embeddings is written once
    (tied). The same checkpoint with one row of the head changed is not tied: lm_head is written
    and the RoPE factor is Meta's 8; the reference, which looks at the first rows only, still
    calls it 3.2, so parity fails rather than passing a wrong factor."""
    src = build_checkpoint(tmp_path / "meta", "llama3.2-output", 2)
    convert(src, tmp_path / "tied")
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"]

    def change_last_row(state: dict[str, torch.Tensor]) -> None:
        state["output.weight"][-1] += 1.0
    edit_shard(src, 1, change_last_row)
    convert(src, tmp_path / "untied")
    cfg = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["rope_scaling"]["factor"] == 8.0
    with safe_open(tmp_path / "untied" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
    tokens = tokens_for("llama3.2-output", T=128)
    assert max_rel_err(hf_logits(tmp_path / "untied", tokens), meta_logits(src, tokens)) > 1e-3
