"""The narrow-MLP kernels' weight layout, without Triton: the design limit on widths and the
packing the kernels read (so ops and functional can validate and pack where Triton is absent).

Every layer's weight lives in the top-left corner of one [P, P] tile, P the next power of two
of the widest layer (at least 16, tl.dot's smallest tile): ``w`` [L, P, P] and ``b`` [L, P],
zeros elsewhere (and for a layer without bias).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

MAX_WIDTH = 256  # the widest layer one program keeps on chip as a [P, P] tile


def padded_width(widths: Sequence[int]) -> int:
    """P: the one padded width of every layer."""
    return max(16, 1 << (max(widths) - 1).bit_length())


def unpack(w: Tensor, b: Tensor, widths: Sequence[int]) -> tuple[list[Tensor], list[Tensor]]:
    """Per-layer views [D_l, D_{l-1}] and [D_l] of packed weights [L, P, P] and biases [L, P]."""
    L = len(widths) - 1
    return (
        [w[i, : widths[i + 1], : widths[i]] for i in range(L)],
        [b[i, : widths[i + 1]] for i in range(L)],
    )
