"""pipeline/core/meta.py: params.json, shard discovery and loading, checklist.chk, family detection,
FFN width and RoPE rules (against published model configs), the q/k permutation (against index
arithmetic) and write_meta_checkpoint's split (against fairscale's rules written out here)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from meta_fixtures import SPECS, random_state, sentencepiece_model, tiktoken_model

from pipeline.core.errors import InputError
from pipeline.core.meta import (detect_family, ffn_dim, hf_name, load_shard, meta_names,
                                permute_rotary, prefetch, read_params, release, rope_scaling,
                                shard_paths, verify_checksums, write_meta_checkpoint)


def test_read_params_unwraps_and_validates(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"model": {"dim": 8, "n_layers": 1, "n_heads": 2, "norm_eps": 1e-5}}))
    assert read_params(p) == {"dim": 8, "n_layers": 1, "n_heads": 2, "norm_eps": 1e-5}
    p.write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "norm_eps": 1e-5,
                             "vision_chunk_size": 560}))
    with pytest.raises(InputError, match=r"params\.json: unknown key\(s\) \['vision_chunk_size'\]"):
        read_params(p)
    p.write_text(json.dumps({"dim": 8, "n_layers": 1}))
    with pytest.raises(InputError, match=r"missing key\(s\) \['n_heads', 'norm_eps'\]"):
        read_params(p)
    p.write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        read_params(p)
    with pytest.raises(InputError, match="missing"):
        read_params(tmp_path / "nope.json")


def test_shards_sorted_by_rank_not_string(tmp_path):
    for r in range(12):
        (tmp_path / f"consolidated.{r:02d}.pth").touch()
    (tmp_path / "consolidated.foo.pth").touch()
    assert [p.name for p in shard_paths(tmp_path)] == [f"consolidated.{r:02d}.pth" for r in range(12)]
    (tmp_path / "consolidated.03.pth").unlink()
    with pytest.raises(InputError, match=r"consolidated\.03\.pth'\] missing"):
        shard_paths(tmp_path)
    with pytest.raises(InputError, match="no consolidated"):
        shard_paths(tmp_path / "consolidated.foo.pth")


@pytest.mark.parametrize("params,kind,family", [
    ({"norm_eps": 1e-6}, "sentencepiece", "llama1"),                       # LLaMA 7B
    ({"norm_eps": 1e-5, "vocab_size": -1}, "sentencepiece", "llama2"),     # Llama 2 7B
    ({"norm_eps": 1e-5, "rope_theta": 1000000}, "sentencepiece", "codellama"),
    ({"norm_eps": 1e-5, "rope_theta": 500000.0}, "tiktoken", "llama3"),
    ({"norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}, "tiktoken", "llama3.1"),
])
def test_detect_family(params, kind, family):
    assert detect_family(params, kind) == family


@pytest.mark.parametrize("dim,multiple_of,mult,width", [
    (4096, 256, None, 11008),    # Llama 2 7B / CodeLlama 7B
    (5120, 256, None, 13824),    # 13B
    (8192, 256, 1.0, 22016),     # CodeLlama 34B
    (8192, 4096, 1.3, 28672),    # Llama 2 70B
    (4096, 1024, 1.3, 14336),    # Llama 3 8B
    (2048, 256, 1.5, 8192),      # Llama 3.2 1B
    (16384, 4096, 1.2, 53248),   # Llama 3.1 405B
])
def test_ffn_width_of_published_models(dim, multiple_of, mult, width):
    assert ffn_dim(dim, multiple_of, mult) == width


def test_rope_scaling():
    base = {"use_scaled_rope": True, "dim": 4096, "n_layers": 32}
    assert rope_scaling(base) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert rope_scaling({**base, "dim": 2048, "n_layers": 16})["factor"] == 32.0  # Llama 3.2 1B
    assert rope_scaling({**base, "dim": 3072, "n_layers": 28})["factor"] == 32.0  # Llama 3.2 3B
    assert rope_scaling({**base, "rope_scaling_factor": 16, "rope_high_freq_factor": 1}) == \
        {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
         "original_max_position_embeddings": 8192}
    assert rope_scaling({"dim": 4096, "n_layers": 32}) is None


def test_permute_rotary_matches_index_arithmetic():
    n_heads, hd, d2 = 4, 8, 6
    w = torch.randn(n_heads * hd, d2)
    rows = [h * hd + 2 * j + half for h in range(n_heads) for half in (0, 1) for j in range(hd // 2)]
    assert torch.equal(permute_rotary(w, n_heads), w[rows])
    # rank by rank, straight into a preallocated fp16 output: the same rows, cast
    out = torch.empty(n_heads * hd, d2, dtype=torch.float16)
    for r in range(2):
        part = w[r * 2 * hd:(r + 1) * 2 * hd]
        permute_rotary(part, 2, out=out[r * 2 * hd:(r + 1) * 2 * hd])
    assert torch.equal(out, w[rows].half())


def test_names():
    names = meta_names(3)
    assert len(names) == 2 + 9 * 3 + 1 and names[0] == "tok_embeddings.weight"
    assert meta_names(3, tied=True)[-1] == "norm.weight"
    assert hf_name("layers.2.feed_forward.w1.weight") == "model.layers.2.mlp.gate_proj.weight"
    assert hf_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("layers.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("output.weight") == "lm_head.weight"


# fairscale: ColumnParallelLinear splits rows, RowParallelLinear columns, norms are replicated;
# ParallelEmbedding (Llama 1/2, Code Llama) splits the width, VocabParallelEmbedding the vocab.
FAIRSCALE = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
             "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
             "feed_forward.w3.weight": 0, "output.weight": 0}


@pytest.mark.parametrize("name,embedding_dim", [("codellama-34b", 1), ("llama3", 0)])
def test_write_meta_checkpoint_splits_like_fairscale(tmp_path, name, embedding_dim):
    spec, n = SPECS[name], 4
    state = random_state(spec)
    tok = sentencepiece_model() if embedding_dim else tiktoken_model()
    write_meta_checkpoint(tmp_path, spec.params, state, n, tok)
    shards = [torch.load(tmp_path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(n)]
    for key, full in state.items():
        short = key.split(".", 2)[-1] if key.startswith("layers.") else key
        dim = embedding_dim if short == "tok_embeddings.weight" else FAIRSCALE.get(short)
        for r, s in enumerate(shards):
            assert s[key].dtype == torch.bfloat16
            want = full if dim is None else full.narrow(dim, r * full.shape[dim] // n, full.shape[dim] // n)
            assert torch.equal(s[key], want.to(torch.bfloat16)), (key, r)
    assert ("rope.freqs" in shards[0]) == bool(embedding_dim)  # Llama 1/2-style shards carry it
    total = sum(p.stat().st_size for p in tmp_path.glob("consolidated.*.pth"))
    assert (tmp_path / "consolidated.00.pth").stat().st_size < 0.3 * total  # slices, not storages
    assert json.loads((tmp_path / "params.json").read_text()) == spec.params
    sums = dict(reversed(line.split()) for line in (tmp_path / "checklist.chk").read_text().splitlines())
    assert set(sums) == {*(f"consolidated.{r:02d}.pth" for r in range(n)), "params.json", "tokenizer.model"}
    for f, md5 in sums.items():
        assert hashlib.md5((tmp_path / f).read_bytes()).hexdigest() == md5
    assert verify_checksums(tmp_path) == sums


def test_write_meta_checkpoint_refuses_uneven_split(tmp_path):
    spec = SPECS["codellama-34b"]
    with pytest.raises(ValueError, match="does not split into 3 shards"):
        write_meta_checkpoint(tmp_path, spec.params, random_state(spec), 3, sentencepiece_model())


def test_load_shard_accepts_only_dicts_of_tensors(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(InputError, match=r"list\.pth: expected a dict of tensors, found list"):
        load_shard(tmp_path / "list.pth")
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(InputError, match=r"mixed\.pth: entries that are not tensors: \['step'\]"):
        load_shard(tmp_path / "mixed.pth")
    torch.save(torch.zeros(2), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.pth: cannot read"):
        load_shard(tmp_path / "legacy.pth")


def test_checklist_errors(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "checklist.chk").write_text(f"{hashlib.md5(b'{}').hexdigest()}  params.json\n"
                                            f"{'0' * 32}  consolidated.00.pth\n")
    with pytest.raises(InputError, match=r"lists \['consolidated\.00\.pth'\] but they are not"):
        verify_checksums(tmp_path)
    (tmp_path / "checklist.chk").write_text("not a checksum line\n")
    with pytest.raises(InputError, match=r"checklist\.chk:1: not an `md5  filename` line"):
        verify_checksums(tmp_path)


def test_release_and_prefetch_keep_data(tmp_path):
    w = torch.randn(512, 512)
    torch.save({"w": w}, tmp_path / "s.pth")
    t = load_shard(tmp_path / "s.pth")["w"]
    prefetch(t)
    assert torch.equal(t, w)
    release(t)
    assert torch.equal(t, w)
