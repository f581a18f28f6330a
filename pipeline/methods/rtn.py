"""Round-to-nearest on the grid (pipeline/core/grid.py): no calibration, no error feedback. The
baseline every GPTQ variant is judged against, and a method of its own."""

from __future__ import annotations

import torch

from pipeline.core.grid import QuantResult, rtn
from pipeline.methods import QuantSpec


def prepare(H: None, spec: QuantSpec) -> None:
    """RTN reads no calibration: nothing to prepare."""


def quantize(W: torch.Tensor, prepared: None, spec: QuantSpec) -> QuantResult:
    return rtn(W, spec.grid)
