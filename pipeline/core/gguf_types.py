"""The GGUF file types this pipeline writes, in one table: llama.cpp's file type, nominal bits,
TheBloke's use case and verify's default thresholds (judged inside llama.cpp against fp16)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf


@dataclass(frozen=True)
class GGUFType:
    """One file type: llama.cpp's file type, its nominal bits per weight, what it is for and the
    default thresholds (kind -> value: verify/thresholds.py GGUF_KINDS) a file of it is held to."""

    name: str
    ftype: gguf.LlamaFileType
    bits: int
    use_case: str
    thresholds: dict[str, float]


# TheBloke's set, with the use cases his cards gave (the quality loss measured on Llama models).
# Thresholds: from llama.cpp's published KL and perplexity for Llama models (Q8_0 mean KLD ~0.001,
# Q6_K ~0.005, Q5_K_M ~0.01, Q4_K_M ~0.03, Q3_K_M ~0.09, Q2_K ~0.3; same top token 99% / 98% /
# 97% / 94% / 90% / 83%), with room above. F16 holds fp16's weights exactly: its bounds are fp16
# round-off in llama.cpp's kernels (and its logits must also pass GGUF_PARITY). Q8_0's top-1 is
# 96.1% on a real 135M model (SmolLM2-135M, KL mean 0.005), where 7B-class ones keep ~99%.
TYPES = {t.name: t for t in (
    GGUFType("F16", gguf.LlamaFileType.MOSTLY_F16, 16,
             "unquantised fp16, as converted: the reference the others are measured against",
             {"tolerance": 0.002, "kl_mean": 0.001, "kl_p99": 0.01, "top1": 0.99}),
    GGUFType("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, 8,
             "very large, extremely low quality loss - not recommended",
             {"tolerance": 0.01, "kl_mean": 0.01, "kl_p99": 0.1, "top1": 0.95}),
    GGUFType("Q6_K", gguf.LlamaFileType.MOSTLY_Q6_K, 6, "very large, extremely low quality loss",
             {"tolerance": 0.02, "kl_mean": 0.02, "kl_p99": 0.2, "top1": 0.95}),
    GGUFType("Q5_K_M", gguf.LlamaFileType.MOSTLY_Q5_K_M, 5,
             "large, very low quality loss - recommended",
             {"tolerance": 0.04, "kl_mean": 0.04, "kl_p99": 0.4, "top1": 0.93}),
    GGUFType("Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M, 4,
             "medium, balanced quality - recommended",
             {"tolerance": 0.08, "kl_mean": 0.1, "kl_p99": 1.0, "top1": 0.88}),
    GGUFType("Q3_K_M", gguf.LlamaFileType.MOSTLY_Q3_K_M, 3, "very small, high quality loss",
             {"tolerance": 0.2, "kl_mean": 0.3, "kl_p99": 3.0, "top1": 0.80}),
    GGUFType("Q2_K", gguf.LlamaFileType.MOSTLY_Q2_K, 2,
             "smallest, significant quality loss - not recommended for most purposes",
             {"tolerance": 0.5, "kl_mean": 1.0, "kl_p99": 8.0, "top1": 0.65}),
)}
TYPE_OF_FTYPE = {int(t.ftype): t.name for t in TYPES.values()}


def file_name(model: str, type_name: str) -> str:
    """TheBloke's naming: `codellama-34b-instruct.Q4_K_M.gguf`."""
    return f"{model.lower()}.{type_name}.gguf"
