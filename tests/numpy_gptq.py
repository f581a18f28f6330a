"""An independent numpy reading of GPTQ v1 tensors (the tests' reference for what the runtimes
compute), written from the format's definition, not from pipeline/core/gptq_format.py."""

import numpy as np


def np_unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Values packed down the rows of int32 `words` [rows, cols]: per column, the words form one
    LSB-first bit stream; value j is bits [j·bits, (j+1)·bits)."""
    cols = words.shape[1]
    stream = np.ascontiguousarray(words.astype("<i4").view("<u4").T).view(np.uint8)  # [cols, rows·4]
    b = np.unpackbits(stream.reshape(cols, -1), axis=1, bitorder="little").reshape(cols, -1, bits)
    return (b.astype(np.int64) << np.arange(bits)).sum(-1).T  # [rows·32/bits, cols]


def np_dequantize(t: dict[str, np.ndarray], prefix: str, bits: int) -> np.ndarray:
    """W [out, in] = scales[g]·(q − (qzeros + 1)), g = g_idx, in float32."""
    q = np_unpack(t[prefix + ".qweight"], bits)  # [in, out]
    z = np_unpack(t[prefix + ".qzeros"].T, bits).T + 1  # [groups, out]
    g = t[prefix + ".g_idx"].astype(np.int64)
    s = t[prefix + ".scales"].astype(np.float32)
    return (s[g] * (q - z[g]).astype(np.float32)).T
