"""Quantisation methods, one registered entry each: what a variant's spec is (QuantSpec), and for
every method its algorithm's module, whether it reads calibration text, the format it writes, the
repository its variants go to and the verify checks that judge them. A new method is a module
with `prepare(H, spec)` and `quantize(W, prepared, spec)` plus one line in METHODS."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.core.bounded import read_json
from pipeline.core.errors import InputError
from pipeline.core.gptq_layout import BITS, GROUP_SIZE_RULE, valid_group_size

if TYPE_CHECKING:
    from pipeline.core.grid import Grid

# verify's checks of a quantised variant against fp16 (verify/stage.py VARIANT_CHECKS), in order
AGAINST_FP16 = ("perplexity", "kl_divergence", "generation")


@dataclass(frozen=True)
class Method:
    """One quantisation method: `module` holds its algorithm (prepare, quantize); `calibrated`
    methods get a Hessian H = 2/n Σ x xᵀ per group of linears sharing an input (else None);
    `checks` are the verify checks a variant must pass to be published, so a method whose
    weights change by more than rounding leaves out `module_integrity`."""

    name: str
    module: str
    calibrated: bool
    checks: tuple[str, ...]
    format: str = "gptq"     # the packed format written (pipeline/core/gptq_format.py, GPTQ v1)
    repo: str = "gptq_repo"  # the [publish] repository its variants go to, one branch each

    def algorithm(self) -> ModuleType:
        return importlib.import_module(self.module)


METHODS = {m.name: m for m in (
    Method("gptq", "pipeline.methods.gptq", calibrated=True,
           checks=(*AGAINST_FP16, "module_integrity", "against_rtn")),
    # round-to-nearest on the same grid: the baseline GPTQ is judged against, not against itself
    Method("rtn", "pipeline.methods.rtn", calibrated=False,
           checks=(*AGAINST_FP16, "module_integrity")),
)}
DEFAULT_METHOD = "gptq"  # what a variant without a `method` key (and a foreign GPTQ model) is
QUANT_LOG = "quant_log.json"  # the quantize stage's record in a variant's directory: its method


def variant_method(path: Path) -> str:
    """The method a variant directory was made by: its quant_log.json's `method` (a GPTQ model
    made elsewhere has none: DEFAULT_METHOD)."""
    log = path / QUANT_LOG
    if not log.is_file():
        return DEFAULT_METHOD
    method = read_json(log).get("method", DEFAULT_METHOD)
    if method not in METHODS:
        raise InputError(f"{log}: method {method!r} is none of {', '.join(METHODS)}")
    return method


class SpecError(InputError):
    """A QuantSpec field a method cannot use: `key` (the field), its `value` and the `rule` it
    breaks. The message names the CLI option; the recipe re-words it with its file and key."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        self.key, self.value, self.rule = key, value, rule
        shown = "" if isinstance(value, bool) else f" {value!r}"
        super().__init__(f"--{key.replace('_', '-')}{shown}: {rule}")


@dataclass(frozen=True)
class QuantSpec:
    """What to quantise to and how; the same spec means the same output. Validated here, once,
    for the CLI and the recipe alike (a recipe variant is a QuantSpec with more fields)."""

    bits: int
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    damp: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = True  # the least-error grid: on real weights it halves GPTQ's 3-bit loss (README)
    blocksize: int = 128
    method: str = DEFAULT_METHOD

    def __post_init__(self) -> None:
        rules = (
            ("bits", self.bits in BITS, f"must be one of {', '.join(map(str, BITS))} (GPTQ packing)"),
            ("group_size", valid_group_size(self.group_size), GROUP_SIZE_RULE),
            ("damp", 0 < self.damp < 1, "must be in (0, 1) (a fraction of mean diag H)"),
            ("static_groups", not (self.static_groups and self.group_size == -1),
             "needs a group size other than -1"),
            ("blocksize", self.blocksize > 0, "must be positive"),
            ("method", self.method in METHODS, f"must be one of {', '.join(METHODS)}"),
        )
        for key, ok, rule in rules:
            if not ok:
                raise SpecError(key, getattr(self, key), rule)

    def as_dict(self) -> dict[str, Any]:
        """QuantSpec's fields only (a recipe variant's others are not part of the spec)."""
        return {f.name: getattr(self, f.name) for f in fields(QuantSpec)}

    @property
    def grid(self) -> Grid:
        from pipeline.core.grid import Grid  # torch: not needed to read a recipe

        return Grid(self.bits, self.group_size, self.sym, self.mse)
