"""The streaming writer's files must read back, byte for byte, through the safetensors library."""

import json

import pytest
import torch
from safetensors import safe_open

from pipeline.core.bounded import parse_size
from pipeline.core.safetensors_stream import INDEX_NAME, ShardedWriter, TensorSpec


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.qweight": torch.randint(-2**31, 2**31 - 1, (4, 3), dtype=torch.int32, generator=g),
        "c.scales": torch.randn(3, generator=g).half(),
        "d.bias": torch.randn(2, 2, 2, generator=g),
    }


@pytest.mark.parametrize("max_bytes,n_files", [(10**9, 1), (80, 3)])
def test_round_trip_through_safetensors(tmp_path, max_bytes, n_files):
    tensors = _tensors()
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ShardedWriter(tmp_path, specs, max_bytes) as w:
        for k, v in tensors.items():
            w.write(k, v)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == n_files
    seen = {}
    for f in files:
        with safe_open(tmp_path / f, framework="pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for k in fh.keys():
                seen[k] = (f, fh.get_tensor(k))
    assert set(seen) == set(tensors)
    for k, v in tensors.items():
        assert seen[k][1].dtype == v.dtype
        assert torch.equal(seen[k][1], v)
    if n_files > 1:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert index["weight_map"] == {k: f for k, (f, _) in seen.items()}
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    else:
        assert not (tmp_path / INDEX_NAME).exists()


def test_rejects_unplanned_or_misshapen_tensors(tmp_path):
    t = _tensors()["a.weight"]
    w = ShardedWriter(tmp_path, [TensorSpec("a.weight", t.dtype, tuple(t.shape))], 10**9)
    with pytest.raises(RuntimeError, match="expected a.weight"):
        w.write("a.weight", t.float())
    with pytest.raises(RuntimeError, match="not written"):
        w.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")
