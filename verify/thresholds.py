"""Every threshold verify judges by, and the comparison each check makes with it, in one place:
conversion parity by compute dtype; per bit width the gates against references measured in the same
run (round-to-nearest on the variant's own grid: perplexity and KL, each linear's output error) and
the absolute bounds (perplexity tolerance, KL and top-1 against fp16, greedy agreement, weight
error); the runtimes' perplexity match; per GGUF type the same absolute kinds and F16's parity.
Recipes ([verify]) and the CLI override the per-bit-width and per-type ones. verify/metrics.py
computes the numbers.

Relative gates are on by default at every width: they hold on a 135M model as on a 70B one, where
an absolute number cannot (RTN 4-bit costs a real 135M model +60% perplexity, and 7B-class ones a
few percent). Absolute bounds are a user's option below 8 bits; at 8 bits, where round-to-nearest
is lossless on any model, they stay on by default, from llama.cpp's Q8_0 figures with room above.
"""

from __future__ import annotations

import math

from pipeline.core.gguf_types import TYPES

# Conversion parity (logits against Meta's reference), by compute dtype: float32 on the CPU,
# fp16 on CUDA (fp16 rounding of activations dominates there).
PARITY = {
    "float32": {"max_rel_err": 1e-4, "top1_agreement": 0.999},
    "float16": {"max_rel_err": 2e-2, "top1_agreement": 0.98},
}

# kind -> (what it bounds, valid range of a value, default per bit width)
KINDS: dict[str, tuple[str, tuple[float, float], dict[int, float]]] = {
    # Same-run reference: a GPTQ variant against round-to-nearest on its own grid (bits, group
    # size, symmetry), scored on the same windows. GPTQ exists to beat it: on a real 135M model
    # (SmolLM2-135M, README) GPTQ's perplexity rise is 1/9-1/2 of RTN's at 4/3/2 bits, and on the
    # demo model at most equal. The margin lets noise through where both are lossless (8 bits:
    # ratios within 1.1 either way), and fails a variant that is clearly worse than rounding.
    "rtn_margin": ("allowed excess of a GPTQ variant's perplexity and mean KL over round-to-"
                   "nearest's on the same grid, as a fraction: ppl <= ppl_rtn x (1 + margin) and "
                   "KL <= KL_rtn x (1 + margin), unless within RTN_FLOOR of fp16",
                   (0.0, float("inf")), {2: 0.1, 3: 0.1, 4: 0.1, 8: 0.1}),
    "tolerance": ("allowed perplexity increase over fp16, ppl / ppl_fp16 - 1 (at most)",
                  (0.0, float("inf")), {8: 0.01}),
    "kl_mean": ("mean KL(fp16 || variant) per evaluation position, nats (at most)",
                (0.0, float("inf")), {8: 0.02}),
    "kl_p99": ("99th percentile of the per-position KL, nats (at most)",
               (0.0, float("inf")), {8: 0.25}),
    "top1": ("fraction of positions where the variant's top token is fp16's (at least)",
             (0.0, 1.0), {8: 0.97}),
    # Greedy decoding diverges for good at the first near-tie, so one prompt's agreement is
    # geometric-like: with a per-token flip rate p (about 1 - top1), it is 0 with probability p.
    # The bar only catches a variant that leaves fp16's path at once on every prompt (a broken
    # one scores 0-0.03); 8-bit good variants average ~1. Below 8 bits a small real model's good
    # 3-bit variant scores 0 too, so there it is a user's option.
    "agreement": ("mean over prompts of the greedy tokens equal to fp16's before the first "
                  "difference, as a fraction of the continuation (at least)",
                  (0.0, 1.0), {8: 0.1}),
    # GPTQ moves weights to compensate output error, so its weight error exceeds RTN's on the same
    # grid: 1.2-1.3x on the demo model, but up to 3.1x on good modules of a real 135M model at 3
    # bits (down_proj, whose inputs carry a few huge channels). So it is reported, and a bound is
    # a user's option; the output error below is the gate.
    "module_error": ("allowed ||W - W_q|| / ||W|| of each quantised linear, as a multiple of "
                     "round-to-nearest's at the same bits and group size (at most)",
                     (1.0, float("inf")), {}),
    # GPTQ minimises each linear's output error on calibration text, so on evaluation text it sits
    # below RTN's on the same grid: 0.20-0.66x on every module of the demo model's five variants,
    # at most 0.98x on a real 135M model (3 and 4 bits, 32 calibration windows; RTN variants: 1x).
    # One act-order module whose g_idx is permuted (every group still of the right size) gives
    # 6.6x on the demo, 1.27x on the real model at 3 bits, where act-order's order catches it
    # (verify/integrity.py ACT_ORDER_RHO). 1.5 sits 1.5x above the worst good module seen.
    # Relative to its own grid's baseline, it holds at any size and bit width.
    "module_output_error": ("allowed ||(W - W_q) X|| / ||W X|| of each quantised linear on the "
                            "fp16 model's activations of evaluation text, as a multiple of "
                            "round-to-nearest's at the same bits and group size (at most)",
                            (1.0, float("inf")), {8: 1.5, 4: 1.5, 3: 1.5, 2: 1.5}),
}
# Below these a variant is as good as fp16 whatever RTN scores: perplexity within 0.1% and mean KL
# 0.001 nats (llama.cpp's Q8_0 on Llama models), the noise level of two lossless variants.
RTN_FLOOR = {"ppl_rise": 0.001, "kl_mean": 0.001}
CLI_OPTION = {kind: "--" + kind.replace("_", "-") for kind in KINDS}  # kl_mean -> --kl-mean

Table = dict[str, dict[int, float]]  # kind -> bits -> value


def invalid(kind: str, value: float) -> str | None:
    """Why `value` is not a valid `kind` threshold (None when it is)."""
    lo, hi = (KINDS[kind] if kind in KINDS else GGUF_ONLY[kind])[1]
    if not lo <= value <= hi:
        return f"{kind} must be in [{lo:g}, {hi:g}], got {value:g}"
    return None


def merged(overrides: Table | None = None) -> Table:
    """The defaults with `overrides` (kind -> bits -> value) laid over them, bit width by bit
    width."""
    unknown = sorted(set(overrides or {}) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown threshold kind(s) {', '.join(unknown)} "
                         f"(known: {', '.join(KINDS)})")
    return {kind: {**default, **(overrides or {}).get(kind, {})}
            for kind, (_, _, default) in KINDS.items()}


def for_bits(table: Table, bits: int) -> dict[str, float | None]:
    """kind -> value for one bit width of a merged table; None where a kind is not set."""
    return {kind: table[kind].get(bits) for kind in KINDS}


# GGUF files, per file type: the same kinds as for GPTQ's bit widths, judged in llama.cpp against
# fp16; the defaults are the type's (pipeline/core/gguf_types.py TYPES), recipes override them per
# [[gguf]] entry.
#
# GGUF_PARITY: llama.cpp's F16 kernels round activations to fp16 before every product and keep the
# KV cache in f16, so a few positions stray further than in PARITY["float16"]'s CUDA runs: on the
# demo model, per-position error median 1.3e-4, 99.9th percentile 4e-3, max 2.2e-2 over 16,384
# positions, top-1 agreement 0.9993. A wrong rope θ or q/k left in HF's layout give 0.79-0.99 and
# 0.48-0.60: the bounds sit 4.5x above the first and far below the second.
GGUF_PARITY = {"max_rel_err": 0.1, "top1_agreement": 0.98}
GGUF_KINDS = ("tolerance", "kl_mean", "kl_p99", "top1", "imatrix_margin")
# The same-run reference of a file made with an importance matrix: the same type quantised from the
# same F16 file without one (with a uniform one where the type needs one: the IQ types), scored on
# the same windows, as RTN is for GPTQ. Its default per type is in the catalogue (IMATRIX_MARGIN).
GGUF_ONLY = {"imatrix_margin": ("allowed excess of a GGUF file's mean KL over the same type made "
                                "without the importance matrix, as a fraction: KL <= KL_without x "
                                "(1 + margin), unless within RTN_FLOOR of fp16",
                                (0.0, float("inf")))}
# gguf_metadata: a float key (rope θ, norm ε) is stored as float32, whose spacing is 6e-8 relative:
# it matches config.json's value within GGUF_FLOAT_REL
GGUF_FLOAT_REL = 1e-6


def gguf_thresholds(type_name: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """kind -> value for one GGUF file type, `overrides` laid over the defaults."""
    unknown = sorted(set(overrides or {}) - set(GGUF_KINDS))
    if unknown:
        raise ValueError(f"unknown GGUF threshold kind(s) {', '.join(unknown)} "
                         f"(known: {', '.join(GGUF_KINDS)})")
    return {**TYPES[type_name].thresholds, **(overrides or {})}


# A GPTQ variant passes a runtime (verify/runtimes.py) when |ppl there / our dequantised ppl - 1|
# is at most PPL_MATCH. Measured on CPU (GPTQModel 7.6 / transformers 5.24 + optimum 2.3, the demo
# model's 4/8/3-bit and act-order variants): each runtime, in fp16, matches our float32 dequantised
# perplexity within 4.2e-4, so 0.5% leaves 12x room for CPU and kernel rounding.
PPL_MATCH = 0.005


# The comparisons: each check passes or fails through one of these, and NaN fails every one.

def parity_passed(metrics: dict[str, float], limits: dict[str, float]) -> bool:
    """Logits parity (PARITY, GGUF_PARITY): max_rel_err at most, top1_agreement at least."""
    return (metrics["max_rel_err"] <= limits["max_rel_err"]
            and metrics["top1_agreement"] >= limits["top1_agreement"])


def perplexity_passed(ppl: float, ppl_fp16: float, tolerance: float) -> bool:
    """ppl finite and at most ppl_fp16 · (1 + tolerance)."""
    return math.isfinite(ppl) and ppl / ppl_fp16 <= 1 + tolerance


def kl_passed(metrics: dict[str, float], limits: dict[str, float]) -> bool:
    """kl_mean and kl_p99 at most, top1 at least, the limits of the same names that are given."""
    return (all(metrics[k] <= limits[k] for k in ("kl_mean", "kl_p99") if k in limits)
            and ("top1" not in limits or metrics["top1"] >= limits["top1"]))


def agreement_passed(mean: float, agreement: float) -> bool:
    """The mean greedy agreement with fp16 at least the threshold."""
    return mean >= agreement


def rtn_passed(value: float, rtn: float, margin: float, floor: float, fp16: float = 0.0) -> bool:
    """A variant's perplexity or mean KL (`value`; fp16's is `fp16`) at most (1 + margin) times
    its same-run baseline's (RTN's on the same grid; for a GGUF file, its type's without the
    importance matrix), or within `floor` of fp16 (relative for perplexity). NaN fails."""
    near_fp16 = value - fp16 <= floor * (fp16 or 1.0)
    return math.isfinite(value) and (value <= rtn * (1 + margin) or near_fp16)


def module_passed(error: float, rtn_error: float, module_error: float) -> bool:
    """A linear's ||W - W_q|| / ||W|| (or output error) at most module_error times RTN's on the
    same grid (NaN fails)."""
    return error <= module_error * rtn_error


def runtime_matched(ratio: float) -> bool:
    """A runtime's perplexity within PPL_MATCH of ours (ratio: theirs / ours - 1)."""
    return math.isfinite(ratio) and abs(ratio) <= PPL_MATCH
