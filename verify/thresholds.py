"""Every threshold verify judges by, and the comparison each check makes with it, in one place:
conversion parity by compute dtype; per bit width the perplexity tolerance, KL divergence and top-1
agreement against fp16, greedy-generation agreement and the module error factor; the runtimes'
perplexity match; per GGUF type the same kinds and F16's parity. Recipes ([verify]) and the CLI
override the per-bit-width and per-type ones. verify/metrics.py computes the numbers.

Defaults are for real LLMs, from what llama.cpp's `perplexity --kl-divergence` reports for its
quants (mean KLD ~0.01 at 6-8 bits, 0.03-0.08 at 4, 0.2+ at 3; same top token ~0.99 / 0.93-0.95 /
0.85), with room above those values: a threshold catches a broken variant, not a slightly worse one.
There are no 2-bit defaults for the absolute kinds (too model-dependent): a 2-bit variant needs
them given; the relative module_output_error has one.
"""

from __future__ import annotations

import math

# Conversion parity (logits against Meta's reference), by compute dtype: float32 on the CPU,
# fp16 on CUDA (fp16 rounding of activations dominates there).
PARITY = {
    "float32": {"max_rel_err": 1e-4, "top1_agreement": 0.999},
    "float16": {"max_rel_err": 2e-2, "top1_agreement": 0.98},
}

# kind -> (what it bounds, valid range of a value, default per bit width)
KINDS: dict[str, tuple[str, tuple[float, float], dict[int, float]]] = {
    "tolerance": ("allowed perplexity increase over fp16, ppl / ppl_fp16 - 1 (at most)",
                  (0.0, float("inf")), {8: 0.01, 4: 0.05, 3: 0.15}),
    "kl_mean": ("mean KL(fp16 || variant) per evaluation position, nats (at most)",
                (0.0, float("inf")), {8: 0.02, 4: 0.10, 3: 0.30}),
    "kl_p99": ("99th percentile of the per-position KL, nats (at most)",
               (0.0, float("inf")), {8: 0.25, 4: 1.5, 3: 3.0}),
    "top1": ("fraction of positions where the variant's top token is fp16's (at least)",
             (0.0, 1.0), {8: 0.97, 4: 0.90, 3: 0.80}),
    # Greedy decoding diverges for good at the first near-tie, so one prompt's agreement is
    # geometric-like: with a per-token flip rate p (about 1 - top1), it is 0 with probability p.
    # The bar only catches a variant that leaves fp16's path at once on every prompt (a broken
    # one scores 0-0.03); 4-bit and 3-bit good variants average ~0.5, 8-bit ones ~1.
    "agreement": ("mean over prompts of the greedy tokens equal to fp16's before the first "
                  "difference, as a fraction of the continuation (at least)",
                  (0.0, 1.0), {8: 0.1, 4: 0.03, 3: 0.03}),
    # GPTQ moves weights to compensate output error, so its weight error exceeds RTN's on the same
    # grid: 1.2-1.3x on every module of the demo model's five variants, up to 1.8x with damp 0.01
    # and 32 calibration windows on a smaller model. One randomised tensor of a module gives 16-18x
    # (qweight, qzeros) and 5.8x (scales) at 4 bits, 8-9x and 2.9x at 3 bits (coarser grid, larger
    # RTN error): hence 2.5 there. A randomised g_idx is caught by its structure instead.
    "module_error": ("allowed ||W - W_q|| / ||W|| of each quantised linear, as a multiple of "
                     "round-to-nearest's at the same bits and group size (at most)",
                     (1.0, float("inf")), {8: 3.0, 4: 3.0, 3: 2.5}),
    # GPTQ minimises each linear's output error on calibration text, so on evaluation text it sits
    # below RTN's on the same grid: 0.20-0.66x on every module of the demo model's five variants
    # (RTN variants: 1x). One act-order module whose g_idx is permuted (every group still of the
    # right size, so its structure passes) gives 6.6x, where its weight error is 3.2x (about 2x on
    # a real 135M model, under module_error). 1.5 sits 2.3x above the worst good module and 4.4x
    # below the broken one. Relative to its own grid's baseline, it holds at any size and bit
    # width, 2 bits included (the one default there).
    "module_output_error": ("allowed ||(W - W_q) X|| / ||W X|| of each quantised linear on the "
                            "fp16 model's activations of evaluation text, as a multiple of "
                            "round-to-nearest's at the same bits and group size (at most)",
                            (1.0, float("inf")), {8: 1.5, 4: 1.5, 3: 1.5, 2: 1.5}),
}
CLI_OPTION = {kind: "--" + kind.replace("_", "-") for kind in KINDS}  # kl_mean -> --kl-mean

Table = dict[str, dict[int, float]]  # kind -> bits -> value


def invalid(kind: str, value: float) -> str | None:
    """Why `value` is not a valid `kind` threshold (None when it is)."""
    lo, hi = KINDS[kind][1]
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


def missing(table: Table, bits: int) -> list[str]:
    """The kinds that have no value for `bits` in a merged table."""
    return [kind for kind in KINDS if bits not in table[kind]]


def for_bits(table: Table, bits: int) -> dict[str, float]:
    """kind -> value for one bit width of a merged table (every kind must be present)."""
    return {kind: table[kind][bits] for kind in KINDS}


# GGUF files (llama.cpp's quantiser), per file type: the same kinds as for GPTQ's bit widths, judged
# in llama.cpp against fp16. From llama.cpp's published KL and perplexity for Llama models (Q8_0
# mean KLD ~0.001, Q6_K ~0.005, Q5_K_M ~0.01, Q4_K_M ~0.03, Q3_K_M ~0.09, Q2_K ~0.3; same top token
# 99% / 98% / 97% / 94% / 90% / 83%), with room above. F16 holds fp16's weights exactly: its bounds
# are fp16 round-off in llama.cpp's kernels, and its logits must also pass GGUF_PARITY (the
# gguf_parity check). Recipes override them per [[gguf]] entry.
#
# GGUF_PARITY: llama.cpp's F16 kernels round activations to fp16 before every product and keep the
# KV cache in f16, so a few positions stray further than in PARITY["float16"]'s CUDA runs: on the
# demo model, per-position error median 1.3e-4, 99.9th percentile 4e-3, max 2.2e-2 over 16,384
# positions, top-1 agreement 0.9993. A wrong rope θ or q/k left in HF's layout give 0.79-0.99 and
# 0.48-0.60: the bounds sit 4.5x above the first and far below the second.
GGUF_PARITY = {"max_rel_err": 0.1, "top1_agreement": 0.98}
GGUF_KINDS = ("tolerance", "kl_mean", "kl_p99", "top1")
# gguf_metadata: a float key (rope θ, norm ε) is stored as float32, whose spacing is 6e-8 relative:
# it matches config.json's value within GGUF_FLOAT_REL
GGUF_FLOAT_REL = 1e-6
GGUF: dict[str, dict[str, float]] = {
    "F16": {"tolerance": 0.002, "kl_mean": 0.001, "kl_p99": 0.01, "top1": 0.99},
    "Q8_0": {"tolerance": 0.01, "kl_mean": 0.01, "kl_p99": 0.1, "top1": 0.97},
    "Q6_K": {"tolerance": 0.02, "kl_mean": 0.02, "kl_p99": 0.2, "top1": 0.95},
    "Q5_K_M": {"tolerance": 0.04, "kl_mean": 0.04, "kl_p99": 0.4, "top1": 0.93},
    "Q4_K_M": {"tolerance": 0.08, "kl_mean": 0.1, "kl_p99": 1.0, "top1": 0.88},
    "Q3_K_M": {"tolerance": 0.2, "kl_mean": 0.3, "kl_p99": 3.0, "top1": 0.80},
    "Q2_K": {"tolerance": 0.5, "kl_mean": 1.0, "kl_p99": 8.0, "top1": 0.65},
}


def gguf_thresholds(type_name: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """kind -> value for one GGUF file type, `overrides` laid over the defaults."""
    unknown = sorted(set(overrides or {}) - set(GGUF_KINDS))
    if unknown:
        raise ValueError(f"unknown GGUF threshold kind(s) {', '.join(unknown)} "
                         f"(known: {', '.join(GGUF_KINDS)})")
    return {**GGUF[type_name], **(overrides or {})}


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
    """kl_mean and kl_p99 at most, top1 at least, the limits of the same names."""
    return (metrics["kl_mean"] <= limits["kl_mean"] and metrics["kl_p99"] <= limits["kl_p99"]
            and metrics["top1"] >= limits["top1"])


def agreement_passed(mean: float, agreement: float) -> bool:
    """The mean greedy agreement with fp16 at least the threshold."""
    return mean >= agreement


def module_passed(error: float, rtn_error: float, module_error: float) -> bool:
    """A linear's ||W - W_q|| / ||W|| (or output error) at most module_error times RTN's on the
    same grid (NaN fails)."""
    return error <= module_error * rtn_error


def runtime_matched(ratio: float) -> bool:
    """A runtime's perplexity within PPL_MATCH of ours (ratio: theirs / ours - 1)."""
    return math.isfinite(ratio) and abs(ratio) <= PPL_MATCH
