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
    assert list(TYPES) == ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    for name, t in TYPES.items():
        assert t.name == name and TYPE_OF_FTYPE[int(t.ftype)] == name and t.use_case
        assert set(t.thresholds) == set(th.GGUF_KINDS)
        assert th.gguf_thresholds(name) == t.thresholds  # verify's defaults are the catalogue's
    bits = [t.bits for t in TYPES.values()]
    assert bits == sorted(bits, reverse=True)
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
