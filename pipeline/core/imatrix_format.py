"""llama.cpp's importance matrix file (GGUF; tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):
`general.type = "imatrix"`, `imatrix.datasets` (strings), `imatrix.chunk_count` and
`imatrix.chunk_size` (u32); per weight, under its GGUF name, `<name>.in_sum2` (F32, ggml shape
[n_in, 1]: Σx² per input column) and `<name>.counts` (F32 [1, 1]: the rows summed). The quantiser
weighs each column's rounding error by in_sum2 / counts. This pipeline adds one key of its own,
ACTIVATIONS: whose activations were summed (the fp16 model's, or those of a GPTQ pass)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from pipeline.core.bounded import gguf_reader
from pipeline.core.errors import InputError


ACTIVATIONS = "llama_gptq_pipeline.activations"  # ours: whose activations (llama.cpp ignores it)
FP16_ACTIVATIONS = "the fp16 model"


def write_imatrix(path: Path, sums: dict[str, np.ndarray], rows: int, chunks: int,
                  chunk_size: int, dataset: str, activations: str | None = None) -> None:
    """The file at `path`: `sums` maps each weight's GGUF name to its Σx² [n_in] over `rows`
    rows, from `chunks` windows of `chunk_size` tokens of `dataset`, of `activations`."""
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", chunks)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    if activations is not None:
        w.add_string(ACTIVATIONS, activations)
    for name, s in sums.items():
        w.add_tensor(f"{name}.in_sum2", s.astype(np.float32)[None, :])  # ggml [n_in, 1]
        w.add_tensor(f"{name}.counts", np.full((1, 1), rows, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dataset_name(source: str) -> str:
    """The calibration source as the file records it (and llama-quantize copies into every GGUF
    it makes): an hf: dataset as given, a local one by its last two path parts, never the
    machine's folders."""
    return source if source.startswith("hf:") else "/".join(Path(source).parts[-2:])


def write_model_imatrix(path: Path, sums: dict[str, np.ndarray], n_layers: int, rows: int,
                        chunks: int, chunk_size: int, source: str, activations: str) -> None:
    """write_imatrix for `sums` keyed by HF weight name (model.layers.N.self_attn.q_proj.weight)
    of a Llama model of `n_layers`, calibrated on the text `source`."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    write_imatrix(path, {names.get_name(k, try_suffixes=(".weight",)): s for k, s in sums.items()},
                  rows, chunks, chunk_size, dataset_name(source), activations)


UNIFORM = "uniform (no calibration)"  # the dataset a uniform matrix records


def write_uniform(path: Path, model: Path) -> None:
    """An importance matrix that weighs every input column of every block weight of the GGUF
    file `model` alike: what a type that cannot be made without one is made with when no
    calibration guides it (verify's baseline)."""
    sums = {t.name: np.ones(int(t.shape[0]), np.float32)  # ggml's shape: [n_in, n_out]
            for t in gguf_reader(model).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    write_imatrix(path, sums, 1, 1, 1, UNIFORM)


def check_imatrix_file(path: Path) -> Path:
    """`path` is an importance matrix file (InputError naming it otherwise)."""
    if not path.is_file():
        raise InputError(f"{path}: importance matrix file missing")
    kind = gguf_reader(path).get_field("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise InputError(f"{path}: not an importance matrix (its general.type is not "
                         "\"imatrix\"); make one with `python -m pipeline imatrix`")
    return path
