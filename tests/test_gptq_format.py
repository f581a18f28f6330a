"""GPTQ v1 packing against an independent pure-Python bit-stream packer and the documented 3-bit
layout; dequantisation against the formula; the config files."""

import json

import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.core.gptq_format import (dequantize, pack, pack_rows, quantize_config, unpack_rows,
                                       write_configs)
from pipeline.core.gptq_layout import n_groups, ragged
from pipeline.methods import QuantSpec


def python_pack_column(values: list[int], bits: int) -> list[int]:
    """Reference: each run of 32 values is one LSB-first bit stream of 32·bits bits, cut into
    int32 words (two's complement), as the format description says."""
    words = []
    for c in range(0, len(values), 32):
        stream = sum(v << (bits * j) for j, v in enumerate(values[c:c + 32]))
        for k in range(bits):
            u = (stream >> (32 * k)) & 0xFFFFFFFF
            words.append(u - 2**32 if u >= 2**31 else u)
    return words


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_matches_reference_and_round_trips(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (96, 5), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 5)
    for col in range(5):
        assert packed[:, col].tolist() == python_pack_column(values[:, col].tolist(), bits)
    assert torch.equal(unpack_rows(packed, bits), values.to(torch.int32))


def test_three_bit_layout_as_documented():
    def words_with(value_index: int, value: int) -> list[int]:
        v = torch.zeros(32, 1, dtype=torch.long)
        v[value_index] = value
        return [w & 0xFFFFFFFF for w in pack_rows(v, 3)[:, 0].tolist()]

    assert words_with(9, 0b111) == [0b111 << 27, 0, 0]
    # value 10: low 2 bits at bits 30-31 of word A, bit 2 at bit 0 of word B
    assert words_with(10, 0b011) == [0b11 << 30, 0, 0]
    assert words_with(10, 0b100) == [0, 1, 0]
    assert words_with(11, 0b111) == [0, 0b111 << 1, 0]
    # value 21: bit 0 at bit 31 of word B, bits 1-2 at bits 0-1 of word C
    assert words_with(21, 0b001) == [0, 1 << 31, 0]
    assert words_with(21, 0b110) == [0, 0, 0b11]
    assert words_with(22, 0b111) == [0, 0, 0b111 << 2]
    assert words_with(31, 0b101) == [0, 0, 0b101 << 29]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("gs", [32, 48])  # 48: 128 inputs make groups of 48, 48 and a partial 32
def test_dequantize_inverts_pack(bits, act_order, gs):
    g = torch.Generator().manual_seed(10 + bits)
    n_out, n_in = 64, 128
    G = -(-n_in // gs)
    assert ragged(n_in, gs) == (gs == 48) and n_groups(n_in, gs) == G
    q = torch.randint(0, 2**bits, (n_out, n_in), generator=g)
    zeros = torch.randint(1, 2**bits, (G, n_out), generator=g)
    scales = (torch.rand(G, n_out, generator=g) * 0.1 + 1e-3).half().float()
    g_idx = torch.arange(n_in) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(n_in, generator=g)]
    t = pack(q, zeros, scales, g_idx, bits)
    assert t["qweight"].shape == (n_in * bits // 32, n_out)
    assert t["qzeros"].shape == (G, n_out * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    W = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    expect = torch.empty(n_out, n_in)
    for i in range(n_in):  # the formula of the notes, column by column
        k = int(g_idx[i])
        expect[:, i] = scales[k] * (q[:, i] - zeros[k]).float()
    assert W.dtype == torch.float32 and torch.equal(W, expect)


def test_zero_point_is_stored_minus_one():
    q = torch.zeros(32, 32, dtype=torch.long)
    t = pack(q, torch.full((1, 32), 8), torch.ones(1, 32), torch.zeros(32, dtype=torch.long), 4)
    assert t["qzeros"][0, 0].item() == 0x77777777  # eight 4-bit 7s


def test_dequantize_rejects_mismatched_tensors():
    t = pack(torch.zeros(32, 64, dtype=torch.long), torch.ones(2, 32, dtype=torch.long),
             torch.ones(2, 32), torch.arange(64) // 32, 4)
    with pytest.raises(InputError, match="layers.0.q_proj.qweight"):
        dequantize(t["qweight"][:-1], t["qzeros"], t["scales"], t["g_idx"], 4,
                   name="layers.0.q_proj")
    with pytest.raises(InputError, match="g_idx"):
        dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"] + 5, 4)
    with pytest.raises(InputError, match="multiple of 32"):
        pack_rows(torch.zeros(40, 2, dtype=torch.long), 4)


def test_configs_written_both_ways(tmp_path):
    spec = QuantSpec(bits=3, group_size=64, act_order=True, sym=False, damp=0.1)
    write_configs(tmp_path, {"model_type": "llama", "rope_theta": 1e6, "torch_dtype": "bfloat16"}, spec)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert qc == cfg["quantization_config"] == quantize_config(spec)
    assert qc["bits"] == 3 and qc["group_size"] == 64 and qc["desc_act"] is True
    assert qc["sym"] is False and qc["damp_percent"] == 0.1 and qc["static_groups"] is False
    assert qc["true_sequential"] is True and qc["quant_method"] == "gptq"
    assert qc["checkpoint_format"] == "gptq" and qc["model_file_base_name"] == "model"
    assert "model_name_or_path" in qc
    assert cfg["rope_theta"] == 1e6 and cfg["torch_dtype"] == "float16"
