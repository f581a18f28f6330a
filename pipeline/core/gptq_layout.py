"""The GPTQ v1 format's geometry, without torch (a recipe is checked against it): the bit widths
it packs, the tensors of a quantised linear, the packing run, and the groups of a row."""

from __future__ import annotations

import math

BITS = (2, 3, 4, 8)
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")  # tensors of one quantised linear
PACK_RUN = 32  # values packed together into `bits` int32 words: packed dimensions are multiples
GROUP_SIZE_RULE = "must be -1 (one group per row) or a positive number of columns"


def valid_group_size(group_size: int) -> bool:
    """-1 or any positive width: the format holds ceil(in/group) groups (the last one partial
    when the group does not divide the width), as GPTQModel does; some kernels do not
    (verify/runtimes.py RAGGED_REFUSED_BY)."""
    return group_size == -1 or group_size > 0


def n_groups(in_features: int, group_size: int) -> int:
    """Rows of scales/qzeros for a linear with in_features inputs (the last group is partial
    when group_size does not divide in_features)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def ragged(n_in: int, group_size: int) -> bool:
    """Whether a linear with n_in inputs has a partial last group (fewer than group_size)."""
    return group_size != -1 and n_in % group_size != 0
