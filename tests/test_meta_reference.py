"""The independent Meta forward: MetaTransformer against transformers (weights permuted here, by
index arithmetic), the streamed model-parallel meta_logits against MetaTransformer, RoPE against
the textbook rotation, Llama 3.1's frequency scaling against Meta's scalar loop, params.json read
with Meta's defaults (FFN widths of released models), and a wrong converter default caught."""

from __future__ import annotations

import json
import math

import pytest
import torch
from meta_fixtures import SPECS, random_state, tokenizer_for
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.core.errors import InputError
from pipeline.core.meta import write_meta_checkpoint
from verify.meta_reference import (MetaTransformer, ModelArgs, apply_rotary_emb, meta_logits,
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


def meta_loop_freqs(head_dim: int, theta: float, factor: float) -> list[float]:
    """Meta's apply_scaling written as its original scalar loop (llama-models, Llama 3.1):
    low 1, high 4, original context 8192."""
    want = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            want.append(f)
        elif wavelen > 8192 / 1:
            want.append(f / factor)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            want.append((1 - s) * f / factor + s * f)
    return want


# Meta's params.json of real models (vocab left out) and the FFN width their w1 holds.
REAL_PARAMS = {
    "Llama-2-7B": (dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5,
                        vocab_size=-1), 11008),
    "Llama-2-13B": (dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, norm_eps=1e-5,
                         vocab_size=-1), 13824),
    "CodeLlama-34B": (dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256,
                           ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1000000,
                           vocab_size=-1), 22016),
    "Llama-2-70B": (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3, norm_eps=1e-5, vocab_size=-1), 28672),
    "Llama-3-8B": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                        multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                        rope_theta=500000.0), 14336),
    "Llama-3.1-8B": (dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                          multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                          rope_theta=500000.0, use_scaled_rope=True), 14336),
    "Llama-3.2-1B": (dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                          ffn_dim_multiplier=1.5, multiple_of=256, norm_eps=1e-5,
                          rope_theta=500000.0, use_scaled_rope=True), 8192),
}


@pytest.mark.parametrize("name", REAL_PARAMS)
def test_ffn_width_is_metas_rule_on_real_params(name):
    """Known widths of released models (their w1 shapes), not the code's own arithmetic."""
    params, ffn = REAL_PARAMS[name]
    assert ModelArgs.from_params(params).hidden_dim == ffn


def test_params_defaults_are_metas():
    """Llama 2 7B's params.json leaves out n_kv_heads and rope_theta: 32 kv heads, θ 10000."""
    a = ModelArgs.from_params({"model": REAL_PARAMS["Llama-2-7B"][0]})  # wrapped, as some ship
    assert (a.n_kv_heads, a.rope_theta, a.use_scaled_rope, a.vocab_size) == (32, 10000.0, False, -1)
    assert ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": None}) \
        == ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, multiple_of=256, norm_eps=1e-5)
    for bad, key in [({"dim": 64, "n_layers": 1}, "n_heads"), ({"dim": 64.0, "n_layers": 1,
                      "n_heads": 4}, "dim"), ({"dim": 64, "n_layers": 1, "n_heads": 4,
                      "rope_theta": "1e6"}, "rope_theta")]:
        with pytest.raises(ValueError, match=key):
            ModelArgs.from_params(bad)


@pytest.mark.parametrize("name,factor", [("Llama-3.1-8B", 8.0), ("Llama-3.2-1B", 32.0)])
def test_scaled_rope_frequencies_match_meta_loop(name, factor):
    """Llama 3.1's frequency scaling against Meta's scalar loop, with factor 8 (3.1 8B) and 32
    (3.2 1B/3B: Meta's maintainers, llama-models#166; their params.json does not say)."""
    a = ModelArgs.from_params(REAL_PARAMS[name][0])
    got = a.freqs_cis(2)[1].angle().double()
    assert got.tolist() == pytest.approx(meta_loop_freqs(a.head_dim, 500000.0, factor), rel=1e-5)
    plain = precompute_freqs_cis(a.head_dim, 2, 500000.0)[1].angle()
    assert (got[:10] == plain[:10].double()).all()  # wavelengths under 2048: kept
    assert (got[-5:] < plain[-5:] / (factor - 0.1)).all()
    explicit = ModelArgs.from_params({**REAL_PARAMS[name][0], "rope_scaling_factor": 16.0})
    assert explicit.freqs_cis(2)[1].angle().double().tolist() \
        == pytest.approx(meta_loop_freqs(a.head_dim, 500000.0, 16.0), rel=1e-5)


def test_params_that_disagree_with_the_shards_are_refused(tmp_path):
    """meta_logits derives the FFN width, head counts and vocab from params.json, and a shard
    that does not hold them is refused (as loading into Meta's modules would be)."""
    spec = SPECS["llama3"]
    write_meta_checkpoint(tmp_path, params_with_vocab("llama3"), bf16_state("llama3"), 2,
                          tokenizer_for(spec))
    params = json.loads((tmp_path / "params.json").read_text())
    tokens = tokens_for("llama3", T=8)
    for key, value, what in [("ffn_dim_multiplier", None, "feed_forward.w1.weight"),
                             ("n_kv_heads", None, "attention.wk.weight"),
                             ("vocab_size", 1000, "output.weight")]:
        (tmp_path / "params.json").write_text(json.dumps({**params, key: value}))
        with pytest.raises(InputError, match=what):
            meta_logits(tmp_path, tokens)


def test_conversion_parity_catches_a_wrong_converter_default(tmp_path, monkeypatch):
    """The reference shares no default with the converter: with the converter's Llama 3.1 RoPE
    factor wrong (4, not 8) the converted model no longer matches the reference. Measured at
    T=256: 1.8e-2 relative, against 1.1e-6 for the right conversion; 1e-3 leaves 18x room below
    the broken one and ~1000x above float noise on any CPU."""
    from transformers import AutoModelForCausalLM

    import pipeline.core.meta
    from pipeline.convert import convert

    build = pipeline.core.meta.rope_scaling
    spec = SPECS["llama3.1"]
    write_meta_checkpoint(tmp_path / "meta", params_with_vocab("llama3.1"), bf16_state("llama3.1"),
                          2, tokenizer_for(spec))
    monkeypatch.setattr(pipeline.core.meta, "rope_scaling",
                        lambda p, tied=False: {**build(p, tied), "factor": 4.0})
    convert(tmp_path / "meta", tmp_path / "hf")
    tokens = tokens_for("llama3.1", T=256)
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(tokens).logits
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["factor"] == 4.0
    assert max_rel_err(hf, meta_logits(tmp_path / "meta", tokens)) > 1e-3


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
