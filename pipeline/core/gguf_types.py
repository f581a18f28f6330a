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
# TheBloke's set with his cards' use cases, then the IQ types today's publishers add.
# Thresholds (ppl rise, KL mean, KL p99, top-1), per type the looser of two references, so that a
# right file passes on a 7B-class model and on a small real one, while a broken one (KL > 1, top-1
# near 0.5) fails: (1) llama.cpp's published KL and perplexity for Llama models with room above
# (Q8_0 mean KLD ~0.001, Q6_K ~0.005, Q5_K_M ~0.01, Q4_K_M ~0.03, Q3_K_M ~0.09, Q2_K ~0.3; same
# top token 99% / 98% / 97% / 94% / 90% / 83%); (2) SmolLM2-135M-Instruct measured inside
# llama.cpp (24 windows of 256 held-out tokens, 128 x 256 calibration tokens), made with our
# importance matrix and without it (the IQ types: with it only), 1.5x the worse of the two and
# top-1 5 points below it. That model is the hard case: small, and its 576-wide rows are not a
# multiple of the K-quants' 256-weight blocks, so llama.cpp falls back to legacy blocks there
# (which is why its Q3_K_S and Q2_K files come out the same). Measured, with / without: Q6_K KL
# 0.0083 / 0.011, top-1 94.4% / 94.1%; Q5_K_M 0.0076 / 0.076, 94.4% / 84.3%; Q4_K_M 0.033 /
# 0.059, 89.4% / 86.2%; Q4_0 0.17 / 0.31, 77.7% / 70.1%; Q3_K_M 0.091 / 0.13, 81.9% / 80.1%;
# Q2_K 0.32 / 0.45, 69.9% / 64.1%; IQ4_XS 0.095, 82.3%; IQ2_XS 0.40, 67.2%. Q8_0: top-1 96.2%,
# KL 0.0046. F16 holds fp16's weights exactly: its bounds are fp16 round-off in llama.cpp's
# kernels (and its logits must also pass GGUF_PARITY).
TYPES = {t.name: t for t in (
    GGUFType("F16", F.MOSTLY_F16, 16, 16.0,
             "unquantised fp16, as converted: the reference the others are measured against",
             limits(0.002, 0.001, 0.01, 0.99), uses_imatrix=False),
    GGUFType("Q8_0", F.MOSTLY_Q8_0, 8, 8.5,
             "very large, extremely low quality loss - not recommended",
             limits(0.01, 0.01, 0.1, 0.95), uses_imatrix=False),
    GGUFType("Q6_K", F.MOSTLY_Q6_K, 6, 6.5625, "very large, extremely low quality loss",
             limits(0.025, 0.02, 0.2, 0.89)),
    GGUFType("Q5_K_M", F.MOSTLY_Q5_K_M, 5, 5.5, "large, very low quality loss - recommended",
             limits(0.18, 0.12, 0.61, 0.79)),
    GGUFType("Q5_K_S", F.MOSTLY_Q5_K_S, 5, 5.5, "large, low quality loss - recommended",
             limits(0.2, 0.14, 0.68, 0.78)),
    GGUFType("Q5_0", F.MOSTLY_Q5_0, 5, 5.5,
             "legacy; medium, balanced quality - prefer using Q4_K_M",
             limits(0.18, 0.13, 0.62, 0.78)),
    GGUFType("Q4_K_M", F.MOSTLY_Q4_K_M, 4, 4.5, "medium, balanced quality - recommended",
             limits(0.13, 0.1, 1.0, 0.81)),
    GGUFType("Q4_K_S", F.MOSTLY_Q4_K_S, 4, 4.5, "small, greater quality loss",
             limits(0.15, 0.11, 1.0, 0.79)),
    GGUFType("Q4_0", F.MOSTLY_Q4_0, 4, 4.5,
             "legacy; small, very high quality loss - prefer using Q3_K_M",
             limits(0.41, 0.46, 2.3, 0.65)),
    GGUFType("IQ4_XS", F.MOSTLY_IQ4_XS, 4, 4.25,
             "small, close to Q4_K_M in quality (needs an importance matrix)",
             limits(0.17, 0.15, 1.0, 0.77), needs_imatrix=True),
    GGUFType("Q3_K_L", F.MOSTLY_Q3_K_L, 3, 3.4375, "small, substantial quality loss",
             limits(0.27, 0.3, 3.0, 0.75)),
    GGUFType("Q3_K_M", F.MOSTLY_Q3_K_M, 3, 3.4375, "very small, high quality loss",
             limits(0.22, 0.3, 3.0, 0.75)),
    GGUFType("Q3_K_S", F.MOSTLY_Q3_K_S, 3, 3.4375, "very small, high quality loss",
             limits(0.65, 0.69, 3.0, 0.59)),
    GGUFType("IQ3_M", F.MOSTLY_IQ3_M, 3, 3.4375,
             "very small, close to Q3_K_M in quality (needs an importance matrix)",
             limits(0.25, 0.3, 3.0, 0.74), needs_imatrix=True),
    GGUFType("IQ3_XXS", F.MOSTLY_IQ3_XXS, 3, 3.0625,
             "very small, high quality loss (needs an importance matrix)",
             limits(0.5, 1.0, 8.0, 0.65), needs_imatrix=True),
    GGUFType("Q2_K", F.MOSTLY_Q2_K, 2, 2.625,
             "smallest, significant quality loss - not recommended for most purposes",
             limits(0.65, 1.0, 8.0, 0.59)),
    GGUFType("IQ2_M", F.MOSTLY_IQ2_M, 2, 2.5,
             "smallest, significant quality loss (needs an importance matrix)",
             limits(0.5, 1.0, 8.0, 0.65), needs_imatrix=True),
    GGUFType("IQ2_XS", F.MOSTLY_IQ2_XS, 2, 2.3125,
             "smallest, extreme quality loss (needs an importance matrix)",
             limits(0.63, 1.0, 8.0, 0.62), needs_imatrix=True),
)}
TYPE_OF_FTYPE = {int(t.ftype): t.name for t in TYPES.values()}


def file_name(model: str, type_name: str) -> str:
    """TheBloke's naming: `codellama-34b-instruct.Q4_K_M.gguf`."""
    return f"{model.lower()}.{type_name}.gguf"
