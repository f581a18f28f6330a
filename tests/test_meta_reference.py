"""The independent Meta forward: MetaTransformer against transformers (weights permuted here, by
index arithmetic), the streamed model-parallel meta_logits against MetaTransformer, RoPE against
the textbook rotation, and Llama 3.1's frequency scaling against Meta's scalar loop."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meta_fixtures import SPECS, random_state, tokenizer_for
from pipeline.meta import write_meta_checkpoint
from verify.meta_reference import (MetaTransformer, apply_rotary_emb, meta_logits,
                                   precompute_freqs_cis)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def params_with_vocab(name: str) -> dict:
    return {**SPECS[name].params, "vocab_size": SPECS[name].vocab}


def bf16_state(name: str) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).float() for k, v in random_state(SPECS[name]).items()}


def meta_model(name: str) -> MetaTransformer:
    model = MetaTransformer(params_with_vocab(name))
    model.load_state_dict(bf16_state(name), strict=True)
    return model.eval()


def rotate_half_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Meta row feeding each HF row: HF's first half of a head takes the even (real) members of
    Meta's interleaved pairs, its second half the odd ones."""
    idx = []
    for h in range(n_heads):
        idx += [h * head_dim + 2 * j for j in range(head_dim // 2)]
        idx += [h * head_dim + 2 * j + 1 for j in range(head_dim // 2)]
    return torch.tensor(idx)


def transformers_model(name: str) -> LlamaForCausalLM:
    p, spec = SPECS[name].params, SPECS[name]
    n_heads, n_kv = p["n_heads"], p.get("n_kv_heads") or p["n_heads"]
    hd = p["dim"] // n_heads
    cfg = LlamaConfig.from_dict({
        "hidden_size": p["dim"], "intermediate_size": spec.ffn, "num_hidden_layers": p["n_layers"],
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "vocab_size": spec.vocab,
        "rms_norm_eps": p["norm_eps"], "rope_theta": p.get("rope_theta", 10000.0),
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if p.get("use_scaled_rope") else None,
        "max_position_embeddings": 4096, "tie_word_embeddings": False})
    s = bf16_state(name)
    hf = {"model.embed_tokens.weight": s["tok_embeddings.weight"], "model.norm.weight": s["norm.weight"],
          "lm_head.weight": s["output.weight"]}
    for i in range(p["n_layers"]):
        m, L = f"layers.{i}.", f"model.layers.{i}."
        hf |= {L + "self_attn.q_proj.weight": s[m + "attention.wq.weight"][rotate_half_rows(n_heads, hd)],
               L + "self_attn.k_proj.weight": s[m + "attention.wk.weight"][rotate_half_rows(n_kv, hd)],
               L + "self_attn.v_proj.weight": s[m + "attention.wv.weight"],
               L + "self_attn.o_proj.weight": s[m + "attention.wo.weight"],
               L + "mlp.gate_proj.weight": s[m + "feed_forward.w1.weight"],
               L + "mlp.up_proj.weight": s[m + "feed_forward.w3.weight"],
               L + "mlp.down_proj.weight": s[m + "feed_forward.w2.weight"],
               L + "input_layernorm.weight": s[m + "attention_norm.weight"],
               L + "post_attention_layernorm.weight": s[m + "ffn_norm.weight"]}
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(hf, strict=True)
    return model.eval()


def tokens_for(name: str, T: int = 96) -> torch.Tensor:
    return torch.randint(0, SPECS[name].vocab, (2, T), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", ["llama2", "codellama-34b", "llama3.1"])
def test_meta_transformer_matches_transformers(name):
    tokens = tokens_for(name)
    with torch.no_grad():
        ours, theirs = meta_model(name)(tokens), transformers_model(name)(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (2, 96, SPECS[name].vocab)
    assert max_rel_err(ours, theirs) <= 1e-4


@pytest.mark.parametrize("name,n_shards", [("llama1", 1), ("codellama-7b", 2),
                                           ("codellama-34b", 4), ("llama3", 2), ("llama3.1", 4)])
def test_streamed_model_parallel_forward_matches_meta_transformer(tmp_path, name, n_shards):
    write_meta_checkpoint(tmp_path, params_with_vocab(name), bf16_state(name), n_shards,
                          tokenizer_for(SPECS[name]))
    tokens = tokens_for(name, T=40)
    with torch.no_grad():
        want = meta_model(name)(tokens)
    got = meta_logits(tmp_path, tokens)
    assert got.dtype == torch.float32 and max_rel_err(got, want) <= 1e-5


def test_meta_logits_in_bfloat16_tracks_float32(tmp_path):
    write_meta_checkpoint(tmp_path, params_with_vocab("llama3"), bf16_state("llama3"), 2,
                          tokenizer_for(SPECS["llama3"]))
    tokens = tokens_for("llama3", T=24)
    low, high = meta_logits(tmp_path, tokens, dtype=torch.bfloat16), meta_logits(tmp_path, tokens)
    assert low.dtype == torch.float32 and 0 < max_rel_err(low, high) < 5e-2


def test_rotary_rotates_interleaved_pairs():
    hd, T, theta = 8, 7, 10000.0
    x = torch.randn(1, T, 1, hd, dtype=torch.float32)
    got = apply_rotary_emb(x, precompute_freqs_cis(hd, T, theta))[0, :, 0].double()
    xd = x[0, :, 0].double()
    for t in range(T):
        for i in range(hd // 2):
            a = t * theta ** (-2 * i / hd)
            re, im = xd[t, 2 * i], xd[t, 2 * i + 1]
            assert got[t, 2 * i] == pytest.approx(float(re * math.cos(a) - im * math.sin(a)), abs=1e-5)
            assert got[t, 2 * i + 1] == pytest.approx(float(re * math.sin(a) + im * math.cos(a)), abs=1e-5)


def test_llama31_frequency_scaling_matches_meta_loop():
    """Meta's apply_scaling, written as its original scalar loop, on Llama 3.1 8B's RoPE."""
    hd, theta = 128, 500000.0
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    want = []
    for i in range(0, hd, 2):
        f = 1.0 / theta ** (i / hd)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    got = precompute_freqs_cis(hd, 2, theta, scaling)[1].angle().double()
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    plain = precompute_freqs_cis(hd, 2, theta)[1].angle()
    assert (got[:20] == plain[:20].double()).all() and (got[-20:] < plain[-20:] / 7.9).all()


def test_meta_transformer_trains():
    torch.manual_seed(0)
    model = MetaTransformer(params_with_vocab("llama3"))
    assert set(model.state_dict()) == set(random_state(SPECS["llama3"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = tokens_for("llama3", T=16)
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_meta_transformer_needs_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        MetaTransformer(SPECS["llama2"].params)
