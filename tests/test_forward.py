"""verify.forward against transformers: the same logits, NLL and greedy tokens on fp16 and on
GPTQ-packed directories (packed here by an independent 4-bit packer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import verify.forward as forward
from pipeline.core.checkpoint import HFCheckpoint
from pipeline.core.errors import InputError
from pipeline.core.llama import LlamaArgs
from verify.forward import LayerwiseModel

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHAPES = {
    "gqa": dict(num_key_value_heads=2, rope_theta=1e6),
    "tied-llama3-rope": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=5e5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 16}),
}


def make_hf_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama saved by transformers in float16 (weights scaled up so logits are spread)."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
    cfg = LlamaConfig(**{**kw, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.to(torch.float16).save_pretrained(directory)
    return directory


def hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return model(tokens).logits


def pack4(values: torch.Tensor) -> torch.Tensor:
    """int values [n, m] in [0, 16) -> int32 [n/8, m]: value j of a word at bits 4j (LSB first)."""
    n, m = values.shape
    v = values.to(torch.int64).view(n // 8, 8, m)
    words = sum(v[:, j] << (4 * j) for j in range(8))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def make_gptq_4bit(src: Path, out: Path, group_size: int, act_order: bool, seed: int = 1) -> dict:
    """Replace every linear of the fp16 model in src by random 4-bit GPTQ v1 tensors; write the
    model with W = scales · (q − zeros) per linear into `out`/reference for transformers."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(src / "model.safetensors")
    reference = dict(tensors)
    for name in list(tensors):
        if not any(name.endswith(f"{lin}.weight") for lin in LINEARS):
            continue
        prefix = name[: -len(".weight")]
        W = tensors.pop(name)
        n_out, n_in = W.shape
        n_groups = n_in // group_size
        q = torch.randint(0, 16, (n_out, n_in), generator=g)
        zeros = torch.randint(1, 16, (n_groups, n_out), generator=g)
        scales = (0.01 + 0.02 * torch.rand(n_groups, n_out, generator=g)).half()
        g_idx = torch.arange(n_in) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(n_in, generator=g)]
        tensors[f"{prefix}.qweight"] = pack4(q.t())
        tensors[f"{prefix}.qzeros"] = pack4((zeros - 1).t()).t().contiguous()
        tensors[f"{prefix}.scales"] = scales
        tensors[f"{prefix}.g_idx"] = g_idx.to(torch.int32)
        reference[name] = (scales.float()[g_idx].t() * (q - zeros[g_idx].t()).float()).contiguous()
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"bits": 4, "group_size": group_size, "desc_act": act_order,
                                  "sym": False, "quant_method": "gptq", "checkpoint_format": "gptq"}
    (out / "config.json").write_text(json.dumps(cfg))
    ref = out.parent / f"{out.name}-reference"
    shutil.copytree(src, ref)
    save_file(reference, ref / "model.safetensors")
    return {"gptq": out, "reference": ref}


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("fp16") / "model")


def tokens(B: int, T: int, V: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(tmp_path, shape):
    d = make_hf_model(tmp_path / "m", **SHAPES[shape])
    x = tokens(3, 40)
    m = LayerwiseModel(d, progress=False)
    (h,) = m.hidden([x])
    ours, ref = m.logits(h), hf_logits(d, x)
    assert ours.shape == ref.shape == (3, 40, 96)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_nll_chunked_equals_cross_entropy_of_transformers_logits(fp16_dir, monkeypatch):
    x = tokens(5, 33, seed=1)
    ref = hf_logits(fp16_dir, x)
    expected = torch.stack([F.cross_entropy(ref[b, :-1], x[b, 1:], reduction="sum")
                            for b in range(5)]).double()
    monkeypatch.setattr(forward, "HEAD_ELEMENTS", 96 * 7)  # 7 rows at a time at the head
    m = LayerwiseModel(fp16_dir, chunk_tokens=40, progress=False)  # one window per layer call
    (h,) = m.hidden([x])
    torch.testing.assert_close(m.nll(h, x), expected, rtol=1e-5, atol=1e-4)


def test_each_layer_loaded_once_for_all_batches(fp16_dir, monkeypatch):
    calls = []
    original = HFCheckpoint.layer_state
    monkeypatch.setattr(HFCheckpoint, "layer_state",
                        lambda self, i: calls.append(i) or original(self, i))
    a, b = tokens(2, 16, seed=2), tokens(3, 24, seed=3)
    m = LayerwiseModel(fp16_dir, chunk_tokens=16, resident=False, progress=False)
    ha, hb = m.hidden([a, b])
    assert calls == [0, 1, 2]
    torch.testing.assert_close(m.logits(ha), hf_logits(fp16_dir, a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.logits(hb), hf_logits(fp16_dir, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size,act_order", [(32, False), (16, True)])
def test_gptq_forward_dequantises_packed_weights(fp16_dir, tmp_path, group_size, act_order):
    dirs = make_gptq_4bit(fp16_dir, tmp_path / "q", group_size, act_order)
    x = tokens(2, 24, seed=4)
    m = LayerwiseModel(dirs["gptq"], progress=False)
    assert m.bits == 4
    (h,) = m.hidden([x])
    torch.testing.assert_close(m.logits(h), hf_logits(dirs["reference"], x), rtol=1e-5, atol=1e-5)


def test_greedy_matches_transformers_generate(fp16_dir):
    prompts = [[1, 5, 9, 33, 70], [1, 42]]
    model = LlamaForCausalLM.from_pretrained(fp16_dir, dtype=torch.float32)
    expected = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    m = LayerwiseModel(fp16_dir, progress=False)
    assert m.greedy(prompts, 10) == expected
    assert LayerwiseModel(fp16_dir, resident=False, progress=False).greedy(prompts, 10) == expected


def test_greedy_stops_at_eos(fp16_dir):
    m = LayerwiseModel(fp16_dir, progress=False)
    free = m.greedy([[1, 5, 9]], 6)[0]
    assert m.greedy([[1, 5, 9]], 6, eos_id=free[1]) == [free[:2]]


def test_missing_tensor_is_named(fp16_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(fp16_dir, d)
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(InputError, match=r"layer 1 .*mlp\.up_proj"):
        LayerwiseModel(d, progress=False).hidden([tokens(1, 8)])


def test_missing_gptq_part_is_named(fp16_dir, tmp_path):
    q = make_gptq_4bit(fp16_dir, tmp_path / "q", 32, False)["gptq"]
    t = load_file(q / "model.safetensors")
    del t["model.layers.2.self_attn.k_proj.g_idx"]
    save_file(t, q / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.2\.self_attn\.k_proj\.g_idx"):
        LayerwiseModel(q, progress=False).hidden([tokens(1, 8)])


@pytest.mark.parametrize("data,message", [
    (None, r"config\.json: file not found$"), (b"[1, 2]", r"config\.json: expected a JSON object, got list"),
    (b"{", r"config\.json: invalid JSON"), (b"\xff{}", r"config\.json: not UTF-8 text")])
def test_json_files_are_read_by_one_reader_naming_the_file(tmp_path, data, message):
    """pipeline/core/bounded.py read_json reads every small JSON file (configs, the index, the stages'
    records for the cards): its errors fit any of them (no "GPTQ artifact" for an fp16 file)."""
    from pipeline.core.bounded import read_json

    path = tmp_path / "config.json"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(InputError, match=message):
        read_json(path)
    if data is not None:  # HFCheckpoint reads its config.json through it
        with pytest.raises(InputError, match=message):
            HFCheckpoint(tmp_path)


def test_token_outside_vocabulary(fp16_dir):
    with pytest.raises(InputError, match="token id 96 outside"):
        LayerwiseModel(fp16_dir, progress=False).hidden([torch.tensor([[1, 96]])])


def test_unsupported_quantization_format(fp16_dir, tmp_path):
    d = tmp_path / "awq"
    shutil.copytree(fp16_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"bits": 4, "quant_method": "awq"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="only GPTQ v1"):
        LayerwiseModel(d, progress=False)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_layer_geometry_matches_transformers(heads, kv_heads):
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=96, vocab_size=32)
    layer = LlamaForCausalLM(cfg).model.layers[0]
    a = LlamaArgs.from_hf_config(cfg.to_dict())
    assert a.linear_shapes() == {n: tuple(layer.get_submodule(n).weight.shape) for n in LINEARS}
    assert a.layer_numel() == sum(p.numel() for p in layer.parameters())
    assert (a.q_dim, a.kv_dim) == (64, 64 // heads * kv_heads)
