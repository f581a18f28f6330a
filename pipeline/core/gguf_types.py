"""The GGUF file types this pipeline writes, in one table: llama.cpp's file type, nominal bits,
TheBloke's use case and verify's default thresholds (judged inside llama.cpp against fp16)."""

from __future__ import annotations

from dataclasses import dataclass

import gguf


@dataclass(frozen=True)
class GGUFType:
    """One file type: llama.cpp's file type, its nominal bits (TheBloke's column), the bits per
    weight of its main ggml type (a K-quant mixture keeps some tensors at a wider one), what it is
    for, the default thresholds (kind -> value: verify/thresholds.py GGUF_KINDS) a file of it is
    held to, whether it needs an importance matrix (the IQ types are unusable without one), and
    whether llama.cpp's quantiser uses one at all (F16 is not quantised; Q8_0 rounds to nearest)."""

    name: str
    ftype: gguf.LlamaFileType
    bits: int
    bpw: float
    use_case: str
    thresholds: dict[str, float]
    needs_imatrix: bool = False
    uses_imatrix: bool = True


# A file made with an importance matrix may have a mean KL at most (1 + IMATRIX_MARGIN) times its
# type's made without one in the same run (verify's against_no_imatrix). Measured with / without:
# SmolLM2-135M Q4_K_M 0.57, Q3_K_M 0.70, Q2_K 0.70, IQ4_XS 0.49 (against a uniform matrix); the demo
# model 0.94 (Q4_K_M, IQ4_XS). A matrix with each tensor's channels shuffled gives SmolLM2 Q2_K 1.39
# and Q3_K_M 1.04 (Q4_K_M 0.83, IQ4_XS 1.00): the margin fails those two and passes every right one
# with room.
IMATRIX_MARGIN = 0.02


def limits(tolerance: float, kl_mean: float, kl_p99: float, top1: float) -> dict[str, float]:
    return {"tolerance": tolerance, "kl_mean": kl_mean, "kl_p99": kl_p99, "top1": top1,
            "imatrix_margin": IMATRIX_MARGIN}


F = gguf.LlamaFileType
Q8, Q6, Q5, Q4 = limits(0.01, 0.01, 0.1, 0.95), limits(0.02, 0.02, 0.2, 0.95), \
    limits(0.04, 0.04, 0.4, 0.93), limits(0.08, 0.1, 1.0, 0.88)
Q3, Q2 = limits(0.2, 0.3, 3.0, 0.80), limits(0.5, 1.0, 8.0, 0.65)
# TheBloke's set with his cards' use cases, then the IQ types today's publishers add. Thresholds:
# from llama.cpp's published KL and perplexity for Llama models (Q8_0 mean KLD ~0.001, Q6_K
# ~0.005, Q5_K_M ~0.01, Q4_K_M ~0.03, Q3_K_M ~0.09, Q2_K ~0.3; same top token 99% / 98% / 97% /
# 94% / 90% / 83%), with room above. F16 holds fp16's weights exactly: its bounds are fp16
# round-off in llama.cpp's kernels (and its logits must also pass GGUF_PARITY). Q8_0's top-1 is
# 96.1% on a real 135M model (SmolLM2-135M, KL mean 0.005), where 7B-class ones keep ~99%. The
# types added with the importance matrix take the bounds of their width's K-quant (IQ3_XXS:
# Q2_K's) until they are measured on real weights.
TYPES = {t.name: t for t in (
    GGUFType("F16", F.MOSTLY_F16, 16, 16.0,
             "unquantised fp16, as converted: the reference the others are measured against",
             limits(0.002, 0.001, 0.01, 0.99), uses_imatrix=False),
    GGUFType("Q8_0", F.MOSTLY_Q8_0, 8, 8.5,
             "very large, extremely low quality loss - not recommended", Q8, uses_imatrix=False),
    GGUFType("Q6_K", F.MOSTLY_Q6_K, 6, 6.5625, "very large, extremely low quality loss", Q6),
    GGUFType("Q5_K_M", F.MOSTLY_Q5_K_M, 5, 5.5, "large, very low quality loss - recommended", Q5),
    GGUFType("Q5_K_S", F.MOSTLY_Q5_K_S, 5, 5.5, "large, low quality loss - recommended", Q5),
    GGUFType("Q5_0", F.MOSTLY_Q5_0, 5, 5.5,
             "legacy; medium, balanced quality - prefer using Q4_K_M", Q5),
    GGUFType("Q4_K_M", F.MOSTLY_Q4_K_M, 4, 4.5, "medium, balanced quality - recommended", Q4),
    GGUFType("Q4_K_S", F.MOSTLY_Q4_K_S, 4, 4.5, "small, greater quality loss", Q4),
    GGUFType("Q4_0", F.MOSTLY_Q4_0, 4, 4.5,
             "legacy; small, very high quality loss - prefer using Q3_K_M", Q4),
    GGUFType("IQ4_XS", F.MOSTLY_IQ4_XS, 4, 4.25,
             "small, close to Q4_K_M in quality (needs an importance matrix)", Q4,
             needs_imatrix=True),
    GGUFType("Q3_K_L", F.MOSTLY_Q3_K_L, 3, 3.4375, "small, substantial quality loss", Q3),
    GGUFType("Q3_K_M", F.MOSTLY_Q3_K_M, 3, 3.4375, "very small, high quality loss", Q3),
    GGUFType("Q3_K_S", F.MOSTLY_Q3_K_S, 3, 3.4375, "very small, high quality loss", Q3),
    GGUFType("IQ3_M", F.MOSTLY_IQ3_M, 3, 3.4375,
             "very small, close to Q3_K_M in quality (needs an importance matrix)", Q3,
             needs_imatrix=True),
    GGUFType("IQ3_XXS", F.MOSTLY_IQ3_XXS, 3, 3.0625,
             "very small, high quality loss (needs an importance matrix)", Q2, needs_imatrix=True),
    GGUFType("Q2_K", F.MOSTLY_Q2_K, 2, 2.625,
             "smallest, significant quality loss - not recommended for most purposes", Q2),
    GGUFType("IQ2_M", F.MOSTLY_IQ2_M, 2, 2.5,
             "smallest, significant quality loss (needs an importance matrix)", Q2,
             needs_imatrix=True),
    GGUFType("IQ2_XS", F.MOSTLY_IQ2_XS, 2, 2.3125,
             "smallest, extreme quality loss (needs an importance matrix)", Q2, needs_imatrix=True),
)}
TYPE_OF_FTYPE = {int(t.ftype): t.name for t in TYPES.values()}


def file_name(model: str, type_name: str) -> str:
    """TheBloke's naming: `codellama-34b-instruct.Q4_K_M.gguf`."""
    return f"{model.lower()}.{type_name}.gguf"
