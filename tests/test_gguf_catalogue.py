"""The GGUF type catalogue (pipeline/core/gguf_types.py) is the one table of types, and a
quantised file is made only from an F16 GGUF file (gguf --f16, the job's F16 task)."""

from __future__ import annotations

import gguf
import pytest

from pipeline.core.errors import InputError
from pipeline.core.gguf_types import TYPE_OF_FTYPE, TYPES
from pipeline.gguf import check_f16
from verify import thresholds as th


def test_every_type_has_its_bits_use_case_and_every_threshold_kind():
    thebloke = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_S",
                "Q5_K_M", "Q6_K", "Q8_0"]
    iq = ["IQ4_XS", "IQ3_XXS", "IQ3_M", "IQ2_XS", "IQ2_M"]
    assert set(TYPES) == {"F16", *thebloke, *iq}
    assert {n for n, t in TYPES.items() if t.needs_imatrix} == set(iq)  # unusable without one
    for name, t in TYPES.items():
        assert 2 <= t.bpw <= 16 and t.bits <= t.bpw < t.bits + 1 or name == "F16"
        assert t.name == name and TYPE_OF_FTYPE[int(t.ftype)] == name and t.use_case
        assert set(t.thresholds) == set(th.GGUF_KINDS)
        assert th.gguf_thresholds(name) == t.thresholds  # verify's defaults are the catalogue's
    bits = [t.bits for t in TYPES.values()]
    assert bits == sorted(bits, reverse=True)  # the table (and the cards) run widest first
    assert th.gguf_thresholds("Q4_K_M", {"tolerance": 0.5})["tolerance"] == 0.5
    with pytest.raises(ValueError, match="unknown GGUF threshold kind"):
        th.gguf_thresholds("Q4_K_M", {"ppl": 1.0})


def gguf_file(path, ftype: int):
    """A GGUF file with no tensors and the given general.file_type."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(ftype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_a_quantised_type_is_made_only_from_an_f16_file(tmp_path):
    check_f16(gguf_file(tmp_path / "m.F16.gguf", int(TYPES["F16"].ftype)), tmp_path)
    q8 = gguf_file(tmp_path / "m.Q8_0.gguf", int(TYPES["Q8_0"].ftype))
    with pytest.raises(InputError, match=r"m\.Q8_0\.gguf: not an F16 GGUF file \(general\.file_type 7\)"):
        check_f16(q8, tmp_path)
    with pytest.raises(InputError, match=r"missing\.gguf: F16 GGUF file missing"):
        check_f16(tmp_path / "missing.gguf", tmp_path)


def test_an_iq_type_is_refused_without_an_importance_matrix(tmp_path):
    from pipeline.gguf import check_imatrix

    with pytest.raises(InputError, match=r"--type IQ2_XS: needs an importance matrix \(--imatrix"):
        check_imatrix(TYPES["IQ2_XS"], None)
    assert check_imatrix(TYPES["Q4_K_M"], None) is None  # K-quants take one, need none
    not_imatrix = gguf_file(tmp_path / "m.F16.gguf", int(TYPES["F16"].ftype))
    with pytest.raises(InputError, match=r"m\.F16\.gguf: not an importance matrix"):
        check_imatrix(TYPES["IQ2_XS"], not_imatrix)
    with pytest.raises(InputError, match="F16 is not quantised"):
        check_imatrix(TYPES["F16"], not_imatrix)
    # llama.cpp's Q8_0 quantiser ignores the weights it is given (ggml-quants.c quantize_q8_0)
    with pytest.raises(InputError, match=r"Q8_0 does not use an importance matrix \(llama\.cpp "
                                         r"rounds it to nearest\)"):
        check_imatrix(TYPES["Q8_0"], not_imatrix)
    assert [t for t in TYPES if not TYPES[t].uses_imatrix] == ["F16", "Q8_0"]


def test_verify_refuses_an_imatrix_file_without_its_f16_source(tmp_path):
    """A file made with an importance matrix (llama-quantize's record in it) is judged against
    its type made without one from the F16 file: verify refuses it with no F16 file beside it,
    and refuses an --imatrix that is not an importance matrix; the names must be distinct."""
    from verify.stage import check_ggufs

    w = gguf.GGUFWriter(str(tmp_path / "m.Q4_K_M.gguf"), "llama")
    w.add_file_type(int(TYPES["Q4_K_M"].ftype))
    w.add_string("quantize.imatrix.file", "m.imatrix.gguf")
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_ti_data_to_file,
                 w.close):
        step()
    q4 = tmp_path / "m.Q4_K_M.gguf"
    with pytest.raises(InputError, match=r"m\.Q4_K_M\.gguf: made with an importance matrix.*"
                                         r"verify that too \(--gguf FILE\.F16\.gguf\)"):
        check_ggufs([q4], ["fp16"], {}, None)
    f16 = gguf_file(tmp_path / "m.F16.gguf", int(TYPES["F16"].ftype))
    assert check_ggufs([q4, f16], ["fp16"], {}, None) == f16
    other = gguf_file(tmp_path / "other.gguf", int(TYPES["F16"].ftype))
    with pytest.raises(InputError, match=r"other\.gguf: not an importance matrix"):
        check_ggufs([q4, f16], ["fp16"], {}, other)
    with pytest.raises(InputError, match=r"artifact name 'm\.F16\.gguf' is already taken"):
        check_ggufs([q4, f16], ["fp16"], {}, f16)
